"""TVMScript of the lookup-table kernel (design and bounds in :mod:`.lut`).

Two phases: the tables (per row and group of 4 reduction values, the 16 partial
sums of the shifted activations, split into a low and a high byte table), then
the tiled lookup kernel: per weight bit-plane, chunks of groups whose 16-bit
partial sums are proven exact, widened into the int32 output rows at the end of
each chunk. The table lookups are the only target-specific instructions: they
are wrapped here (``vpshufb`` zmm / ymm, NEON ``tbl``), not in :mod:`._isa`.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from soniq_tvm import tvm_shim as tv

from . import _isa

GROUP = _isa.LUT_GROUP

tirx = tv.tirx

TABLE_BLOCK = 64  # groups per iteration of the (parallel) table build
MIN_PARALLEL_TABLES = 1024  # groups below which the table build stays serial

_LOOKUP = {  # mode -> (LLVM intrinsic, vector bytes)
    "pshufb512": ("llvm.x86.avx512.pshuf.b.512", 64),
    "pshufb256": ("llvm.x86.avx2.pshuf.b", 32),
    "tbl128": ("llvm.aarch64.neon.tbl1.v16i8", 16),
}


def lookup(mode: str, table, idx):
    """Per byte ``table[idx]`` (16-entry table per 128-bit lane; idx in [0, 16))."""
    name, vb = _LOOKUP[mode]
    return tirx.call_llvm_pure_intrin(f"uint8x{vb}", name, table, idx)


def bcast_table(vec16, vb: int):
    """A 16-byte table repeated in every 128-bit lane (``vbroadcasti32x4``)."""
    if vb == 16:
        return vec16
    return tirx.Shuffle([vec16] * (vb // 16), [tirx.const(i, "int32") for i in range(vb)])


def madd_pairs(mode: str, a_u8, coef_s8):
    """``a[2q] * coef[2q] + a[2q+1] * coef[2q+1]`` as int16 (``vpmaddubsw``; saturating:
    callers keep it below 2**15)."""
    _, vb = _LOOKUP[mode]
    name = "llvm.x86.avx512.pmaddubs.w.512" if vb == 64 else "llvm.x86.avx2.pmadd.ub.sw"
    return tirx.call_llvm_pure_intrin(f"int16x{vb // 2}", name, a_u8, coef_s8)


def _u(value: int, dtype: str, lanes: int):
    return tirx.Broadcast(tirx.const(value, dtype), lanes)


def pair_coef(vb: int):
    """int8 (1, 2, 1, 2, ...): a pair's planes j and j+1 weigh 1 and 2."""
    ramp = tirx.Ramp(tirx.const(0, "int32"), tirx.const(1, "int32"), vb)
    return tirx.Cast(f"int8x{vb}", tirx.bitwise_and(ramp, _u(1, "int32", vb)) + _u(1, "int32", vb))


def nibbles(pk, vb: int):
    """The nibble vectors of groups 2gp (low bits) and 2gp+1 (high bits)."""
    return tirx.bitwise_and(pk, _u(15, "uint8", vb)), tirx.shift_right(pk, _u(4, "uint8", vb))


def accumulate_low(mode: str, pair: bool, a, b, l0, l1):
    """New ``(A, B)`` after the low-byte lookups ``l0, l1`` (see :mod:`.lut`): a pair
    adds ``L_j + 2 L_j+1`` (``vpmaddubsw``); a single adds the lookups as 16-bit
    words to ``A`` and their odd bytes to ``B``."""
    _, vb = _LOOKUP[mode]
    u16 = f"uint16x{vb // 2}"
    if pair:
        return a + tirx.reinterpret(u16, madd_pairs(mode, l0, pair_coef(vb))) + tirx.reinterpret(
            u16, madd_pairs(mode, l1, pair_coef(vb))), b
    w0, w1 = tirx.reinterpret(u16, l0), tirx.reinterpret(u16, l1)
    eight = _u(8, "uint16", vb // 2)
    return a + w0 + w1, b + tirx.shift_right(w0, eight) + tirx.shift_right(w1, eight)


def build(op, mode: str, lay: dict, sz: tuple[int, int], off: int, hi: bool):
    R, JB = lay["R"], lay["JB"]
    _, VB = _LOOKUP[mode]
    VH = VB // 2
    M, K, N = lay["M"], lay["K"], lay["N"]
    KG, GP, NT, CT, NP, L = lay["KG"], lay["GP"], lay["NT"], lay["CT"], lay["NP"], lay["L"]
    RUNS = [dict(r) for r in lay["runs"]]
    NR = len(RUNS)
    assert 1 <= NR <= 2, RUNS
    RUN0, RUN1 = RUNS[0], RUNS[-1]
    NMT = math.ceil(M / R)
    S, Z = sz
    KB = math.ceil(KG / TABLE_BLOCK)
    NVMAX = max(r["nvec"] for r in RUNS)
    if R * NVMAX * VB >= 1024:
        raise ValueError(f"tile R={R} JB={JB} needs {R * NVMAX * VB} bytes per partial-sum buffer "
                         "(< 1024 stay in registers)")
    par = _isa.parallel_loop(op)
    table_loop = T.parallel if par is T.parallel and M * KG >= MIN_PARALLEL_TABLES else T.serial
    XD = op.a_dtype
    U8, U16, I32 = f"uint8x{VB}", f"uint16x{VH}", f"int32x{VH}"
    x_shape, out_shape = tuple(op.x_shape), tuple(op.out_shape)
    TH_SHAPE = (M, KG, 16) if hi else (1, 1, 16)

    def xval(xm, m, k):
        """Shifted activation ``x + off`` (0 in the reduction padding)."""
        return T.if_then_else(k < K, T.Cast("int32", xm[m, k]) + off, 0)

    def table(xm, m, g):
        """int32x16: entry e = sum of the group's shifted activations i with bit i of e set."""
        e = tirx.Ramp(tirx.const(0, "int32"), tirx.const(1, "int32"), 16)
        acc = None
        for i in range(GROUP):
            bit = tirx.bitwise_and(tirx.shift_right(e, _u(i, "int32", 16)), _u(1, "int32", 16))
            term = tirx.Broadcast(xval(xm, m, g * GROUP + i), 16) * bit
            acc = term if acc is None else acc + term
        return acc

    def u16(v):
        return tirx.reinterpret(U16, v)

    def hi_byte(v16):
        return tirx.shift_right(v16, _u(8, "uint16", VH))

    def tables(tb, row, gp):
        """The broadcast tables of groups 2gp and 2gp+1 of ``row``."""
        return (bcast_table(tb.vload([row, gp * 2, 0], "uint8x16"), VB),
                bcast_table(tb.vload([row, gp * 2 + 1, 0], "uint8x16"), VB))

    def lookups(tb, row, gp, i0, i1):
        t0, t1 = tables(tb, row, gp)
        return lookup(mode, t0, i0), lookup(mode, t1, i1)

    def widen_single(a, b, h):
        """``(even, odd)`` int32 sums of a single: byte 2q is channel q of the block,
        byte 2q+1 channel VH + q (``lut.channel_order``)."""
        even = T.Cast(I32, a - tirx.shift_left(b, _u(8, "uint16", VH)))  # = sum of the low bytes (exact)
        odd = T.Cast(I32, b)
        if hi:
            h16 = u16(h)
            even = even + tirx.shift_left(T.Cast(I32, tirx.bitwise_and(h16, _u(255, "uint16", VH))),
                                          _u(8, "int32", VH))
            odd = odd + tirx.shift_left(T.Cast(I32, hi_byte(h16)), _u(8, "int32", VH))
        return even, odd

    def widen_pair(c, h):
        """int32 sums ``L_j + 2 L_{j+1}`` (+ 256x the same of the high bytes) of a pair."""
        v = T.Cast(I32, c)
        if hi:
            v = v + tirx.shift_left(T.Cast(I32, madd_pairs(mode, h, pair_coef(VB))), _u(8, "int32", VH))
        return v

    @T.macro
    def add_out(om, row, c0, val):
        """``out[row, c0 : c0 + VH] += val`` (channels >= N dropped)."""
        if c0 + VH <= N:
            om[row, T.ramp(c0, 1, VH)] = om[row, T.ramp(c0, 1, VH)] + val
        else:
            tmp = T.alloc_buffer((VH,), "int32")
            tmp[T.ramp(0, 1, VH)] = val
            for lane in range(VH):
                if c0 + lane < N:
                    om[row, c0 + lane] = om[row, c0 + lane] + tmp[lane]

    @T.macro
    def run_pass(wp, tl, th, om, A, B, H, t, mt, pair, p0, nu, nvec, chp, roff):
        """All units of one run: per chunk of group pairs, 16-bit partial sums of the
        lookups, then widened into the output rows with the plane weight."""
        for uu, ch in T.grid(nu, (GP + chp - 1) // chp):
            for q in T.unroll(R * nvec):
                A[q] = _u(0, "uint16", VH)
                B[q] = _u(0, "uint16", VH)
                H[q] = _u(0, "uint8", VB)
            for gp in range(ch * chp, T.min(ch * chp + chp, GP)):
                for v in T.unroll(nvec):
                    pk: T.let = wp.vload([t, roff + uu * GP * nvec * VB + (gp * nvec + v) * VB], U8)
                    i0, i1 = nibbles(pk, VB)
                    for r in T.unroll(R):
                        l0, l1 = lookups(tl, T.min(mt * R + r, M - 1), gp, i0, i1)
                        a_new, b_new = accumulate_low(mode, pair, A[r * nvec + v], B[r * nvec + v], l0, l1)
                        A[r * nvec + v] = a_new
                        if not pair:
                            B[r * nvec + v] = b_new
                        if hi:
                            h0, h1 = lookups(th, T.min(mt * R + r, M - 1), gp, i0, i1)
                            H[r * nvec + v] = H[r * nvec + v] + h0 + h1
            for r, v in T.grid(R, nvec):
                if mt * R + r < M:
                    if pair:
                        add_out(om, mt * R + r, t * CT + v * VH, tirx.shift_left(
                            widen_pair(A[r * nvec + v], H[r * nvec + v]), tirx.Broadcast(p0 + 2 * uu, VH)))
                    else:
                        ev, od = widen_single(A[r * nvec + v], B[r * nvec + v], H[r * nvec + v])
                        add_out(om, mt * R + r, t * CT + v * VB, tirx.shift_left(ev, tirx.Broadcast(p0 + uu, VH)))
                        add_out(om, mt * R + r, t * CT + v * VB + VH, tirx.shift_left(
                            od, tirx.Broadcast(p0 + uu, VH)))

    @T.prim_func
    def main(x: T.Buffer(x_shape, XD), wp: T.Buffer((NT, L), "uint8"), corr: T.Buffer((NP,), "int32"),
             out: T.Buffer(out_shape, "int32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        xm = T.decl_buffer((M, K), XD, data=x.data)
        om = T.decl_buffer((M, N), "int32", data=out.data)
        tl = T.alloc_buffer((M, KG, 16), "uint8")
        th = T.alloc_buffer(TH_SHAPE, "uint8")
        rs = T.alloc_buffer((M, KB), "int32")
        # ---- tables: 16 partial sums per group, low byte (and high byte if they can exceed 255) ----
        for p in table_loop(M * KB):
            rs[p // KB, p % KB] = 0
            for g in range((p % KB) * TABLE_BLOCK, T.min((p % KB) * TABLE_BLOCK + TABLE_BLOCK, KG)):
                tv16: T.let = table(xm, p // KB, g)
                tl[p // KB, g, T.ramp(0, 1, 16)] = T.Cast("uint8x16", tirx.bitwise_and(tv16, _u(255, "int32", 16)))
                if hi:
                    th[p // KB, g, T.ramp(0, 1, 16)] = T.Cast("uint8x16", tirx.shift_right(tv16, _u(8, "int32", 16)))
                rs[p // KB, p % KB] = rs[p // KB, p % KB] + (
                    xval(xm, p // KB, g * 4) + xval(xm, p // KB, g * 4 + 1) + xval(xm, p // KB, g * 4 + 2)
                    + xval(xm, p // KB, g * 4 + 3))
        # ---- lookup kernel: tile = R rows x JB blocks of VB channels -------------------------------------
        for p in par(NT * NMT):
            t: T.let = p // NMT
            mt: T.let = p % NMT
            for r in range(R):
                if mt * R + r < M:
                    for c in range(t * CT, T.min(t * CT + CT, N)):
                        om[mt * R + r, c] = 0
            # 16-bit partial sums of a chunk (bounds in lut.chunk_groups); single: A low-byte
            # words, B odd low bytes; pair: A = L_j + 2 L_j+1; H high bytes
            A = T.alloc_buffer((R * NVMAX,), U16)
            B = T.alloc_buffer((R * NVMAX,), U16)
            H = T.alloc_buffer((R * NVMAX,), U8)
            run_pass(wp, tl, th, om, A, B, H, t, mt, RUN0["kind"] == "pair", RUN0["p0"], RUN0["nu"], RUN0["nvec"],
                     RUN0["chp"], RUN0["off"])
            if NR > 1:
                run_pass(wp, tl, th, om, A, B, H, t, mt, RUN1["kind"] == "pair", RUN1["p0"], RUN1["nu"], RUN1["nvec"],
                         RUN1["chp"], RUN1["off"])
            # ---- epilogue: s * sum(x' u) - z * sum(x') - off * sum(w) -----------------------------------
            for r in range(R):
                if mt * R + r < M:
                    rsum = T.alloc_buffer((1,), "int32")
                    rsum[0] = 0
                    for kb in range(KB):
                        rsum[0] = rsum[0] + rs[mt * R + r, kb]
                    for c in range(t * CT, T.min(t * CT + CT, N)):
                        om[mt * R + r, c] = om[mt * R + r, c] * S - rsum[0] * Z - corr[c]

    return main


def primitive(mode: str, pair: bool, hi: bool, jb: int = 4, ks: int = 128, threads: int = 2):
    """The kernel's inner step alone, for ``benchmarks/kernels.py``: per group pair,
    ``jb`` packed vectors, their nibbles, the table lookups and the 16-bit
    accumulation of one unit kind, on L1-resident tables and weights, ``threads``
    independent copies. Returns ``(PrimFunc (tab, w, out, n), byte lookups per thread
    and iteration)``."""
    _, VB = _LOOKUP[mode]
    VH = VB // 2
    U8, U16 = f"uint8x{VB}", f"uint16x{VH}"
    P = threads

    def look(tab, p, k, which, idx):
        return lookup(mode, bcast_table(tab.vload([p, k, which, 0], "uint8x16"), VB), idx)

    @T.prim_func
    def prim(tab: T.Buffer((P, ks, 4, 16), "uint8"), w: T.Buffer((P, ks, jb * VB), "uint8"),
             out: T.Buffer((P, 2 * jb * VH), "uint16"), n: T.int32):
        for p in T.parallel(P):
            A = T.alloc_buffer((jb,), U16)
            B = T.alloc_buffer((jb,), U16)
            H = T.alloc_buffer((jb,), U8)
            for j in T.unroll(jb):
                A[j] = _u(0, "uint16", VH)
                B[j] = _u(0, "uint16", VH)
                H[j] = _u(0, "uint8", VB)
            for _it, k in T.grid(n, ks):
                for j in T.unroll(jb):
                    pk: T.let = w.vload([p, k, j * VB], U8)
                    i0, i1 = nibbles(pk, VB)
                    a_new, b_new = accumulate_low(mode, pair, A[j], B[j], look(tab, p, k, 0, i0),
                                                  look(tab, p, k, 1, i1))
                    A[j] = a_new
                    if not pair:
                        B[j] = b_new
                    if hi:
                        H[j] = H[j] + look(tab, p, k, 2, i0) + look(tab, p, k, 3, i1)
            for j in T.unroll(jb):
                out[p, T.ramp(j * VH, 1, VH)] = A[j] + B[j] + tirx.reinterpret(U16, H[j])
                out[p, T.ramp((jb + j) * VH, 1, VH)] = B[j]

    return prim, ks * jb * VB * 2
