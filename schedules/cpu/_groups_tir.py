"""TVMScript of the scale-group matmul (see :mod:`.groups`).

One kernel for the ``NG`` activation scale groups of a matmul layer, reading the
layer's input ``x[M, K]`` once:

1. **re-layout** each group's channels (``cols[meta[g, 0] ..]``, a constant: the
   gather runs here) into the dot-product operand ``xs`` (shifted by the group's
   offset, padded to whole 32-bit words with its fill value), the groups one after
   the other;
2. per task (``R`` rows x ``J`` vectors of outputs), per group: the int8-dot
   micro-kernel over the group's words into int32 accumulators, then
   ``float(acc - corr_g) * scale_g`` added to the tile's float sum (the first group
   sets it): the float operations of the separate kernels' combine, in the same
   order, so the result is bit-identical;
3. the float tile stored once.

``meta[g]`` = (first entry in ``cols``, channels, first column in ``xs``, words of
the group in ``xs``, offset, fill).
"""
from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from soniq_tvm import tvm_shim as tv

from . import _isa
from ._int8dot_tir import clamp_start, split_tile, zero_tile

tirx = tv.tirx


def build(mode, ng: int, m: int, k: int, kg: int, n: int, cbt: int, obt: int, knobs: dict, x_shape,
          x_dtype: str, dot, par, par_relayout, gather: bool, lanes=None):
    """``k`` channels in ``x``, ``kg`` of them read by the groups (``cols``: which, group
    after group; ``gather`` False: the identity, read in place). ``lanes``: when
    given, the gather of a whole row in one constant shuffle: ``xs[p] = (shuffle(x[p],
    lanes) & info[1]) + info[0]`` (``info``: per ``xs`` column the offset or, for a
    padding column, the fill, and a mask clearing the padding)."""
    R, J = knobs["R"], knobs["J"]
    RA, RB = split_tile(R)
    VL, KV = mode.vl, mode.kv
    AD, WD = mode.a_dtype, mode.w_dtype
    OGP = obt * J * VL
    NTB = (m + R - 1) // R
    CT = cbt * KV
    CHECK_N = OGP != n
    ABC = f"{AD}x{VL * KV}"
    AW = f"{AD}x{KV}"
    WV = f"{WD}x{VL * KV}"
    FV = f"float32x{VL}"
    out_shape = tuple(x_shape[:-1]) + (n,)
    ROW_SHUFFLE = lanes is not None
    XV, AV = f"{x_dtype}x{k}", f"{AD}x{CT}"
    COPIES = -(-CT // k)  # a shuffle gives at most as many lanes as its sources hold

    def widen(v):
        """Input bytes as operand elements: the same bits (u8 operands: the offset's add
        wraps alike), or sign- or zero-extended into int16 ``avx2-wide`` operands."""
        same = np.dtype(AD).itemsize == np.dtype(x_dtype).itemsize
        return T.reinterpret(AV, v) if same else T.Cast(AV, v)

    @T.macro
    def steps(acc, i0, rn, xs, wp, m0, obt_, cb):
        for i in T.unroll(rn):
            a: T.let = _isa.bcast_word(xs.vload([m0 + i0 + i, cb * KV], AW), VL, ABC)
            for j in T.unroll(J):
                acc[T.ramp((i * J + j) * VL, 1, VL)] = dot(mode, _isa.row(acc, i * J + j, VL), a,
                                                           wp.vload([obt_, cb, j, 0], WV))

    @T.macro
    def combine(fsum, acc, rn, corr, scale, g, obt_):
        for i in T.unroll(rn):
            for j in T.unroll(J):
                term: T.let = _isa.fenced(T.Cast(FV, _isa.row(acc, i * J + j, VL) - corr[g, T.ramp(
                    (obt_ * J + j) * VL, 1, VL)]) * scale[g, T.ramp((obt_ * J + j) * VL, 1, VL)], FV)
                fsum[T.ramp((i * J + j) * VL, 1, VL)] = T.Select(
                    g == 0, term, fsum[T.ramp((i * J + j) * VL, 1, VL)] + term)

    @T.macro
    def store(dst, fsum, i0, rn, m0, obt_):
        for i in T.unroll(rn):
            for j in T.unroll(J):
                if CHECK_N:
                    for lane in range(VL):
                        if (obt_ * J + j) * VL + lane < n:
                            dst[m0 + i0 + i, (obt_ * J + j) * VL + lane] = fsum[(i * J + j) * VL + lane]
                else:
                    dst[m0 + i0 + i, T.ramp((obt_ * J + j) * VL, 1, VL)] = fsum[T.ramp((i * J + j) * VL, 1, VL)]

    @T.macro
    def relayout_row(xs, xm, cols, meta, p):
        for g in range(ng):
            x0: T.let = meta[g, 0]
            width: T.let = meta[g, 1]
            s0: T.let = meta[g, 2]
            for c in range(width):
                if gather:
                    xs[p, s0 + c] = T.Cast(AD, T.Cast("int32", xm[p, cols[x0 + c]]) + meta[g, 4])
                else:
                    xs[p, s0 + c] = T.Cast(AD, T.Cast("int32", xm[p, x0 + c]) + meta[g, 4])
            for c in range(meta[g, 3] * KV - width):
                xs[p, s0 + width + c] = T.Cast(AD, meta[g, 5])

    @T.prim_func
    def main(x: T.Buffer(x_shape, x_dtype), cols: T.Buffer((kg,), "int32"), info: T.Buffer((2, CT), AD),
             meta: T.Buffer((ng, 6), "int32"),
             wp: T.Buffer((obt, cbt, J, VL * KV), WD),
             corr: T.Buffer((ng, OGP), "int32"), scale: T.Buffer((ng, OGP), "float32"),
             out: T.Buffer(out_shape, "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        xm = T.decl_buffer((m, k), x_dtype, data=x.data)
        om = T.decl_buffer((m, n), "float32", data=out.data)
        xs = T.alloc_buffer((m, CT), AD)
        for p in par_relayout(m):
            if ROW_SHUFFLE:
                xs[p, T.ramp(0, 1, CT)] = T.bitwise_and(
                    widen(tirx.Shuffle([xm.vload([p, 0], XV)] * COPIES, lanes)), info.vload([1, 0], AV)) \
                    + info.vload([0, 0], AV)
            else:
                relayout_row(xs, xm, cols, meta, p)
        for p in par(obt * NTB):
            ob: T.let = p // NTB
            m0: T.let = clamp_start(p % NTB, R, m)
            f0 = T.alloc_buffer((RA * J * VL,), "float32")
            f1 = T.alloc_buffer((max(RB, 1) * J * VL,), "float32")
            for g in range(ng):
                acc0 = T.alloc_buffer((RA * J * VL,), "int32")
                acc1 = T.alloc_buffer((max(RB, 1) * J * VL,), "int32")
                zero_tile(acc0, acc1, RA * J, RB * J, VL)
                w0: T.let = meta[g, 2] // KV
                for cb in range(meta[g, 3]):
                    steps(acc0, 0, RA, xs, wp, m0, ob, w0 + cb)
                    steps(acc1, RA, RB, xs, wp, m0, ob, w0 + cb)
                combine(f0, acc0, RA, corr, scale, g, ob)
                combine(f1, acc1, RB, corr, scale, g, ob)
            store(om, f0, 0, RA, m0, ob)
            store(om, f1, RA, RB, m0, ob)

    return main
