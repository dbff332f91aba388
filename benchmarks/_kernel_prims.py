"""Primitive peaks that benchmarks/peak.py does not measure (TVMScript lives in a file).

* ``sum16``: ``vpmaddubsw`` + saturating ``vpaddsw`` into int16 accumulators, the
  inner step of the ``avx2-sum16`` mode (16-bit sums, exact for narrow operands);
* ``wide``: ``vpmaddwd`` + ``vpaddd`` on int16 operands, the ``avx2-wide`` mode.

Same shape as peak.py's int8 kernel: a 4 x 3 register tile, L1-resident operands,
one tile per thread, 2 threads. Compiled for ``x86-64-v3`` (AVX2 only).
"""
from __future__ import annotations

from tvm.script import tirx as T

P, MR, NB, KS = 2, 4, 3, 256


def sum16_kernel():
    @T.prim_func
    def prim(A: T.Buffer((P, MR, KS * 4), "uint8"), B: T.Buffer((P, KS, NB * 32), "int8"),
             C: T.Buffer((P, MR, NB * 16), "int16"), n: T.int32):
        for p in T.parallel(P):
            acc = T.alloc_buffer((MR * NB,), "int16x16")
            for i in T.unroll(MR * NB):
                acc[i] = T.Broadcast(T.int16(0), 16)
            for _it, ks in T.grid(n, KS):
                for m in T.unroll(MR):
                    for j in T.unroll(NB):
                        acc[m * NB + j] = T.call_llvm_pure_intrin(
                            "int16x16", "llvm.sadd.sat.v16i16", acc[m * NB + j],
                            T.call_llvm_pure_intrin(
                                "int16x16", "llvm.x86.avx2.pmadd.ub.sw",
                                T.reinterpret("uint8x32", T.Broadcast(T.reinterpret("int32", A.vload([p, m, ks * 4], "uint8x4")), 8)),
                                B.vload([p, ks, j * 32], "int8x32")))
            for m in T.unroll(MR):
                for j in T.unroll(NB):
                    C[p, m, T.ramp(j * 16, 1, 16)] = acc[m * NB + j]

    return prim, MR * NB * 32 * KS  # MACs per thread and iteration


def wide_kernel():
    @T.prim_func
    def prim(A: T.Buffer((P, MR, KS * 2), "int16"), B: T.Buffer((P, KS, NB * 16), "int16"),
             C: T.Buffer((P, MR, NB * 8), "int32"), n: T.int32):
        for p in T.parallel(P):
            acc = T.alloc_buffer((MR * NB,), "int32x8")
            for i in T.unroll(MR * NB):
                acc[i] = T.Broadcast(T.int32(0), 8)
            for _it, ks in T.grid(n, KS):
                for m in T.unroll(MR):
                    for j in T.unroll(NB):
                        acc[m * NB + j] = acc[m * NB + j] + T.call_llvm_pure_intrin(
                            "int32x8", "llvm.x86.avx2.pmadd.wd",
                            T.reinterpret("int16x16", T.Broadcast(T.reinterpret("int32", A.vload([p, m, ks * 2], "int16x2")), 8)),
                            B.vload([p, ks, j * 16], "int16x16"))
            for m in T.unroll(MR):
                for j in T.unroll(NB):
                    C[p, m, T.ramp(j * 8, 1, 8)] = acc[m * NB + j]

    return prim, MR * NB * 16 * KS


def lowbit_kernel(mode: str, fields: int = 4, mr: int = 2, jp: int = 2, ks: int = 256):
    """The ``x86-*-lowbit`` inner step: load ``jp`` packed weight vectors, make each
    field's operand with one AND, multiply it against ``mr`` broadcast activation
    words (``vpdpbusd``, or ``vpmaddubsw`` + ``vpmaddwd`` + add for ``madd256``).
    ``mr * jp * fields`` accumulators; L1-resident operands."""
    vl = 16 if mode == "vnni512" else 8
    nb = vl * 4
    nacc = mr * jp * fields
    masks = [((1 << (8 // fields)) - 1) << (f * (8 // fields)) for f in range(fields)]
    if mode == "madd256":  # keep scaled codes <= 127 (what the family does with a shift)
        masks = [m if m <= 127 else (m >> 1) & 0x7F for m in masks]

    def sel(f):
        e = T.uint8(masks[-1])
        for k in range(fields - 2, -1, -1):
            e = T.Select(f == k, T.uint8(masks[k]), e)
        return e

    def dot(acc, w, a):
        if mode == "vnni512":
            return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, w, a)
        if mode == "vnni256":
            return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", acc, w, a)
        return acc + T.call_llvm_pure_intrin(
            "int32x8", "llvm.x86.avx2.pmadd.wd",
            T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", w, a), T.Broadcast(T.int16(1), 16))

    @T.prim_func
    def prim(A: T.Buffer((P, mr, ks * 4), "int8"), B: T.Buffer((P, ks, jp * nb), "uint8"),
             C: T.Buffer((P, nacc * vl), "int32"), n: T.int32):
        for p in T.parallel(P):
            acc = T.alloc_buffer((nacc,), f"int32x{vl}")
            for i in T.unroll(nacc):
                acc[i] = T.Broadcast(T.int32(0), vl)
            for _it, k in T.grid(n, ks):
                for j in T.unroll(jp):
                    for f in T.unroll(fields):
                        for m in T.unroll(mr):
                            acc[(m * jp + j) * fields + f] = dot(
                                acc[(m * jp + j) * fields + f],
                                B.vload([p, k, j * nb], f"uint8x{nb}") & T.Broadcast(sel(f), nb),
                                T.reinterpret(f"int8x{nb}", T.Broadcast(
                                    T.reinterpret("int32", A.vload([p, m, k * 4], "int8x4")), vl)))
            for i in T.unroll(nacc):
                C[p, T.ramp(i * vl, 1, vl)] = acc[i]

    return prim, nacc * vl * 4 * ks  # MACs per thread and iteration
