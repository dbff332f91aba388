"""TVMScript of the depthwise kernel (design in :mod:`.depthwise`)."""
from __future__ import annotations

import math

from tvm.script import tirx as T

from soniq_tvm import tvm_shim as tv

from . import _isa

tirx = tv.tirx
CHUNK = 16  # floats per vector of the activation re-layout
MAX_CHAINS = 8  # accumulator vectors in flight per output row


def build(op, g, knobs, wdtype, vec_regs=16, reg_bytes=32):
    V = knobs["V"]
    par_loop = _isa.parallel_loop(op)
    N, C, H, W, O = g.n, g.c, g.h, g.w, g.o
    OG, KH, KW, OH, OW = g.og, g.kh, g.kw, g.oh, g.ow
    (SH, SW), (DH, DW) = g.strides, g.dilation
    PT, PL, PB, PR = g.padding
    HP, WP = H + PT + PB, W + PL + PR
    WPA = WP + SW - 1  # a strided tap loads SW * V floats: the last may reach SW - 1 past the row
    NT = math.ceil(OW / V)  # vectors per output row (the last overlaps its neighbour)
    # accumulators that fit beside the broadcast taps (LLVM keeps up to 9 in registers)
    per_acc = math.ceil(V * 4 / reg_bytes)
    chains = max(1, min(MAX_CHAINS, (vec_regs - min(KH * KW, 9) - 2) // per_acc))
    NTG = math.ceil(NT / chains)
    TT = math.ceil(NT / NTG)  # vectors per group; groups past the row end clamp to its last vector
    XV = min(CHUNK, W)
    XT = math.ceil(W / XV)
    FV = f"float32x{V}"
    x_shape, out_shape = tuple(op.x_shape), tuple(op.out_shape)

    def tap(xf, yy, x0):
        """V floats at x0, x0 + SW, ...: one contiguous load, de-interleaved if strided."""
        if SW == 1:
            return xf[yy, tirx.Ramp(x0, 1, V)]
        wide = xf[yy, tirx.Ramp(x0, 1, V * SW)]
        return tirx.Shuffle([wide], [tirx.const(i * SW, "int32") for i in range(V)])

    @T.prim_func
    def main(x: T.Buffer(x_shape, op.a_dtype), wq: T.Buffer((O, KH * KW), wdtype),
             out: T.Buffer(out_shape, "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        # ---- one task per input channel plane: re-lay it out as zero-padded float32
        # rows (L1/L2-resident), then every output row of its OG output channels -------
        for p in par_loop(N * C):
            n: T.let = p // C
            c: T.let = p % C
            xf = T.alloc_buffer((HP, WPA), "float32")
            for yy in range(HP):
                for xx in T.vectorized(WPA):
                    xf[yy, xx] = T.float32(0)
            for yy in range(H):
                for xo in range(XT):
                    for xi in T.vectorized(XV):
                        xf[PT + yy, PL + T.min(xo * XV, W - XV) + xi] = T.Cast(
                            "float32", x[n, c, yy, T.min(xo * XV, W - XV) + xi])
            for om, oy in T.grid(OG, OH):
                wf = T.alloc_buffer((KH * KW,), "float32")
                for k in range(KH * KW):
                    wf[k] = T.Cast("float32", wq[c * OG + om, k])
                for tg in range(NTG):
                    # TT vectors at once: independent multiply-add chains hide the latency
                    acc = T.alloc_buffer((TT,), FV)
                    for tt in T.unroll(TT):
                        acc[tt] = T.Broadcast(T.float32(0), V)
                    for r in T.unroll(KH):
                        for s in T.unroll(KW):
                            for tt in T.unroll(TT):
                                acc[tt] = acc[tt] + tap(xf, oy * SH + r * DH, T.min(
                                    (tg * TT + tt) * V, OW - V) * SW + s * DW) * T.Broadcast(wf[r * KW + s], V)
                    for tt in T.unroll(TT):
                        out[n, c * OG + om, oy, T.ramp(T.min((tg * TT + tt) * V, OW - V), 1, V)] = T.Cast(
                            f"int32x{V}", acc[tt])

    return main
