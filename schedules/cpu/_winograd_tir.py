"""TVMScript of the integer Winograd F(2x2, 3x3) kernel (see :mod:`.winograd`).

Three stages, top to bottom: the input transform into 32-bit words of 4 channels,
the 16 batched channel reductions on the dot-product micro-kernel, the output
transform and write-back. Small scratch buffers stay under 1 KiB (TVM keeps those
on the stack, where LLVM promotes them to registers) and are scalar-typed, read and
written a vector row at a time (``_isa.row``), as in the int8-dot kernel.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from soniq_tvm import tvm_shim as tv

from . import _isa
from ._int8dot_tir import clamp_start, split_tile, zero_tile

tirx = tv.tirx


def _vec(base, lanes: int):
    """Index of ``lanes`` consecutive elements from ``base`` (a scalar index for one)."""
    return base if lanes == 1 else T.ramp(base, 1, lanes)


def build(op, g, mode, lay, knobs, dot, off):
    """``off``: the shift of the transformed activations into u8 (``-min V``)."""
    R, J = knobs["R"], knobs["J"]
    RA, RB = split_tile(R)
    VL, KV = mode.vl, mode.kv
    N, C, H, W, O, OH, OW = g.n, g.c, g.h, g.w, g.o, g.oh, g.ow
    PT, PL, _, _ = g.padding
    TY, TX, NT, CB = lay["ty"], lay["tx"], lay["tiles"], lay["cb"]
    OBT, OP, WD = lay["ob"] // J, lay["op"], mode.w_dtype
    HP, WP = 2 * TY + 2, 2 * TX + 3  # the zero-padded plane every tile reads from (+1 spare column)
    XD = op.a_dtype
    Z = op.a_zero
    XL = min(VL, 1 << (TX.bit_length() - 1))  # tiles per input-transform vector
    XI = "int32" if XL == 1 else f"int32x{XL}"
    XU = "uint32" if XL == 1 else f"uint32x{XL}"
    CH_PAD = CB * KV != C
    ABC = f"{mode.a_dtype}x{VL * KV}"
    WV = f"{mode.w_dtype}x{VL * KV}"
    NTB = math.ceil(NT / R)
    NPAR = N * OBT * NTB
    par = _isa.parallel_loop(op)
    INTERLEAVE = [k // 2 + (k % 2) * VL for k in range(2 * VL)]  # y0[0] y1[0] y0[1] y1[1] ...
    FULL_O = OP == O
    copy_rows = min(H, HP - PT)  # input rows inside the padded plane
    copy_cols = min(W, WP - PL)

    def const_vec(v, dtype=XI):
        return tirx.const(v, dtype) if XL == 1 else tirx.Broadcast(tirx.const(v, dtype.split("x")[0]), XL)

    def tap(xp, n, c, y, x0):
        """``XL`` activations minus the zero point, every other column from ``x0``: one
        load of ``2 XL`` (a whole vector: the plane has a spare column) and a shuffle."""
        if XL == 1:
            v = xp[n, c, y, x0]
        else:
            v = tirx.Shuffle([xp.vload([n, c, y, x0], f"{XD}x{2 * XL}")], [2 * k for k in range(XL)])
        return tirx.Cast(XI, v) - const_vec(Z)

    def put(word, v, c, k):
        """``word`` with byte ``k`` set to ``v + off`` (0 + off for a padding channel)."""
        if CH_PAD:
            v = tirx.Select(c < C, v, const_vec(0))
        u = tirx.Cast(XU, v + const_vec(off))
        sh = tirx.Cast("uint32", k * 8)
        return tirx.bitwise_or(word, tirx.shift_left(u, sh if XL == 1 else tirx.Broadcast(sh, XL)))

    def row(buf, k, lanes=XL):
        return buf[k] if lanes == 1 else _isa.row(buf, k, lanes)

    @T.macro
    def column_transform(dst, xp, n, c, y, x0):
        """Row ``y`` of a tile times ``B``: ``dst[j] = (d B)[j]`` for ``XL`` tiles."""
        dst[_vec(0 * XL, XL)] = tap(xp, n, c, y, x0) - tap(xp, n, c, y, x0 + 2)
        dst[_vec(1 * XL, XL)] = tap(xp, n, c, y, x0 + 1) + tap(xp, n, c, y, x0 + 2)
        dst[_vec(2 * XL, XL)] = tap(xp, n, c, y, x0 + 2) - tap(xp, n, c, y, x0 + 1)
        dst[_vec(3 * XL, XL)] = tap(xp, n, c, y, x0 + 1) - tap(xp, n, c, y, x0 + 3)

    @T.macro
    def micro(acc, i0, rn, vt, wp, n, e, t0, obt):
        for q in range(CB):
            for i in T.unroll(rn):
                a: T.let = tirx.reinterpret(ABC, tirx.Broadcast(vt[n, e, q, t0 + i0 + i], VL))
                for j in T.unroll(J):
                    acc[T.ramp((i * J + j) * VL, 1, VL)] = dot(mode, _isa.row(acc, i * J + j, VL), a,
                                                               wp.vload([e, obt, q, j, 0], WV))

    @T.macro
    def keep(mloc, acc, i0, rn, e):
        for i in T.unroll(rn):
            for j in T.unroll(J):
                mloc[T.ramp(((e * R + i0 + i) * J + j) * VL, 1, VL)] = _isa.row(acc, i * J + j, VL)

    def mrow(mloc, e, i, j):
        return mloc[T.ramp(((e * R + i) * J + j) * VL, 1, VL)]

    @T.prim_func
    def main(x: T.Buffer((N, C, H, W), XD), wp: T.Buffer((16, OBT, CB, J, VL * KV), WD),
             corr: T.Buffer((4, OP), "int32"), out: T.Buffer((N, O, OH, OW), "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        # ---- the padded plane: codes, the zero point around them --------------------------
        xp = T.alloc_buffer((N, C, HP, WP), XD)
        for p in par(N * C):
            for yy, xx in T.grid(HP, WP):
                xp[p // C, p % C, yy, xx] = T.Cast(XD, Z)
            for yy, xx in T.grid(copy_rows, copy_cols):
                xp[p // C, p % C, PT + yy, PL + xx] = x[p // C, p % C, yy, xx]
        # ---- input transform: V = B^T d B, + off, 4 channels to a word --------------------
        vt = T.alloc_buffer((N, 16, CB, NT), "int32")
        for p in par(N * TY):
            n: T.let = p // TY
            ty: T.let = p % TY
            for q, xb in T.grid(CB, (TX + XL - 1) // XL):
                tx0: T.let = clamp_start(xb, XL, TX)
                w0 = T.alloc_buffer((4 * XL,), "int32")
                w1 = T.alloc_buffer((4 * XL,), "int32")
                w2 = T.alloc_buffer((4 * XL,), "int32")
                w3 = T.alloc_buffer((4 * XL,), "int32")
                wd0 = T.alloc_buffer((4 * XL,), "uint32")
                wd1 = T.alloc_buffer((4 * XL,), "uint32")
                wd2 = T.alloc_buffer((4 * XL,), "uint32")
                wd3 = T.alloc_buffer((4 * XL,), "uint32")
                for j in T.unroll(4):
                    wd0[_vec(j * XL, XL)] = const_vec(0, XU)
                    wd1[_vec(j * XL, XL)] = const_vec(0, XU)
                    wd2[_vec(j * XL, XL)] = const_vec(0, XU)
                    wd3[_vec(j * XL, XL)] = const_vec(0, XU)
                for k in T.unroll(KV):
                    c: T.let = T.min(q * KV + k, C - 1)
                    column_transform(w0, xp, n, c, 2 * ty, 2 * tx0)
                    column_transform(w1, xp, n, c, 2 * ty + 1, 2 * tx0)
                    column_transform(w2, xp, n, c, 2 * ty + 2, 2 * tx0)
                    column_transform(w3, xp, n, c, 2 * ty + 3, 2 * tx0)
                    for j in T.unroll(4):  # B^T (d B): rows of the tile combined
                        wd0[_vec(j * XL, XL)] = put(row(wd0, j), row(w0, j) - row(w2, j), q * KV + k, k)
                        wd1[_vec(j * XL, XL)] = put(row(wd1, j), row(w1, j) + row(w2, j), q * KV + k, k)
                        wd2[_vec(j * XL, XL)] = put(row(wd2, j), row(w2, j) - row(w1, j), q * KV + k, k)
                        wd3[_vec(j * XL, XL)] = put(row(wd3, j), row(w1, j) - row(w3, j), q * KV + k, k)
                for j in T.unroll(4):
                    vt[n, j, q, _vec(ty * TX + tx0, XL)] = T.reinterpret(XI, row(wd0, j))
                    vt[n, 4 + j, q, _vec(ty * TX + tx0, XL)] = T.reinterpret(XI, row(wd1, j))
                    vt[n, 8 + j, q, _vec(ty * TX + tx0, XL)] = T.reinterpret(XI, row(wd2, j))
                    vt[n, 12 + j, q, _vec(ty * TX + tx0, XL)] = T.reinterpret(XI, row(wd3, j))
        # ---- 16 channel reductions per tile block, then A^T M A ---------------------------
        for p in par(NPAR):
            n: T.let = p // (OBT * NTB)
            obt: T.let = (p // NTB) % OBT
            t0: T.let = clamp_start(p % NTB, R, NT)
            mloc = T.alloc_buffer((16 * R * J * VL,), "int32")
            for e in range(16):
                acc0 = T.alloc_buffer((RA * J * VL,), "int32")
                acc1 = T.alloc_buffer((max(RB, 1) * J * VL,), "int32")
                zero_tile(acc0, acc1, RA * J, RB * J, VL)
                micro(acc0, 0, RA, vt, wp, n, e, t0, obt)
                micro(acc1, RA, RB, vt, wp, n, e, t0, obt)
                keep(mloc, acc0, 0, RA, e)
                keep(mloc, acc1, RA, RB, e)
            for i in range(R):
                t: T.let = t0 + i
                oy: T.let = (t // TX) * 2
                ox: T.let = (t % TX) * 2
                for j in T.unroll(J):
                    oc: T.let = (obt * J + j) * VL
                    pb = T.alloc_buffer((8 * VL,), "int32")
                    yb = T.alloc_buffer((4 * VL,), "int32")
                    for b in T.unroll(4):  # A^T M
                        pb[T.ramp(b * VL, 1, VL)] = mrow(mloc, b, i, j) + mrow(mloc, 4 + b, i, j) + mrow(
                            mloc, 8 + b, i, j)
                        pb[T.ramp((4 + b) * VL, 1, VL)] = mrow(mloc, 4 + b, i, j) - mrow(mloc, 8 + b, i, j) - mrow(
                            mloc, 12 + b, i, j)
                    for r in T.unroll(2):  # (A^T M) A, the offset's share removed, / 4; pixels interleaved
                        yb[T.ramp(2 * r * VL, 1, 2 * VL)] = T.Shuffle([T.shift_right(
                            _isa.row(pb, 4 * r, VL) + _isa.row(pb, 4 * r + 1, VL) + _isa.row(pb, 4 * r + 2, VL)
                            - corr[2 * r, T.ramp(oc, 1, VL)], _isa.splat(2, VL)), T.shift_right(
                            _isa.row(pb, 4 * r + 1, VL) - _isa.row(pb, 4 * r + 2, VL) - _isa.row(pb, 4 * r + 3, VL)
                            - corr[2 * r + 1, T.ramp(oc, 1, VL)], _isa.splat(2, VL))], INTERLEAVE)
                    if (FULL_O or oc + VL <= O) and oy + 1 < OH and ox + 1 < OW:
                        for lane, dy in T.grid(VL, 2):  # a whole tile: two pixels a store
                            out[n, oc + lane, oy + dy, T.ramp(ox, 1, 2)] = yb[T.ramp((dy * VL + lane) * 2, 1, 2)]
                    else:
                        for lane, dy, dx in T.grid(VL, 2, 2):
                            if oc + lane < O and oy + dy < OH and ox + dx < OW:
                                out[n, oc + lane, oy + dy, ox + dx] = yb[(dy * VL + lane) * 2 + dx]

    return main
