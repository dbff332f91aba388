"""TVMScript of the packed low-bit kernel (design in :mod:`.lowbit`).

Same skeleton as :mod:`._int8dot_tir`: activation re-layout (here to the *signed*
byte operand, plus per-pixel channel sums), then an ``R`` x ``J`` register tile
whose packed weight vectors are expanded field by field right before the dot
product. Per-field constants (mask, shift, exponent) are written as ``Select``
chains on the unrolled field index; they fold to constants once it is unrolled.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from soniq_tvm import tvm_shim as tv

from . import _isa

tirx = tv.tirx


def _sel(idx, values, dtype):
    """``values[idx]`` for an unrolled loop variable (folds to a constant)."""
    e = tirx.const(values[-1], dtype)
    for k in range(len(values) - 2, -1, -1):
        e = tirx.Select(idx == k, tirx.const(values[k], dtype), e)
    return e


def _dot(mode, acc, w_u8, a_s8):
    """``acc + sum of 4 (u8 weight x s8 activation) products`` per int32 lane."""
    if mode.name == "vnni512":
        return _isa.vpdpbusd512(acc, w_u8, a_s8)
    if mode.name == "vnni256":
        return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", acc, w_u8, a_s8)
    return acc + _isa.pmaddwd(_isa.pmaddubsw(w_u8, a_s8), _isa.ones16())


def build(op, g, mode, lay, knobs, flds, sz, off):
    R, JP = knobs["R"], knobs["JP"]
    F, J, OBT, OGP, CB, CGP = lay["F"], lay["J"], lay["obt"], lay["ogp"], lay["cb"], lay["cgp"]
    VL = mode.vl
    FH = F // 2
    NB = VL * 4
    S, Z = sz
    par_loop = _isa.parallel_loop(op)
    if R * J * VL * 2 >= 1024:
        raise ValueError(f"tile R={R} J={J} needs 2 x {R * J * VL * 2} bytes of accumulators (< 1024 each stay "
                         "in registers)")
    N, C, H, W, O = g.n, g.c, g.h, g.w, g.o
    G, CG, OG, KH, KW, OH, OW = g.groups, g.cg, g.og, g.kh, g.kw, g.oh, g.ow
    (SH, SW), (DH, DW) = g.strides, g.dilation
    PT, PL, PB, PR = g.padding
    HP, WP = H + PT + PB, W + PL + PR
    CT = G * CGP
    OXT = math.ceil(OW / R)
    NT = N * G * OH * OBT
    PAR_OX = NT < 8 and OXT > 1
    NPAR = NT * (OXT if PAR_OX else 1)
    NSEQ = 1 if PAR_OX else OXT
    XD = op.a_dtype
    RELAYOUT = not (g.matmul and off == 0 and CGP == C)
    PSUM = Z != 0
    CHECK_O = OGP != OG
    VEC_OUT = g.matmul and not CHECK_O
    par_relayout = _isa.parallel_pass(op, N * HP * WP * CT)
    WV = f"uint8x{NB}"
    AB = f"int8x{NB}"
    AV = f"int32x{VL}"
    M = OW
    x_shape, out_shape = tuple(op.x_shape), tuple(op.out_shape)
    wp_shape = (G, OBT, KH, KW, CB, JP, NB)
    shifts = [s for s, _, _ in flds]
    masks = [m for _, m, _ in flds]
    exps = [e for _, _, e in flds]

    def field(pk, f):
        sh = tirx.Broadcast(_sel(f, shifts, "uint8"), NB)
        return tirx.bitwise_and(tirx.shift_right(pk, sh), tirx.Broadcast(_sel(f, masks, "uint8"), NB))

    def finish(acc, f, asum, corr):
        """``s * (acc >> e_f) - z * sum(xs) - off * sum(w)``."""
        return (tirx.shift_right(acc, tirx.Broadcast(_sel(f, exps, "int32"), VL)) * tirx.Broadcast(
            tirx.const(S, "int32"), VL) - tirx.Broadcast(asum * Z, VL) - corr)

    def xs_word(xs, n, yy, xx, c):
        return _isa.bcast_word(xs.vload([n, yy, xx, c], f"{xs.dtype}x4"), VL, AB)

    @T.prim_func
    def main(x: T.Buffer(x_shape, XD), wp: T.Buffer(wp_shape, "uint8"), corr: T.Buffer((G, OGP), "int32"),
             out: T.Buffer(out_shape, "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        # ---- activations: signed byte operand, channels last; spatial padding holds
        # `off` (the code of x = 0), channel padding 0 -----------------------------------
        if RELAYOUT:
            xs = T.alloc_buffer((N, HP, WP, CT), "int8")
            if g.matmul:
                xm = T.decl_buffer((M, C), XD, data=x.data)
                for p in par_relayout(M):
                    for c in range(CT):
                        xs[0, 0, p, c] = T.int8(0)
                    for c in range(C):
                        xs[0, 0, p, c] = T.Cast("int8", T.Cast("int32", xm[p, c]) + off)
            else:
                for p in par_relayout(N * HP):
                    for xx, gg, cl in T.grid(WP, G, CGP):
                        xs[p // HP, p % HP, xx, gg * CGP + cl] = T.Cast("int8", T.if_then_else(cl < CG, off, 0))
                    if PT <= p % HP and p % HP < PT + H:
                        for gg, cl, xw in T.grid(G, CG, W):
                            xs[p // HP, p % HP, PL + xw, gg * CGP + cl] = T.Cast(
                                "int8", T.Cast("int32", x[p // HP, gg * CG + cl, p % HP - PT, xw]) + off)
        else:
            xs = T.decl_buffer((1, 1, M, C), XD, data=x.data)
        # ---- per-pixel channel sums of the operand (the z * sum(xs) term) ---------------
        psum = T.alloc_buffer((N, HP, WP, G), "int32")
        if PSUM:
            for p in par_relayout(N * HP):
                for xx, gg in T.grid(WP, G):
                    psum[p // HP, p % HP, xx, gg] = 0
                    for cl in range(CGP if RELAYOUT else C):
                        psum[p // HP, p % HP, xx, gg] = psum[p // HP, p % HP, xx, gg] + T.Cast(
                            "int32", xs[p // HP, p % HP, xx, gg * CGP + cl])
        # ---- tiled micro-kernel ---------------------------------------------------------------
        for p in par_loop(NPAR):
            for t in range(NSEQ):
                q: T.let = p // OXT if PAR_OX else p
                oxt: T.let = p % OXT if PAR_OX else t
                obt: T.let = q % OBT
                oy: T.let = (q // OBT) % OH
                gi: T.let = (q // (OBT * OH)) % G
                n: T.let = q // (OBT * OH * G)
                ox0: T.let = T.min(oxt * R, OW - R)
                # two accumulator buffers (fields below / above F/2): each must stay
                # under TVM's 1 KiB stack-allocation limit to live in registers
                acc0 = T.alloc_buffer((R * JP * FH,), AV)
                acc1 = T.alloc_buffer((R * JP * FH,), AV)
                for u in T.unroll(R * JP * FH):
                    acc0[u] = _isa.zeros("int32", VL)
                    acc1[u] = _isa.zeros("int32", VL)
                for r, s, cb in T.grid(KH, KW, CB):
                    for jp in T.unroll(JP):
                        pk: T.let = wp.vload([gi, obt, r, s, cb, jp, 0], WV)
                        for fh in T.unroll(FH):
                            w0: T.let = field(pk, fh)
                            for i in T.unroll(R):
                                acc0[(i * JP + jp) * FH + fh] = _dot(
                                    mode, acc0[(i * JP + jp) * FH + fh], w0,
                                    xs_word(xs, n, oy * SH + r * DH, (ox0 + i) * SW + s * DW, gi * CGP + cb * 4))
                        for fh in T.unroll(FH):
                            w1: T.let = field(pk, fh + FH)
                            for i in T.unroll(R):
                                acc1[(i * JP + jp) * FH + fh] = _dot(
                                    mode, acc1[(i * JP + jp) * FH + fh], w1,
                                    xs_word(xs, n, oy * SH + r * DH, (ox0 + i) * SW + s * DW, gi * CGP + cb * 4))
                # ---- epilogue: unscale the fields, remove z*sum(xs) and off*sum(w) -----------
                asum = T.alloc_buffer((R,), "int32")
                for i in T.unroll(R):
                    asum[i] = 0
                    if PSUM:
                        for r, s in T.grid(KH, KW):
                            asum[i] = asum[i] + psum[n, oy * SH + r * DH, (ox0 + i) * SW + s * DW, gi]
                tmp = T.alloc_buffer((R, J * VL), "int32")
                for i in T.unroll(R):
                    for jp, fh in T.grid(JP, FH):
                        tmp[i, T.ramp((jp * F + fh) * VL, 1, VL)] = finish(
                            acc0[(i * JP + jp) * FH + fh], fh, asum[i], corr[gi, T.ramp(
                                (obt * J + jp * F + fh) * VL, 1, VL)])
                        tmp[i, T.ramp((jp * F + FH + fh) * VL, 1, VL)] = finish(
                            acc1[(i * JP + jp) * FH + fh], fh + FH, asum[i], corr[gi, T.ramp(
                                (obt * J + jp * F + FH + fh) * VL, 1, VL)])
                if VEC_OUT:
                    om = T.decl_buffer((M, O), "int32", data=out.data)
                    for i in T.unroll(R):
                        for j in T.unroll(J):
                            om[ox0 + i, T.ramp((obt * J + j) * VL, 1, VL)] = tmp[i, T.ramp(j * VL, 1, VL)]
                elif g.matmul:
                    om2 = T.decl_buffer((M, O), "int32", data=out.data)
                    for i, lane in T.grid(R, J * VL):
                        if obt * J * VL + lane < OG:
                            om2[ox0 + i, obt * J * VL + lane] = tmp[i, lane]
                else:
                    for lane, i in T.grid(J * VL, R):
                        if obt * J * VL + lane < OG:
                            out[n, gi * OG + obt * J * VL + lane, oy, ox0 + i] = tmp[i, lane]

    return main
