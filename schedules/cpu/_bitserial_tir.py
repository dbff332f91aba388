"""TVMScript of the bit-serial kernel (design in :mod:`.bitserial`)."""
from __future__ import annotations

import math

from tvm.script import tirx as T

from ._isa import parallel_loop

from soniq_tvm import tvm_shim as tv


def _popc64(v, lanes):
    """Vector popcount as signed int64 (cast before any arithmetic: no ``sub nuw``)."""
    return tv.tirx.Cast(f"int64x{lanes}", tv.tirx.popcount(v))


def build(op, g, lay, knobs, coefs, off):
    par_loop = parallel_loop(op)
    R, J = knobs["R"], knobs["J"]
    VL, OB, OGP, CW, NPL = lay["vl"], lay["ob"], lay["ogp"], lay["cw"], lay["np"]
    A = op.a_bit
    N, C, H, W, O = g.n, g.c, g.h, g.w, g.o
    G, CG, OG, KH, KW, OH, OW = g.groups, g.cg, g.og, g.kh, g.kw, g.oh, g.ow
    (SH, SW), (DH, DW) = g.strides, g.dilation
    PT, PL, PB, PR = g.padding
    HP, WP = H + PT + PB, W + PL + PR
    CWT = G * CW
    OBT = OB // J
    OXT = math.ceil(OW / R)
    NT = N * G * OH * OBT
    PAR_OX = NT < 8 and OXT > 1
    NPAR = NT * (OXT if PAR_OX else 1)
    NSEQ = 1 if PAR_OX else OXT
    XD = op.a_dtype
    CHECK_O = OGP != OG
    BIPOLAR = bool(op.bipolar)
    AV = f"int64x{VL}"
    UV = f"uint64x{VL}"
    M = OW
    x_shape, out_shape = tuple(op.x_shape), tuple(op.out_shape)
    OFF_SET = off != 0  # the code of x = 0 is off = 2**(A-1): plane A-1 set
    PX = knobs.get("lanes") == "px"  # lanes over 8 output pixels, VL = output channels per task
    PV = 8
    PXT = math.ceil(OW / PV)
    PXV = f"int64x{PV}"
    assert off in (0, 1 << (A - 1))

    def coef(jp):
        # a constant once the unrolled loop variable is substituted
        e = tv.tirx.const(coefs[-1], "int64")
        for k in range(len(coefs) - 2, -1, -1):
            e = tv.tirx.Select(jp == k, tv.tirx.const(coefs[k], "int64"), e)
        return e

    def term(acc, a_vec, w_vec, i, jp, lanes=VL):
        scale = tv.tirx.Cast("int64", tv.tirx.shift_left(tv.tirx.const(1, "int32"), i)) * coef(jp)
        return acc + _popc64(a_vec & w_vec, lanes) * tv.tirx.Broadcast(scale, lanes)

    @T.prim_func
    def main(x: T.Buffer(x_shape, XD), wb: T.Buffer((G, OB, KH, KW, CW, NPL, VL), "uint64"),
             corr: T.Buffer((G, OGP), "int32"), out: T.Buffer(out_shape, "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        # ---- activation bit-planes: xb[n, y, word, plane, x] (x innermost: the
        # packing loop below is a vectorizable read-modify-write along x) ----------------
        xb = T.alloc_buffer((N, HP, CWT, A, WP), "uint64")
        if g.matmul:
            xm = T.decl_buffer((M, C), XD, data=x.data)
            for cw, i, p in T.grid(CWT, A, M):
                xb[0, 0, cw, i, p] = T.uint64(0)
            for c in range(C):
                for i, p in T.grid(A, M):
                    xb[0, 0, c // 64, i, p] = xb[0, 0, c // 64, i, p] | T.shift_left(
                        T.Cast("uint64", T.shift_right(T.Cast("int32", xm[p, c]) + off, i) & 1), T.Cast("uint64", c % 64))
        else:
            for p in par_loop(N * HP):
                for cwt, i, xx in T.grid(CWT, A, WP):
                    xb[p // HP, p % HP, cwt, i, xx] = T.uint64(0)
                # spatial padding holds the code of 0 (`off` = bit A-1 set), channel padding 0
                if OFF_SET:
                    for cwt, xx in T.grid(CWT, WP):
                        if (p % HP < PT or p % HP >= PT + H) or (xx < PL or xx >= PL + W):
                            xb[p // HP, p % HP, cwt, A - 1, xx] = T.if_then_else(
                                (cwt % CW) * 64 + 64 <= CG, T.bitwise_not(T.uint64(0)),
                                T.shift_left(T.uint64(1), T.Cast("uint64", (CG - (cwt % CW) * 64) % 64)) - T.uint64(1))
                if PT <= p % HP and p % HP < PT + H:
                    for gg, cl in T.grid(G, CG):
                        for i, xw in T.grid(A, W):
                            xb[p // HP, p % HP, gg * CW + cl // 64, i, PL + xw] = xb[
                                p // HP, p % HP, gg * CW + cl // 64, i, PL + xw] | T.shift_left(
                                T.Cast("uint64", T.shift_right(
                                    T.Cast("int32", x[p // HP, gg * CG + cl, p % HP - PT, xw]) + off, i) & 1),
                                T.Cast("uint64", cl % 64))
        # ---- pixel-lane micro-kernel: 8 output pixels per vector, the VL channels of one task
        # each a broadcast weight word (stride-1 convs at least 8 wide) -----------------------
        if PX:
            for p in par_loop(N * G * OH * OB):
                obt: T.let = p % OB
                oy: T.let = (p // OB) % OH
                gi: T.let = (p // (OB * OH)) % G
                n: T.let = p // (OB * OH * G)
                for t in range(PXT):
                    ox0: T.let = T.min(t * PV, OW - PV)
                    pacc = T.alloc_buffer((VL,), PXV)
                    for u in T.unroll(VL):
                        pacc[u] = T.Broadcast(T.int64(0), PV)
                    psum = T.alloc_buffer((1,), PXV)  # bipolar: sum of the activation codes
                    psum[0] = T.Broadcast(T.int64(0), PV)
                    for r, s, cw in T.grid(KH, KW, CW):
                        for ip in T.unroll(A):
                            xv: T.let = xb[n, oy * SH + r * DH, gi * CW + cw, ip, T.ramp(ox0 + s * DW, 1, PV)]
                            if BIPOLAR:
                                psum[0] = psum[0] + T.shift_left(_popc64(xv, PV), T.Broadcast(T.Cast("int64", ip), PV))
                            for j in T.unroll(VL):
                                for jp in T.unroll(NPL):
                                    wv: T.let = T.Broadcast(wb[gi, obt, r, s, cw, jp, j], PV)
                                    pacc[j] = term(pacc[j], xv, wv, ip, jp, PV)
                    for j in T.unroll(VL):
                        if obt * VL + j < OG:
                            out[n, gi * OG + obt * VL + j, oy, T.ramp(ox0, 1, PV)] = T.Cast(
                                f"int32x{PV}", pacc[j] - psum[0]) - T.Broadcast(corr[gi, obt * VL + j], PV)
        else:
            # ---- tiled popcount micro-kernel ----------------------------------------------------
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
                        acc[u] = T.Broadcast(T.int64(0), VL)
                    xsum = T.alloc_buffer((R,), "int64")  # bipolar: sum of the activation codes
                    for i in T.unroll(R):
                        xsum[i] = T.int64(0)
                    for r, s, cw in T.grid(KH, KW, CW):
                        for i in T.unroll(R):
                            for ip in T.unroll(A):
                                aw: T.let = xb[n, oy * SH + r * DH, gi * CW + cw, ip, (ox0 + i) * SW + s * DW]
                                if BIPOLAR:
                                    xsum[i] = xsum[i] + T.shift_left(T.Cast("int64", T.popcount(aw)),
                                                                     T.Cast("int64", ip))
                                for j in T.unroll(J):
                                    for jp in T.unroll(NPL):
                                        wv: T.let = wb[gi, obt * J + j, r, s, cw, jp, T.ramp(0, 1, VL)]
                                        acc[i * J + j] = term(acc[i * J + j], T.Broadcast(aw, VL), wv, ip, jp)
                    tmp = T.alloc_buffer((R, J * VL), "int32")
                    for i in T.unroll(R):
                        for j in T.unroll(J):
                            tmp[i, T.ramp(j * VL, 1, VL)] = T.Cast(f"int32x{VL}", acc[i * J + j] - T.Broadcast(
                                xsum[i], VL)) - corr[
                                gi, T.ramp((obt * J + j) * VL, 1, VL)]
                    if g.matmul:
                        om = T.decl_buffer((M, O), "int32", data=out.data)
                        for i, lane in T.grid(R, J * VL):
                            if obt * J * VL + lane < OG:
                                om[ox0 + i, obt * J * VL + lane] = tmp[i, lane]
                    else:
                        for lane, i in T.grid(J * VL, R):
                            if obt * J * VL + lane < OG:
                                out[n, gi * OG + obt * J * VL + lane, oy, ox0 + i] = tmp[i, lane]

    return main
