"""TVMScript of the integer Winograd F(2x2, 3x3) kernel (see :mod:`.winograd`).

Three stages, top to bottom: the input transform (the codes re-laid out channels
last into a padded plane, then ``B^T d B`` on 16 to 64 channel bytes at a time), the
16 batched channel reductions on the dot-product micro-kernel, the output
transform and write-back. Small scratch buffers stay under 1 KiB (TVM keeps those
on the stack, where LLVM promotes them to registers) and are scalar-typed, read and
written a vector row at a time (``_isa.row``), as in the int8-dot kernel.
"""
from __future__ import annotations

import math

from tvm.script import tirx as T

from soniq_tvm import tvm_shim as tv

from . import _isa
from ._int8dot_tir import clamp_start, fill_row, rowbuf_writeback, split_tile, zero_tile

tirx = tv.tirx


def build(op, g, mode, lay, knobs, dot, off):
    """``off``: the shift of the transformed activations into u8 (``-min V``)."""
    R, J = knobs["R"], knobs["J"]
    RA, RB = split_tile(R)
    VL, KV = mode.vl, mode.kv
    N, C, H, W, O, OH, OW = g.n, g.c, g.h, g.w, g.o, g.oh, g.ow
    PT, PL, _, _ = g.padding
    TY, TX, NT, CB = lay["ty"], lay["tx"], lay["tiles"], lay["cb"]
    OBT, OP, WD = lay["ob"] // J, lay["op"], mode.w_dtype
    CP = CB * KV                 # channels, padded to whole words
    HP, WP = 2 * TY + 2, 2 * TX + 2  # the zero-padded plane every tile reads from
    XD = op.a_dtype
    ZW = _isa.replicate_word(op.a_zero, 8)  # the zero point in each byte of a word
    copy_rows = min(H, HP - PT)  # input rows inside the padded plane
    copy_cols = min(W, WP - PL)
    # byte lanes of the transform: the widest vector that divides the channel bytes
    CL = max(v for v in (4, 8, 16, 32, 64 if VL == 16 else 32) if CP % v == 0)
    # pixels per word vector of the plane's rows (channel-plane loads)
    XP = min(VL, 1 << (copy_cols.bit_length() - 1))
    ABC = f"{mode.a_dtype}x{VL * KV}"
    WV = f"{mode.w_dtype}x{VL * KV}"
    BV = f"uint8x{CL}"
    # a task: the tiles of RT rows of tiles (TPT tiles, in micro-tiles of R) for J
    # vectors of output channels, its output pixels gathered channels last in a row
    # buffer and written to NCHW with register transposes (2 RT output rows: where the
    # image is narrow, enough for a vector of pixels and a full micro-tile)
    RT, TPT = lay["rt"], lay["tpt"]
    TRG = math.ceil(TY / RT)
    NXB = math.ceil(TPT / R)
    NPAR = N * OBT * TRG
    SPAN = 2 * RT * OW
    writeback = rowbuf_writeback(VL, J, O, OP != O)
    par = _isa.parallel_loop(op)
    XB = copy_cols // XP * XP if XP > 1 else 0  # columns copied a word vector at a time; the rest one by one

    def plane_word(x, n, q, y, x0, lanes):
        """Words of channels ``4q .. 4q+3`` (the zero point's byte for a padding channel)
        of ``lanes`` pixels from column ``x0``: one load per channel plane."""
        elems = []
        for k in range(KV):
            c = q * KV + k  # q is a loop variable: channels past C (padding) read C - 1, then take the zero point
            if lanes == 1:  # the code's byte (two's complement for signed codes)
                e = tirx.Cast("uint8", x[n, tirx.min(c, C - 1), y, x0])
            else:
                e = tirx.reinterpret(f"uint8x{lanes}", x.vload([n, tirx.min(c, C - 1), y, x0], f"{XD}x{lanes}"))
            if CP != C:
                zb = tirx.const(op.a_zero & 0xFF, "uint8")
                e = tirx.Select(c < C, e, zb if lanes == 1 else tirx.Broadcast(zb, lanes))
            elems.append(e)
        return _isa.pack_words(elems, lanes, "uint8")

    def tap(xb, n, y, x, cc):
        """``CL`` channel bytes of the plane's pixel ``(y, x)``."""
        return xb.vload([n, y, x, cc * CL], BV)

    def bias(k):
        """The byte added to transformed value ``k`` of a tile: the shift into u8, and
        for the one entry of ``B^T 1 B`` that is not 0 (``[1][1] = 4``) the zero
        point's share, so that the plane may hold raw codes."""
        return tirx.Broadcast(tirx.const((off - (4 * op.a_zero if k == 5 else 0)) & 0xFF, "uint8"), CL)

    @T.macro
    def column_transform(dst, xb, n, y, x0, cc):
        """Row ``y`` of a tile times ``B``, on ``CL`` channel bytes (wrapping byte
        arithmetic: the true values fit u8 once shifted, so their residues are them)."""
        dst[T.ramp(0 * CL, 1, CL)] = tap(xb, n, y, x0, cc) - tap(xb, n, y, x0 + 2, cc)
        dst[T.ramp(1 * CL, 1, CL)] = tap(xb, n, y, x0 + 1, cc) + tap(xb, n, y, x0 + 2, cc)
        dst[T.ramp(2 * CL, 1, CL)] = tap(xb, n, y, x0 + 2, cc) - tap(xb, n, y, x0 + 1, cc)
        dst[T.ramp(3 * CL, 1, CL)] = tap(xb, n, y, x0 + 1, cc) - tap(xb, n, y, x0 + 3, cc)

    @T.macro
    def micro(acc, i0, rn, vt, wp, n, e, t0, obt):
        for q in range(CB):
            for i in T.unroll(rn):
                a: T.let = tirx.reinterpret(ABC, tirx.Broadcast(vt[n, e, t0 + i0 + i, q], VL))
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
        # ---- the padded plane, channels last: words of 4 channels' codes, the zero
        # point around them (and in padding channels) ----------------------------------
        xc = T.alloc_buffer((N, HP, WP, CB), "int32")
        xcw = T.decl_buffer((N * HP * WP * CB,), "int32", data=xc.data)
        for p in par(N * HP):
            n: T.let = p // HP
            y: T.let = p % HP - PT
            row: T.let = p * WP * CB
            if y < 0 or y >= copy_rows:
                fill_row(xcw, row, WP * CB, lambda u: ZW, WP * CB, 0)
            else:
                fill_row(xcw, row, WP * CB, lambda u: ZW, PL * CB, copy_cols * CB)
                if XP > 1:
                    for q, xb in T.grid(CB, XB // XP):
                        xcw[T.ramp(row + (PL + xb * XP) * CB + q, CB, XP)] = plane_word(x, n, q, y, xb * XP, XP)
                for q, xx in T.grid(CB, copy_cols - XB):
                    xcw[row + (PL + XB + xx) * CB + q] = plane_word(x, n, q, y, XB + xx, 1)
        # ---- input transform: V = B^T d B + off, on channel bytes -------------------------
        vt = T.alloc_buffer((N, 16, NT, CB), "int32")
        vb = T.decl_buffer((N, 16, NT, CP), "uint8", data=vt.data)
        xcb = T.decl_buffer((N, HP, WP, CP), "uint8", data=xc.data)
        for p in par(N * TY):
            n: T.let = p // TY
            ty: T.let = p % TY
            for tx, cc in T.grid(TX, CP // CL):
                t: T.let = ty * TX + tx
                w0 = T.alloc_buffer((4 * CL,), "uint8")
                w1 = T.alloc_buffer((4 * CL,), "uint8")
                w2 = T.alloc_buffer((4 * CL,), "uint8")
                w3 = T.alloc_buffer((4 * CL,), "uint8")
                column_transform(w0, xcb, n, 2 * ty, 2 * tx, cc)
                column_transform(w1, xcb, n, 2 * ty + 1, 2 * tx, cc)
                column_transform(w2, xcb, n, 2 * ty + 2, 2 * tx, cc)
                column_transform(w3, xcb, n, 2 * ty + 3, 2 * tx, cc)
                for j in T.unroll(4):  # B^T (d B): rows of the tile combined, then shifted
                    vb[n, j, t, T.ramp(cc * CL, 1, CL)] = _isa.row(w0, j, CL) - _isa.row(w2, j, CL) + bias(0)
                    vb[n, 4 + j, t, T.ramp(cc * CL, 1, CL)] = _isa.row(w1, j, CL) + _isa.row(w2, j, CL) + T.Select(
                        j == 1, bias(5), bias(4))
                    vb[n, 8 + j, t, T.ramp(cc * CL, 1, CL)] = _isa.row(w2, j, CL) - _isa.row(w1, j, CL) + bias(8)
                    vb[n, 12 + j, t, T.ramp(cc * CL, 1, CL)] = _isa.row(w1, j, CL) - _isa.row(w3, j, CL) + bias(12)
        # ---- 16 channel reductions per micro-tile, then A^T M A into the row buffer --------
        for p in par(NPAR):
            n: T.let = p // (OBT * TRG)
            obt: T.let = (p // TRG) % OBT
            ty0: T.let = (p % TRG) * RT
            rowbuf = T.alloc_buffer((SPAN, J * VL), "int32")
            mloc = T.alloc_buffer((16 * R * J * VL,), "int32")
            tfirst: T.let = ty0 * TX  # the task's tiles: [tfirst, tend)
            tend: T.let = T.min(ty0 + RT, TY) * TX
            for xb in range(NXB):
                if tfirst + xb * R < tend:
                    # the last micro-tile of the image moves back to end at its last tile;
                    # tiles of another task it recomputes are not kept
                    t0: T.let = T.min(tfirst + xb * R, NT - R)
                    for e in range(16):
                        acc0 = T.alloc_buffer((RA * J * VL,), "int32")
                        acc1 = T.alloc_buffer((max(RB, 1) * J * VL,), "int32")
                        zero_tile(acc0, acc1, RA * J, RB * J, VL)
                        micro(acc0, 0, RA, vt, wp, n, e, t0, obt)
                        micro(acc1, RA, RB, vt, wp, n, e, t0, obt)
                        keep(mloc, acc0, 0, RA, e)
                        keep(mloc, acc1, RA, RB, e)
                    for i in range(R):
                        if t0 + i >= tfirst and t0 + i < tend:
                            tl: T.let = t0 + i - tfirst
                            tx: T.let = tl % TX
                            pix: T.let = 2 * (tl // TX) * OW + 2 * tx  # the tile's top-left pixel in the buffer
                            for j in T.unroll(J):
                                oc: T.let = (obt * J + j) * VL
                                pb = T.alloc_buffer((8 * VL,), "int32")
                                for b in T.unroll(4):  # A^T M
                                    pb[T.ramp(b * VL, 1, VL)] = mrow(mloc, b, i, j) + mrow(mloc, 4 + b, i, j) + mrow(
                                        mloc, 8 + b, i, j)
                                    pb[T.ramp((4 + b) * VL, 1, VL)] = mrow(mloc, 4 + b, i, j) - mrow(
                                        mloc, 8 + b, i, j) - mrow(mloc, 12 + b, i, j)
                                for r in T.unroll(2):  # (A^T M) A, the offset's share removed, / 4
                                    rowbuf[pix + r * OW, T.ramp(j * VL, 1, VL)] = T.shift_right(
                                        _isa.row(pb, 4 * r, VL) + _isa.row(pb, 4 * r + 1, VL)
                                        + _isa.row(pb, 4 * r + 2, VL) - corr[2 * r, T.ramp(oc, 1, VL)],
                                    _isa.splat(2, VL))
                                    if OW % 2 == 0 or 2 * tx + 1 < OW:  # an odd width's last tile is half outside
                                        rowbuf[pix + r * OW + 1, T.ramp(j * VL, 1, VL)] = T.shift_right(
                                            _isa.row(pb, 4 * r + 1, VL) - _isa.row(pb, 4 * r + 2, VL)
                                            - _isa.row(pb, 4 * r + 3, VL) - corr[2 * r + 1, T.ramp(oc, 1, VL)],
                                            _isa.splat(2, VL))
            outp = T.decl_buffer((N, O, OH * OW), "int32", data=out.data)
            writeback(outp, rowbuf, n, 0, obt * J, 2 * ty0 * OW, (T.min(2 * (ty0 + RT), OH) - 2 * ty0) * OW)

    return main
