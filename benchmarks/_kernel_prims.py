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
