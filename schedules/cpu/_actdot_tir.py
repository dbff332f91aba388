"""TVMScript of the activation x activation dot-product kernel (see :mod:`.actdot`).

Read top to bottom: per task, the task's columns of ``B`` packed into the
instruction's operand layout (and their column sums), then register tiles of rows
of ``A`` against them, then the write-back. The accumulator tile is split in two
small ``global`` buffers (rows ``0 .. RA`` and ``RA .. R``) for the reason given in
:mod:`._int8dot_tir`: below 1 KiB each, TVM keeps them on the stack and LLVM in
registers.
"""
from __future__ import annotations

from tvm.script import tirx as T

from soniq_tvm import tvm_shim as tv

from . import _isa
from ._int8dot_tir import clamp_start, split_tile, zero_tile

tirx = tv.tirx

_FLIP = _isa.replicate_word(-128, 8)  # 0x80808080: xor flips u8 <-> s8 (a +- 128) in all 4 bytes


def build(spec, mode, knobs, dot):
    """The PrimFunc ``main(a, b, out)`` for ``spec`` (an :class:`.actdot.ActMatmul`):
    ``out[t, i, j] = sum_k a[t, i, k] * b[t, k, j]`` in int32, exactly."""
    R, J = knobs["R"], knobs["J"]
    RA, RB = split_tile(R)
    VL, KV = mode.vl, mode.kv
    BT, M, K, N = spec.batch, spec.m, spec.k, spec.n
    AD, BD = spec.a_dtype, spec.b_dtype
    WIDE = mode.a_dtype == "int16"    # int16 operands (AVX2 vpmaddwd): any 8-bit code fits as it is
    EB = 16 if WIDE else 8             # bits of one operand element
    FLIP = not WIDE and AD != mode.a_dtype  # the operand wants the other signedness: a' = a xor 0x80
    OFF = (128 if AD == "int8" else -128) if FLIP else 0  # a' = a + OFF
    K4, KT = K // KV, K % KV           # whole words of A's row, bytes of the last partial one
    NW = K4 + (1 if KT else 0)         # packed reduction steps
    NB = (N + VL - 1) // VL
    NBT = NB // J
    NTAIL = N % VL != 0
    SCALAR_PACK = NTAIL or KT != 0  # padding to fill: element-wise packing
    MT = (M + R - 1) // R
    KP = NW * KV                       # codes per row of the widened copy of a (WIDE)
    KV16 = K // 16 * 16                # of which whole 16-code vectors
    WV = f"{mode.w_dtype}x{VL * KV}"
    ABC = f"{mode.a_dtype}x{VL * KV}"
    BV = f"{BD}x{VL}"
    # packed operand: lane l of step w holds b[KV*w + q, col0 + l] at byte l*KV + q
    inter = [q * VL + lane for lane in range(VL) for q in range(KV)]
    ones = _isa.bcast_word(tirx.Broadcast(tirx.const(1, mode.a_dtype), KV), VL, ABC) if FLIP else None
    par = T.parallel if spec.macs >= _isa.MIN_PARALLEL_MACS and BT * NBT > 1 else T.serial

    def a_word(a, t, i, w):
        if WIDE:  # ``a`` is the task's widened copy: one 32-bit word of int16 codes
            v = a.vload([i * KP + w * KV], f"{mode.a_dtype}x{KV}")
        else:
            v = a.vload([t, i, w * KV], f"{AD}x{KV}")
        v = tirx.reinterpret("int32", v)
        if FLIP:
            v = tirx.bitwise_xor(v, tirx.const(_FLIP, "int32"))
        return tirx.reinterpret(ABC, tirx.Broadcast(v, VL))

    def a_tail(a, t, i):
        """The last, partial word of a row: its KT codes, then zeros (whose packed
        ``b`` is zero too)."""
        w = None
        for q in range(KT):
            e = tirx.Cast(mode.a_dtype, a[t, i, K4 * KV + q])
            u = tirx.Cast("uint32", tirx.reinterpret(f"uint{EB}", e))
            if FLIP:
                u = tirx.bitwise_xor(u, tirx.const(0x80, "uint32"))
            if q:
                u = tirx.shift_left(u, tirx.const(EB * q, "uint32"))
            w = u if w is None else tirx.bitwise_or(w, u)
        return tirx.reinterpret(ABC, tirx.Broadcast(tirx.reinterpret("int32", w), VL))

    def packed(vectors):
        """``KV`` rows of ``VL`` codes of b, interleaved into one operand vector."""
        v = tirx.Shuffle(vectors, inter)
        return tirx.Cast(WV, v) if WIDE else v

    @T.macro
    def steps(acc, bp, a, t, i0, rn, w, tail):
        for i in T.unroll(rn):
            av: T.let = a_tail(a, t, i0 + i) if tail else a_word(a, t, i0 + i, w)
            for j in T.unroll(J):
                acc[T.ramp((i * J + j) * VL, 1, VL)] = dot(mode, _isa.row(acc, i * J + j, VL), av,
                                                          bp.vload([(w * J + j) * VL * KV], WV))

    @T.macro
    def write(o, acc, corr, t, i0, rn, col0):
        for i in T.unroll(rn):
            for j in T.unroll(J):
                if NTAIL:
                    for lane in range(VL):
                        if col0 + j * VL + lane < N:
                            o[t, i0 + i, col0 + j * VL + lane] = acc[(i * J + j) * VL + lane] - corr[j * VL + lane]
                else:
                    o[t, i0 + i, T.ramp(col0 + j * VL, 1, VL)] = (_isa.row(acc, i * J + j, VL)
                                                                  - _isa.row(corr, j, VL))

    @T.prim_func
    def main(a_in: T.handle, b_in: T.handle, o_in: T.handle):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        a = T.match_buffer(a_in, (BT, M, K), AD)
        b = T.match_buffer(b_in, (BT, K, N), BD)
        o = T.match_buffer(o_in, (BT, M, N), "int32")
        # tasks: (batch, block of J column vectors); each packs its own slice of b
        for p in par(BT * NBT):
            t: T.let = p // NBT
            col0: T.let = (p % NBT) * J * VL
            bp = T.alloc_buffer((NW * J * VL * KV,), mode.w_dtype)
            corr = T.alloc_buffer((J * VL,), "int32")
            for w, j in T.grid(NW, J):
                if SCALAR_PACK:
                    for lane, q in T.grid(VL, KV):
                        bp[(w * J + j) * VL * KV + lane * KV + q] = T.if_then_else(
                            w * KV + q < K and col0 + j * VL + lane < N,
                            T.Cast(mode.w_dtype, b[t, T.min(w * KV + q, K - 1), T.min(col0 + j * VL + lane, N - 1)]),
                            T.Cast(mode.w_dtype, 0))
                else:
                    bp[T.ramp((w * J + j) * VL * KV, 1, VL * KV)] = packed(
                        [b.vload([t, w * KV + q, col0 + j * VL], BV) for q in range(KV)])
            # corr = OFF * column sums of b (a dot product with a word of ones)
            for j in T.unroll(J):
                corr[T.ramp(j * VL, 1, VL)] = _isa.zeros("int32", VL)
            if FLIP:
                for w, j in T.grid(NW, J):
                    corr[T.ramp(j * VL, 1, VL)] = dot(mode, _isa.row(corr, j, VL), ones,
                                                      bp.vload([(w * J + j) * VL * KV], WV))
                for j in T.unroll(J):
                    corr[T.ramp(j * VL, 1, VL)] = _isa.row(corr, j, VL) * T.Broadcast(T.int32(OFF), VL)
            if WIDE:
                # a's rows widened to int16 once per task (zero-padded to whole words),
                # so that a word is one broadcast load in the tile
                aw = T.alloc_buffer((M * KP,), mode.a_dtype)
                for i in range(M):
                    for c in range(KV16 // 16):
                        aw[T.ramp(i * KP + c * 16, 1, 16)] = T.Cast(f"{mode.a_dtype}x16",
                                                                    a.vload([t, i, c * 16], f"{AD}x16"))
                    for k in range(KP - KV16):
                        aw[i * KP + KV16 + k] = T.if_then_else(KV16 + k < K, T.Cast(mode.a_dtype,
                                                               a[t, i, T.min(KV16 + k, K - 1)]),
                                                               T.Cast(mode.a_dtype, 0))
            src = aw if WIDE else a
            for it in range(MT):
                i0: T.let = clamp_start(it, R, M)
                acc0 = T.alloc_buffer((RA * J * VL,), "int32")
                acc1 = T.alloc_buffer((max(RB, 1) * J * VL,), "int32")
                zero_tile(acc0, acc1, RA * J, RB * J, VL)
                for w in range(NW if WIDE else K4):
                    steps(acc0, bp, src, t, i0, RA, w, False)
                    steps(acc1, bp, src, t, i0 + RA, RB, w, False)
                if KT != 0 and not WIDE:
                    steps(acc0, bp, a, t, i0, RA, K4, True)
                    steps(acc1, bp, a, t, i0 + RA, RB, K4, True)
                write(o, acc0, corr, t, i0, RA, col0)
                write(o, acc1, corr, t, i0 + RA, RB, col0)

    return main
