"""TVMScript of the int8-dot kernels (see :mod:`.int8dot` for the design).

Kept apart because TVMScript must be parsed from a source file, and so that the
kernel reads top to bottom: activation re-layout, then the tiled micro-kernel.
Accumulators live in small ``global``-scope buffers: TVM puts those on the stack
(< 1 KiB) where LLVM promotes them to registers; ``local`` scope would go
through ``TVMBackendAllocWorkspace`` and stay in memory.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from . import _isa


def build(op, g, mode, lay, knobs, dot, off):
    R, J = knobs["R"], knobs["J"]
    VL, KV = mode.vl, mode.kv
    AD, WD = mode.a_dtype, mode.w_dtype
    CB, CGP, TC, OB, OGP = lay["cb"], lay["cgp"], lay["tc"], lay["ob"], lay["ogp"]
    NCH = CB // TC
    SUM16 = mode.name == "avx2-sum16"
    par_loop = _isa.parallel_loop(op)
    if R * J * VL * 4 >= 1024:
        raise ValueError(f"tile R={R} J={J} needs {R * J * VL * 4} bytes of accumulators (< 1024 stay in registers)")
    N, C, H, W, O = g.n, g.c, g.h, g.w, g.o
    G, CG, OG, KH, KW, OH, OW = g.groups, g.cg, g.og, g.kh, g.kw, g.oh, g.ow
    (SH, SW), (DH, DW) = g.strides, g.dilation
    PT, PL, PB, PR = g.padding
    HP, WP = H + PT + PB, W + PL + PR
    CT = G * CGP
    OBT = OB // J
    OXT = math.ceil(OW / R)
    NT = N * G * OH * OBT
    PAR_OX = NT < 8 and OXT > 1
    NPAR = NT * (OXT if PAR_OX else 1)
    NSEQ = 1 if PAR_OX else OXT
    XD = op.a_dtype
    RELAYOUT = not (g.matmul and off == 0 and AD == XD and CGP == C)
    CHECK_O = OGP != OG
    VEC_OUT = g.matmul and not CHECK_O
    ABC = f"{AD}x{VL * KV}"   # broadcast activation operand
    AW = f"{AD}x{KV}"         # one 32-bit word of activations
    WV = f"{WD}x{VL * KV}"
    AV = f"int32x{VL}"
    M = OW
    x_shape = tuple(op.x_shape)
    out_shape = tuple(op.out_shape)
    wp_shape = (G, OB, KH, KW, CB, VL * KV)

    def xs_word(xs, n, yy, xx, c):
        return _isa.bcast_word(xs.vload([n, yy, xx, c], AW), VL, ABC)

    @T.prim_func
    def main(x: T.Buffer(x_shape, XD), wp: T.Buffer(wp_shape, WD), corr: T.Buffer((G, OGP), "int32"),
             out: T.Buffer(out_shape, "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        # ---- activations: pad, shift by `off`, channels last ----------------------
        if RELAYOUT:
            xs = T.alloc_buffer((N, HP, WP, CT), AD)
            if g.matmul:
                xm = T.decl_buffer((M, C), XD, data=x.data)
                for p in par_loop(M):
                    for c in range(CT):
                        xs[0, 0, p, c] = T.Cast(AD, off)
                    for c in range(C):
                        xs[0, 0, p, c] = T.Cast(AD, T.Cast("int32", xm[p, c]) + off)
            else:
                for p in par_loop(N * HP):
                    for xx, c in T.grid(WP, CT):
                        xs[p // HP, p % HP, xx, c] = T.Cast(AD, off)
                    if PT <= p % HP and p % HP < PT + H:
                        for gg, cl, xw in T.grid(G, CG, W):
                            xs[p // HP, p % HP, PL + xw, gg * CGP + cl] = T.Cast(
                                AD, T.Cast("int32", x[p // HP, gg * CG + cl, p % HP - PT, xw]) + off)
        else:
            xs = T.decl_buffer((1, 1, M, C), XD, data=x.data)
        # ---- tiled micro-kernel ---------------------------------------------------------
        for p in par_loop(NPAR):
            for t in range(NSEQ):
                q: T.let = p // OXT if PAR_OX else p
                oxt: T.let = p % OXT if PAR_OX else t
                obt: T.let = q % OBT
                oy: T.let = (q // OBT) % OH
                gi: T.let = (q // (OBT * OH)) % G
                n: T.let = q // (OBT * OH * G)
                ox0: T.let = T.min(oxt * R, OW - R)
                acc = T.alloc_buffer((R * J,), AV)
                for u in T.unroll(R * J):
                    acc[u] = _isa.zeros("int32", VL)
                for r, s, ch in T.grid(KH, KW, NCH):
                    if SUM16:
                        acc16 = T.alloc_buffer((R * J,), "int16x16")
                        for u in T.unroll(R * J):
                            acc16[u] = _isa.zeros("int16", 16)
                        for cc in range(TC):
                            for i in T.unroll(R):
                                a16: T.let = xs_word(xs, n, oy * SH + r * DH, (ox0 + i) * SW + s * DW,
                                                     gi * CGP + (ch * TC + cc) * KV)
                                for j in T.unroll(J):
                                    acc16[i * J + j] = dot(mode, acc16[i * J + j], a16,
                                                           wp.vload([gi, obt * J + j, r, s, ch * TC + cc, 0], WV))
                        for u in T.unroll(R * J):
                            acc[u] = acc[u] + _isa.pmaddwd(acc16[u], _isa.ones16())
                    else:
                        for cc in range(TC):
                            for i in T.unroll(R):
                                a: T.let = xs_word(xs, n, oy * SH + r * DH, (ox0 + i) * SW + s * DW,
                                                   gi * CGP + (ch * TC + cc) * KV)
                                for j in T.unroll(J):
                                    acc[i * J + j] = dot(mode, acc[i * J + j], a,
                                                         wp.vload([gi, obt * J + j, r, s, ch * TC + cc, 0], WV))
                # ---- epilogue: subtract the offset correction, write back ---------------
                if VEC_OUT:
                    om = T.decl_buffer((M, O), "int32", data=out.data)
                    for i in T.unroll(R):
                        for j in T.unroll(J):
                            om[ox0 + i, T.ramp((obt * J + j) * VL, 1, VL)] = (
                                acc[i * J + j] - corr[0, T.ramp((obt * J + j) * VL, 1, VL)])
                else:
                    tmp = T.alloc_buffer((R, J * VL), "int32")
                    for i in T.unroll(R):
                        for j in T.unroll(J):
                            tmp[i, T.ramp(j * VL, 1, VL)] = (
                                acc[i * J + j] - corr[gi, T.ramp((obt * J + j) * VL, 1, VL)])
                    if g.matmul:
                        om2 = T.decl_buffer((M, O), "int32", data=out.data)
                        for i, lane in T.grid(R, J * VL):
                            if obt * J * VL + lane < OG:
                                om2[ox0 + i, obt * J * VL + lane] = tmp[i, lane]
                    else:
                        for lane, i in T.grid(J * VL, R):
                            if obt * J * VL + lane < OG:
                                out[n, gi * OG + obt * J * VL + lane, oy, ox0 + i] = tmp[i, lane]

    return main
