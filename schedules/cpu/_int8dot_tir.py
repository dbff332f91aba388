"""TVMScript of the int8-dot kernels (see :mod:`.int8dot` for the design).

Kept apart because TVMScript must be parsed from a source file, and so that the
kernel reads top to bottom: activation re-layout, then the tiled micro-kernel,
then the write-back.
Accumulators live in small ``global``-scope buffers: TVM puts those on the stack
(< 1 KiB each) where LLVM promotes them to registers; ``local`` scope would go
through ``TVMBackendAllocWorkspace`` and stay in memory. The tile's accumulators
are split in two such buffers (pixels ``0 .. RA`` and ``RA .. R``) so that a tile
may use most of the register file. Every small buffer is scalar-typed and read and
written a vector row at a time (``_isa.row``): TVM's storage rewrite may give a
dead buffer's memory to a later one, and when a vector-typed buffer (``int32x16``)
is merged with a scalar one the rewritten stores fail its lane check.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from tvm.script import tirx as T

from soniq_tvm import tvm_shim as tv

from . import _isa

tirx = tv.tirx


def split_tile(r: int) -> tuple[int, int]:
    """Pixels of the two accumulator buffers of an ``r``-pixel tile."""
    ra = (r + 1) // 2
    return ra, r - ra


def subsampled(g) -> bool:
    """A strided 1x1 conv reads one input pixel per output pixel: the re-layout
    gathers just those (``xs`` is ``OH x OW``) and the micro-kernel runs at stride 1."""
    return (not g.matmul and g.kh == 1 and g.kw == 1 and g.strides != (1, 1)
            and tuple(g.padding) == (0, 0, 0, 0))


def rows_per_task(oh: int, ow: int, vl: int, base_tasks: int, min_tasks: int = 8) -> int:
    """Output rows per parallel task: the fewest (a divisor of ``oh``) whose
    pixels fill a vector (the write-back transposes whole vectors), unless that
    leaves fewer than ``min_tasks`` tasks for the threads."""
    divs = [d for d in range(1, oh + 1) if oh % d == 0]
    rpt = next((d for d in divs if d * ow >= vl), oh)
    while base_tasks * (oh // rpt) < min_tasks and rpt > 1:
        rpt = max(d for d in divs if d < rpt)
    return rpt


def clamp_start(i, width: int, extent: int):
    """Start of block ``i`` of ``width`` in ``[0, extent)``; the last block is moved
    back to end at ``extent`` (it overlaps its neighbour and rewrites the same
    values)."""
    if isinstance(i, int):
        return min(i * width, extent - width)
    return tirx.min(i * width, extent - width)


@T.macro
def zero_tile(acc0, acc1, n0, n1, lanes):
    """Zero the ``n0`` and ``n1`` accumulator vectors of a tile's two halves."""
    for u in T.unroll(n0):
        acc0[T.ramp(u * lanes, 1, lanes)] = _isa.zeros("int32", lanes)
    for u in T.unroll(n1):
        acc1[T.ramp(u * lanes, 1, lanes)] = _isa.zeros("int32", lanes)


@T.macro
def fill_row(buf, row, words, fill, left, inner):
    """The padding of a re-laid-out row of ``words`` 32-bit words from ``row``: the
    ``left`` words before its ``inner`` ones and those after them hold ``fill(u)``
    (``u``: the word's place in the row); a padding row: ``left = words``."""
    for u in range(left):
        buf[row + u] = fill(u)
    for u in range(words - left - inner):
        buf[row + left + inner + u] = fill(left + inner + u)


def pick(i, values):
    """``values[i]`` for a loop variable ``i`` of an unrolled loop (a Select chain the
    simplifier folds to the constant once ``i`` is)."""
    e = tirx.const(values[-1], "int32")
    for k in range(len(values) - 2, -1, -1):
        e = tirx.Select(i == k, tirx.const(values[k], "int32"), e)
    return e


def rowbuf_writeback(vl: int, j: int, og: int, check_o: bool):
    """The write-back of a task's finished output pixels: ``rowbuf[pixel, J * VL]``
    (channels last) to ``outp[n, c0 + channel, p0 + pixel]`` (NCHW, pixels of a plane
    flattened) for ``span`` pixels, with ``VL x VL`` register transposes: one vector
    store per channel and ``VL`` pixels (the last block overlaps its neighbour). A
    span below a vector is written element by element. Channel blocks start at
    ``cb0``; with ``check_o`` the channels past ``og`` (padding) are dropped."""
    hv = vl // 2
    transpose = _isa.transposer(vl)

    @T.macro
    def writeback(outp, rowbuf, n, c0, cb0, p0, span):
        if span >= vl:
            for xb, jj in T.grid((span + vl - 1) // vl, j):
                x0: T.let = clamp_start(xb, vl, span)
                t0 = T.alloc_buffer((hv * vl,), "int32")
                t1 = T.alloc_buffer((hv * vl,), "int32")
                t2 = T.alloc_buffer((hv * vl,), "int32")
                t3 = T.alloc_buffer((hv * vl,), "int32")
                for k in T.unroll(hv):
                    t0[T.ramp(k * vl, 1, vl)] = rowbuf[x0 + k, T.ramp(jj * vl, 1, vl)]
                    t1[T.ramp(k * vl, 1, vl)] = rowbuf[x0 + hv + k, T.ramp(jj * vl, 1, vl)]
                transpose(t0, t1, t2, t3)
                for k in T.unroll(hv):
                    if not check_o or (cb0 + jj) * vl + k < og:
                        outp[n, c0 + (cb0 + jj) * vl + k, T.ramp(p0 + x0, 1, vl)] = _isa.row(t0, k, vl)
                    if not check_o or (cb0 + jj) * vl + hv + k < og:
                        outp[n, c0 + (cb0 + jj) * vl + hv + k, T.ramp(p0 + x0, 1, vl)] = _isa.row(t1, k, vl)
        else:
            for lane, xx in T.grid(j * vl, span):
                if cb0 * vl + lane < og:
                    outp[n, c0 + cb0 * vl + lane, p0 + xx] = rowbuf[xx, lane]

    return writeback


def build(op, g, mode, lay, knobs, dot, off, fill=None, groups=None):
    """``off``: the shift into the operand's range; ``fill``: the operand value of a
    padding pixel, the shifted zero point (``off`` when the zero point is 0).

    ``groups``: ``(ng, kg, max_cb)`` for a conv layer's activation scale groups in
    one kernel (see :mod:`.groups`): the kernel then takes ``(x, cols, fillw, meta,
    wp, corr, scale, out)``. ``xs`` holds the groups' words one after the other
    (group ``q`` reads channels ``cols[meta[q, 0] ..]`` of ``x``, shifted by its own
    offset, padded with its own fill; ``fillw``: the fill word of each ``xs`` word),
    each output tile runs the groups' reductions one after the other and adds
    ``float(acc - corr[q]) * scale[q]`` into a float row buffer (the float
    operations of the separate kernels' combine, in order), and ``out`` is float32.
    ``off`` and ``fill`` are unused then (each group has its own).
    ``groups = (ng, kg, [(first word, words) per group], taps)``; with ``taps`` a word
    holds ``kv`` horizontal taps of one channel instead of ``kv`` channels of one
    pixel (convs with few channels, the 3-channel stem: its 7 taps fill 2 words where
    channels-last needs 7 words of 1-3 channels): ``xs[n, hp, word, ox]`` is built
    per output column (the stride and the taps' offsets applied), the weights are
    packed ``[.., KH, 1, words, ..]`` and the micro-kernel runs ``KH x 1`` at stride
    ``(SH, 1)``."""
    fill = off if fill is None else fill
    GROUPS = groups is not None
    NG, KG, GWORDS, TAPS = groups if GROUPS else (1, 1, [(0, 1)], False)
    GW0, GCB = [w for w, _ in GWORDS], [c for _, c in GWORDS]
    MAXCB = max(GCB)
    FV = f"float32x{mode.vl}"
    IV = f"int32x{mode.vl}"
    R, J = knobs["R"], knobs["J"]
    RA, RB = split_tile(R)
    VL, KV = mode.vl, mode.kv
    AD, WD = mode.a_dtype, mode.w_dtype
    CB, CGP, TC, OB, OGP = lay["cb"], lay["cgp"], lay["tc"], lay["ob"], lay["ogp"]
    NCH = CB // TC
    SUM16 = mode.name == "avx2-sum16"
    par_loop = _isa.parallel_loop(op)
    if RA * J * VL * 4 >= 1024:
        raise ValueError(f"tile R={R} J={J} needs {RA * J * VL * 4} bytes per accumulator buffer (< 1024 stay "
                         "in registers)")
    N, C, H, W, O = g.n, g.c, g.h, g.w, g.o
    G, CG, OG, KH, KW, OH, OW = g.groups, g.cg, g.og, g.kh, g.kw, g.oh, g.ow
    (SH, SW), (DH, DW) = g.strides, g.dilation
    PT, PL, PB, PR = g.padding
    SUB = subsampled(g)
    if SUB:  # xs holds only the pixels the 1x1 conv reads
        HP, WP, XW, PT, PL, SY, SX = OH, OW, OW, 0, 0, SH, SW
        SH = SW = 1
    else:
        HP, WP, XW, SY, SX = H + PT + PB, W + PL + PR, W, 1, 1
    CT = G * CGP
    CTW = CT // KV        # 32-bit words per xs pixel
    ABITS = 32 // KV
    OFFW = _isa.replicate_word(fill, ABITS)
    OBT = OB // J
    OXT = math.ceil(OW / R)
    RPT = rows_per_task(OH, OW, VL, N * G * OBT)
    NRG = OH // RPT
    NT = N * G * OBT * NRG
    PAR_OX = NT < 8 and OXT > 1  # then one tile per task, written back directly
    if PAR_OX:
        RPT, NRG, NT = 1, OH, N * G * OBT * OH
    NPAR = NT * (OXT if PAR_OX else 1)
    NSEQ = 1 if PAR_OX else OXT
    SPAN = RPT * OW  # output pixels of one task (contiguous in each NCHW plane)
    XD = op.a_dtype
    RELAYOUT = not (g.matmul and off == 0 and AD == XD and CGP == C)
    CHECK_O = OGP != OG
    VEC_OUT = g.matmul and not CHECK_O
    ROWBUF = not g.matmul and not PAR_OX   # whole output rows, written back by transposes
    ABC = f"{AD}x{VL * KV}"   # broadcast activation operand
    AW = f"{AD}x{KV}"         # one 32-bit word of activations
    WV = f"{WD}x{VL * KV}"
    M = OW
    par_relayout = _isa.parallel_pass(op, (M * CT if g.matmul else N * HP * WP * CT) * np.dtype(AD).itemsize)
    x_shape = tuple(op.x_shape)
    out_shape = tuple(op.out_shape)
    wp_shape = (G, OB // J, KH, 1 if TAPS else KW, CB, J, VL * KV)  # a tile's J weight vectors are adjacent
    writeback = rowbuf_writeback(VL, J, OG, CHECK_O)
    # re-layout vectors: XL pixels of one word each; TL x TL blocks transposed when
    # a group has at least 8 words per pixel (8 or 16: with 4-lane blocks TVM's
    # CompactBufferAllocation fails, "Divide by zero" in its region bound)
    XL = min(VL, 1 << (XW.bit_length() - 1))
    TL = min(XL, 1 << ((MAXCB if GROUPS else CB).bit_length() - 1))
    TL = TL if TL >= 8 else 0
    relayout_transpose = _isa.transposer(TL) if TL else None
    CH_PAD = CB * KV != CG  # some words hold padding channels

    def xs_word(xs, n, yy, xx, c):
        return _isa.bcast_word(xs.vload([n, yy, xx, c], AW), VL, ABC)

    def shifted(x, n, ch, sy, sx, lanes, by, valid, pad):
        """Channel ``ch`` at ``lanes`` pixels from ``sx`` (``SX`` apart) plus ``by``, as
        operand elements; ``pad`` where ``valid`` is false (None: always valid)."""
        v = _isa.strided_load(x, [n, ch, sy, sx], XD, lanes, SX)
        e = tirx.Cast(AD if lanes == 1 else f"{AD}x{lanes}", tirx.Cast("int32" if lanes == 1 else f"int32x{lanes}", v)
                      + by)
        if valid is None:
            return e
        return tirx.Select(valid, e, pad if lanes == 1 else tirx.Broadcast(pad, lanes))

    def words(x, n, sy, sx, gg, q, lanes):
        """The 32-bit words of channels ``gg*CG + q*KV ..`` (shifted by ``off``, one
        operand element each) at ``lanes`` input pixels ``sx, sx + SX, ...``; padding
        channels read the group's last one, then hold ``fill``."""
        return _isa.pack_words([shifted(x, n, gg * CG + (tirx.min(q * KV + i, CG - 1) if CH_PAD else q * KV + i), sy, sx,
                                 lanes, off, q * KV + i < CG if CH_PAD else None, tirx.const(fill, AD))
                         for i in range(KV)], lanes, AD)

    def gwords(x, cols, meta, gq, n, sy, sx, q, lanes):
        """:func:`words` of scale group ``gq``'s word ``q`` (its channels gathered
        through ``cols``, its own offset and fill)."""
        return _isa.pack_words([shifted(x, n, cols[meta[gq, 0] + tirx.min(q * KV + i, meta[gq, 1] - 1)], sy, sx, lanes,
                                 meta[gq, 4], q * KV + i < meta[gq, 1], tirx.Cast(AD, meta[gq, 5]))
                         for i in range(KV)], lanes, AD)

    @T.macro
    def word_block(xw, row, w0, q0, x0, word_of):
        """Words ``q0 .. q0 + TL`` (``word_of(q, TL)``: at ``TL`` pixels from ``x0``) of
        one padded input row, transposed in registers and stored channels-last from
        word ``w0 + q0`` of each pixel."""
        t0 = T.alloc_buffer((TL * TL // 2,), "int32")
        t1 = T.alloc_buffer((TL * TL // 2,), "int32")
        t2 = T.alloc_buffer((TL * TL // 2,), "int32")
        t3 = T.alloc_buffer((TL * TL // 2,), "int32")
        for k in T.unroll(TL // 2):
            t0[T.ramp(k * TL, 1, TL)] = word_of(q0 + k, TL)
            t1[T.ramp(k * TL, 1, TL)] = word_of(q0 + TL // 2 + k, TL)
        relayout_transpose(t0, t1, t2, t3)
        for k in T.unroll(TL // 2):
            xw[T.ramp(row + (PL + x0 + k) * CTW + w0 + q0, 1, TL)] = _isa.row(t0, k, TL)
            xw[T.ramp(row + (PL + x0 + TL // 2 + k) * CTW + w0 + q0, 1, TL)] = _isa.row(t1, k, TL)

    @T.macro
    def relayout_groups(xw, x, cols, fillw, meta, n, sy, row):
        """One padded input row of the scale groups' words (``row``: its first word)."""
        if sy < 0 or sy >= H:
            fill_row(xw, row, WP * CTW, lambda u: fillw[u % CTW], WP * CTW, 0)
        else:
            fill_row(xw, row, WP * CTW, lambda u: fillw[u % CTW], PL * CTW, XW * CTW)
            for gq in range(NG):
                w0: T.let = meta[gq, 2] // KV
                cbg: T.let = meta[gq, 3]
                if TL > 0 and cbg >= TL:
                    for qb, xb in T.grid((cbg + TL - 1) // TL, (XW + TL - 1) // TL):
                        x0: T.let = clamp_start(xb, TL, XW)
                        word_block(xw, row, w0, clamp_start(qb, TL, cbg), x0,
                                   functools.partial(gwords, x, cols, meta, gq, n, sy, x0 * SX))
                elif XL > 1:
                    for q, xb in T.grid(cbg, (XW + XL - 1) // XL):
                        x0: T.let = clamp_start(xb, XL, XW)
                        xw[T.ramp(row + (PL + x0) * CTW + w0 + q, CTW, XL)] = gwords(
                            x, cols, meta, gq, n, sy, x0 * SX, q, XL)
                else:
                    for q, xx in T.grid(cbg, XW):
                        xw[row + (PL + xx) * CTW + w0 + q] = gwords(x, cols, meta, gq, n, sy, xx * SX, q, 1)

    TW = -(-KW // KV)  # tap words per channel (taps mode)
    XT = min(VL, 1 << (OW.bit_length() - 1))  # output columns per word vector (taps mode)
    XROW = (OW - 1) * SW + (TW * KV - 1) * DW + 1  # padded input row the taps read
    XIN = max(0, min(W, XROW - PL))  # the input columns in it
    XV = 32  # bytes per vector of the row copy

    def tap_word(xr, x0, t):
        """Words of ``XT`` output columns from ``x0``: byte ``i`` of column ``p`` is tap
        ``t * KV + i``, ``xr[(x0 + p) * SW + (t * KV + i) * DW]``: one load of the span
        and one constant byte shuffle (``vpermb`` where the CPU has AVX512-VBMI)."""
        span = (XT - 1) * SW + (KV - 1) * DW + 1
        v = xr.vload([x0 * SW + t * KV * DW], f"{AD}x{span}")
        lanes = [p * SW + i * DW for p in range(XT) for i in range(KV)]
        copies = -(-len(lanes) // span)  # a shuffle gives at most as many lanes as its sources hold
        return tirx.reinterpret(f"int32x{XT}", tirx.Shuffle([v] * copies, lanes))

    @T.macro
    def relayout_taps(xt, x, cols, fillw, meta, n, sy, row):
        """Row ``sy`` (padded row ``sy + PT``) of ``xs[n, hp, word, ox]`` in taps mode:
        per group and channel, the padded input row shifted by the group's offset,
        then per tap word ``XT`` output columns at a time, each byte a strided load."""
        for gq in range(NG):
            w0: T.let = meta[gq, 2] // KV
            for c in range(meta[gq, 1]):
                if sy < 0 or sy >= H:
                    for u in range(TW * OW):
                        xt[row + (w0 + c * TW) * OW + u] = fillw[w0]  # the group's fill word
                else:
                    ch: T.let = cols[meta[gq, 0] + c]
                    xr = T.alloc_buffer((XROW,), AD)
                    for u in range(PL):
                        xr[u] = T.Cast(AD, meta[gq, 5])
                    for u in range(XROW - PL - XIN):
                        xr[PL + XIN + u] = T.Cast(AD, meta[gq, 5])
                    for u in range(XIN // XV):  # (x + off) mod 2^8: the byte add wraps alike
                        xr[T.ramp(PL + u * XV, 1, XV)] = T.reinterpret(f"{AD}x{XV}", x.vload(
                            [n, ch, sy, u * XV], f"{XD}x{XV}")) + T.Broadcast(T.Cast(AD, meta[gq, 4]), XV)
                    for u in range(XIN % XV):
                        xr[XIN // XV * XV + u + PL] = T.Cast(AD, T.Cast("int32", x[n, ch, sy, XIN // XV * XV + u])
                                                             + meta[gq, 4])
                    for t, xb in T.grid(TW, (OW + XT - 1) // XT):
                        x0: T.let = clamp_start(xb, XT, OW)
                        xt[T.ramp(row + (w0 + c * TW + t) * OW + x0, 1, XT)] = tap_word(xr, x0, t)

    @T.macro
    def steps_taps(acc, xs, wp, i0, rn, n, oy, ox0, obt, r, cb):
        for i in T.unroll(rn):
            a: T.let = _isa.bcast_word(xs.vload([n, oy * SH + r * DH, cb, (ox0 + i0 + i) * KV], AW), VL, ABC)
            for j in T.unroll(J):
                acc[T.ramp((i * J + j) * VL, 1, VL)] = dot(mode, _isa.row(acc, i * J + j, VL), a,
                                                           wp.vload([0, obt, r, 0, cb, j, 0], WV))

    @T.macro
    def combine(dst, acc, corr, scale, gq, i0, rn, row0, obt):
        """``dst`` rows (float bits) ``(+)= float(acc - corr[gq]) * scale[gq]``."""
        for i in T.unroll(rn):
            for j in T.unroll(J):
                term: T.let = _isa.fenced(T.Cast(FV, _isa.row(acc, i * J + j, VL) - corr[
                    gq, T.ramp((obt * J + j) * VL, 1, VL)]) * scale[gq, T.ramp((obt * J + j) * VL, 1, VL)], FV)
                dst[row0 + i0 + i, T.ramp(j * VL, 1, VL)] = T.reinterpret(IV, T.Select(
                    gq == 0, term, T.reinterpret(FV, dst[row0 + i0 + i, T.ramp(j * VL, 1, VL)]) + term))

    @T.macro
    def steps(acc, LN, xs, wp, i0, rn, n, oy, ox0, gi, obt, r, s, cb, dot_mode):
        for i in T.unroll(rn):
            a: T.let = xs_word(xs, n, oy * SH + r * DH, (ox0 + i0 + i) * SW + s * DW, gi * CGP + cb * KV)
            for j in T.unroll(J):
                acc[T.ramp((i * J + j) * LN, 1, LN)] = dot(dot_mode, _isa.row(acc, i * J + j, LN), a,
                                                           wp.vload([gi, obt, r, s, cb, j, 0], WV))

    @T.macro
    def widen(acc, acc16, rn):
        for u in T.unroll(rn * J):
            acc[T.ramp(u * VL, 1, VL)] = _isa.row(acc, u, VL) + _isa.pmaddwd(_isa.row(acc16, u, 16), _isa.ones16())

    @T.macro
    def finish(dst, acc, corr, i0, rn, row0, col0, gi, obt):
        for i in T.unroll(rn):
            for j in T.unroll(J):
                dst[row0 + i0 + i, T.ramp(col0 + j * VL, 1, VL)] = (
                    _isa.row(acc, i * J + j, VL) - corr[gi, T.ramp((obt * J + j) * VL, 1, VL)])

    @T.macro
    def body(x, wp, corr, out, cols, fillw, meta, scale):
        # ---- activations: pad, shift by `off`, channels last ----------------------
        if TAPS:
            xs = T.alloc_buffer((N, HP, CTW, OW * KV), AD)
            xt = T.decl_buffer((N * HP * CTW * OW,), "int32", data=xs.data)
            for p in par_relayout(N * HP):
                relayout_taps(xt, x, cols, fillw, meta, p // HP, p % HP - PT, p * CTW * OW)
        elif RELAYOUT:
            xs = T.alloc_buffer((N, HP, WP, CT), AD)
            if g.matmul:
                xm = T.decl_buffer((M, C), XD, data=x.data)
                for p in par_relayout(M):
                    for c in range(CT):
                        xs[0, 0, p, c] = T.Cast(AD, fill)
                    for c in range(C):
                        xs[0, 0, p, c] = T.Cast(AD, T.Cast("int32", xm[p, c]) + off)
            else:
                # one 32-bit word = KV channels of a pixel; built VL pixels at a time
                # from KV channel planes, then VL x VL blocks of words transposed to
                # channels-last (one vector store per pixel)
                xw = T.decl_buffer((N * HP * WP * CTW,), "int32", data=xs.data)
                for p in par_relayout(N * HP):
                    n: T.let = p // HP
                    sy: T.let = (p % HP - PT) * SY
                    row: T.let = p * WP * CTW
                    if GROUPS:
                        relayout_groups(xw, x, cols, fillw, meta, n, sy, row)
                    elif sy < 0 or sy >= H:
                        fill_row(xw, row, WP * CTW, lambda u: OFFW, WP * CTW, 0)
                    else:
                        fill_row(xw, row, WP * CTW, lambda u: OFFW, PL * CTW, XW * CTW)
                        if TL > 0:  # TL x TL blocks of words, transposed
                            for gg, qb, xb in T.grid(G, (CB + TL - 1) // TL, (XW + TL - 1) // TL):
                                x0: T.let = clamp_start(xb, TL, XW)
                                word_block(xw, row, gg * CB, clamp_start(qb, TL, CB), x0,
                                           functools.partial(words, x, n, sy, x0 * SX, gg))
                        elif XL > 1:  # few words per pixel: store each word vector strided
                            for gg, q, xb in T.grid(G, CB, (XW + XL - 1) // XL):
                                x0: T.let = clamp_start(xb, XL, XW)
                                xw[T.ramp(row + (PL + x0) * CTW + gg * CB + q, CTW, XL)] = words(
                                    x, n, sy, x0 * SX, gg, q, XL)
                        else:
                            for gg, q, xx in T.grid(G, CB, XW):
                                xw[row + (PL + xx) * CTW + gg * CB + q] = words(x, n, sy, xx * SX, gg, q, 1)
        else:
            xs = T.decl_buffer((1, 1, M, C), XD, data=x.data)
        # ---- tiled micro-kernel ---------------------------------------------------------
        # tasks (n, group, channel-block tile, row group), rows innermost: a thread's
        # consecutive tasks reuse one weight slice from its L2
        for p in par_loop(NPAR):
            # the finished tiles, channels last: the task's rows (ROWBUF) or one tile
            rowbuf = T.alloc_buffer((max(SPAN, VL) if ROWBUF else R, J * VL), "int32")
            for yy, t in T.grid(RPT, NSEQ):
                q: T.let = p // OXT if PAR_OX else p // NRG
                oxt: T.let = p % OXT if PAR_OX else t
                oy: T.let = q % OH if PAR_OX else (p % NRG) * RPT + yy
                obt: T.let = (q // OH) % OBT if PAR_OX else q % OBT
                gi: T.let = (q // (OBT * OH)) % G if PAR_OX else (q // OBT) % G
                n: T.let = q // (OBT * OH * G) if PAR_OX else q // (OBT * G)
                ox0: T.let = T.min(oxt * R, OW - R)
                if GROUPS:  # the groups one after the other, summed in float
                    tile = T.decl_buffer((R, J * VL), "int32", data=rowbuf.data)
                    for gq in T.unroll(NG):
                        gacc0 = T.alloc_buffer((RA * J * VL,), "int32")
                        gacc1 = T.alloc_buffer((max(RB, 1) * J * VL,), "int32")
                        zero_tile(gacc0, gacc1, RA * J, RB * J, VL)
                        w0: T.let = pick(gq, GW0)
                        if TAPS:
                            for r, cb in T.grid(KH, pick(gq, GCB)):
                                steps_taps(gacc0, xs, wp, 0, RA, n, oy, ox0, obt, r, w0 + cb)
                                steps_taps(gacc1, xs, wp, RA, RB, n, oy, ox0, obt, r, w0 + cb)
                        else:
                            for r, s, cb in T.grid(KH, KW, pick(gq, GCB)):
                                steps(gacc0, VL, xs, wp, 0, RA, n, oy, ox0, gi, obt, r, s, w0 + cb, mode)
                                steps(gacc1, VL, xs, wp, RA, RB, n, oy, ox0, gi, obt, r, s, w0 + cb, mode)
                        if ROWBUF:
                            combine(rowbuf, gacc0, corr, scale, gq, 0, RA, yy * OW + ox0, obt)
                            combine(rowbuf, gacc1, corr, scale, gq, RA, RB, yy * OW + ox0, obt)
                        else:
                            combine(tile, gacc0, corr, scale, gq, 0, RA, 0, obt)
                            combine(tile, gacc1, corr, scale, gq, RA, RB, 0, obt)
                    if not ROWBUF:
                        o4 = T.decl_buffer(out_shape, "int32", data=out.data)
                        for lane, i in T.grid(J * VL, R):
                            if obt * J * VL + lane < OG:
                                o4[n, obt * J * VL + lane, oy, ox0 + i] = tile[i, lane]
                else:
                    acc0 = T.alloc_buffer((RA * J * VL,), "int32")
                    acc1 = T.alloc_buffer((max(RB, 1) * J * VL,), "int32")
                    zero_tile(acc0, acc1, RA * J, RB * J, VL)
                    for r, s, ch in T.grid(KH, KW, NCH):
                        if SUM16:
                            a16 = T.alloc_buffer((RA * J * 16,), "int16")
                            b16 = T.alloc_buffer((max(RB, 1) * J * 16,), "int16")
                            for u in T.unroll(RA * J):
                                a16[T.ramp(u * 16, 1, 16)] = _isa.zeros("int16", 16)
                            for u in T.unroll(RB * J):
                                b16[T.ramp(u * 16, 1, 16)] = _isa.zeros("int16", 16)
                            for cc in range(TC):
                                steps(a16, 16, xs, wp, 0, RA, n, oy, ox0, gi, obt, r, s, ch * TC + cc, mode)
                                steps(b16, 16, xs, wp, RA, RB, n, oy, ox0, gi, obt, r, s, ch * TC + cc, mode)
                            widen(acc0, a16, RA)
                            widen(acc1, b16, RB)
                        else:
                            for cc in range(TC):
                                steps(acc0, VL, xs, wp, 0, RA, n, oy, ox0, gi, obt, r, s, ch * TC + cc, mode)
                                steps(acc1, VL, xs, wp, RA, RB, n, oy, ox0, gi, obt, r, s, ch * TC + cc, mode)
                    # ---- epilogue: subtract the offset correction, write back ---------------
                    if ROWBUF:
                        finish(rowbuf, acc0, corr, 0, RA, yy * OW + ox0, 0, gi, obt)
                        finish(rowbuf, acc1, corr, RA, RB, yy * OW + ox0, 0, gi, obt)
                    elif VEC_OUT:
                        om = T.decl_buffer((M, O), "int32", data=out.data)
                        finish(om, acc0, corr, 0, RA, ox0, obt * J * VL, gi, obt)
                        finish(om, acc1, corr, RA, RB, ox0, obt * J * VL, gi, obt)
                    else:
                        tmp = T.decl_buffer((R, J * VL), "int32", data=rowbuf.data)
                        finish(tmp, acc0, corr, 0, RA, 0, 0, gi, obt)
                        finish(tmp, acc1, corr, RA, RB, 0, 0, gi, obt)
                        if g.matmul:
                            om2 = T.decl_buffer((M, O), "int32", data=out.data)
                            for i, lane in T.grid(R, J * VL):
                                if obt * J * VL + lane < OG:
                                    om2[ox0 + i, obt * J * VL + lane] = tmp[i, lane]
                        else:
                            for lane, i in T.grid(J * VL, R):
                                if obt * J * VL + lane < OG:
                                    out[n, gi * OG + obt * J * VL + lane, oy, ox0 + i] = tmp[i, lane]
            # ---- the finished output row, channels-last -> NCHW: VL x VL transposes ----
            if ROWBUF:
                outp = T.decl_buffer((N, O, OH * OW), "int32", data=out.data)
                bo: T.let = (p // NRG) % OBT
                writeback(outp, rowbuf, p // (NRG * OBT * G), (p // (NRG * OBT)) % G * OG, bo * J,
                          (p % NRG) * SPAN, SPAN)

    if GROUPS:
        @T.prim_func
        def main(x: T.Buffer(x_shape, XD), cols: T.Buffer((KG,), "int32"), fillw: T.Buffer((CTW,), "int32"),
                 meta: T.Buffer((NG, 6), "int32"), wp: T.Buffer(wp_shape, WD), corr: T.Buffer((NG, OGP), "int32"),
                 scale: T.Buffer((NG, OGP), "float32"), out: T.Buffer(out_shape, "float32")):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            body(x, wp, corr, out, cols, fillw, meta, scale)
    else:
        @T.prim_func
        def main(x: T.Buffer(x_shape, XD), wp: T.Buffer(wp_shape, WD), corr: T.Buffer((G, OGP), "int32"),
                 out: T.Buffer(out_shape, "int32")):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            body(x, wp, corr, out, None, None, None, None)

    return main
