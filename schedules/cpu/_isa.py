"""Target features and the vector instructions the CPU families are written with.

Every x86/ARM intrinsic below must only be compiled for a target that has the
feature: LLVM aborts the whole process ("Do not know how to split the result of
this operator!") otherwise. Families therefore call :func:`features` in their
``cost`` and answer ``None`` ("not mine") when the instruction is missing.

The helpers build TIR expressions; the TVMScript kernels in this package call
them while they are parsed.
"""
from __future__ import annotations

import functools

import numpy as np

from soniq_tvm import tvm_shim as tv

__all__ = ["features", "is_x86", "is_aarch64", "host_features", "bcast_word", "pmaddubsw", "pmaddwd", "adds16",
           "vpdpbusd512", "sdot", "ones16", "zeros", "strided_load", "replicate_word", "transposer", "row",
           "parallel_loop", "parallel_pass"]

tirx = tv.tirx


# reduction values per lookup table: 16 entries (a 4-bit index) fill one vpshufb/tbl table
LUT_GROUP = 4

def _target_key(target) -> str:
    return str(target)


@functools.lru_cache(maxsize=64)
def _features_of(key: str) -> frozenset[str]:
    target = tv.Target(key)
    try:
        return frozenset(tv.llvm_cpu_features(target))
    except Exception:  # noqa: BLE001  (target without an LLVM backend)
        return frozenset()


def features(target) -> frozenset[str]:
    """LLVM feature names of an llvm ``target`` (empty for other kinds)."""
    if target is None or target.kind.name != "llvm":
        return frozenset()
    return _features_of(_target_key(target))


def _triple(target) -> str:
    t = target.attrs.get("mtriple", "") if target is not None else ""
    return str(t)


def is_aarch64(target) -> bool:
    return target is not None and target.kind.name == "llvm" and _triple(target).startswith(("aarch64", "arm64"))


def is_x86(target) -> bool:
    if target is None or target.kind.name != "llvm":
        return False
    t = _triple(target)
    return t == "" or t.startswith(("x86_64", "i686", "i386"))


@functools.lru_cache(maxsize=1)
def host_features() -> frozenset[str]:
    """Features of the machine this process runs on (what may be *executed*)."""
    return features(tv.Target({"kind": "llvm", "mcpu": tv.host_cpu()}))


# ---- expression helpers ------------------------------------------------------

def splat(value: int, lanes: int, dtype: str = "int32"):
    """``value`` in every one of ``lanes`` lanes."""
    return tirx.Broadcast(tirx.const(value, dtype), lanes)


def zeros(dtype: str, lanes: int):
    return splat(0, lanes, dtype)


def fenced(value, dtype: str):
    """``value`` behind ``llvm.arithmetic.fence``: LLVM's backend fuses a multiply
    into the add that consumes it (``vfmadd``, one rounding instead of two) in
    explicit vector code; the fence keeps the two roundings of ``a * b + c`` that a
    float reference (and TVM's own elementwise kernels) compute."""
    return tirx.call_llvm_pure_intrin(dtype, "llvm.arithmetic.fence", value)


def ones16(lanes: int = 16):
    return tirx.Broadcast(tirx.const(1, "int16"), lanes)


def bcast_word(vec, lanes: int, out_dtype: str):
    """Reinterpret a 32-bit vector load (e.g. ``uint8x4``) as one int32 and
    broadcast it ``lanes`` times, viewed as ``out_dtype`` (e.g. ``uint8x32``)."""
    word = tirx.reinterpret("int32", vec)
    return tirx.reinterpret(out_dtype, tirx.Broadcast(word, lanes))


def pmaddubsw(a_u8x32, w_i8x32):
    """u8 x s8 pairs summed to int16 (SATURATING: callers prove it cannot)."""
    return tirx.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", a_u8x32, w_i8x32)


def adds16(a_i16x16, b_i16x16):
    """Saturating int16 add (``vpaddsw``). Used for the 16-bit partial sums: the
    bound that makes them exact also keeps every partial sum in range, so it never
    saturates, and unlike a plain add LLVM does not re-associate it into a tree of
    live temporaries (which spills the whole tile)."""
    return tirx.call_llvm_pure_intrin("int16x16", "llvm.sadd.sat.v16i16", a_i16x16, b_i16x16)


def pmaddwd(a_i16x16, b_i16x16):
    """s16 x s16 pairs summed to int32 (exact unless both pairs are -32768^2)."""
    return tirx.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", a_i16x16, b_i16x16)


def vpdpbusd512(acc_i32x16, a_u8x64, w_i8x64):
    """AVX512-VNNI u8 x s8 quads summed into int32 (no intermediate saturation).
    LLVM 22 takes ``<64 x i8>`` operands (the built-in TVM intrinsic is broken)."""
    return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc_i32x16, a_u8x64, w_i8x64)


def sdot(acc_i32x4, a_i8x16, w_i8x16):
    """ARMv8.2 dotprod s8 x s8 quads summed into int32."""
    return tirx.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc_i32x4, a_i8x16, w_i8x16)


def strided_load(buf, index: list, dtype: str, lanes: int, stride: int):
    """``lanes`` elements of ``buf`` starting at ``index`` (last axis), ``stride``
    apart: one contiguous load of the span and a constant shuffle (TVM would
    scalarize a strided ramp). The span ends at the last element read."""
    if stride == 1 or lanes == 1:
        return buf.vload(index, f"{dtype}x{lanes}" if lanes > 1 else dtype)
    span = buf.vload(index, f"{dtype}x{(lanes - 1) * stride + 1}")
    return tirx.Shuffle([span], [k * stride for k in range(lanes)])


def pack_words(elems, lanes: int, dtype: str):
    """The 32-bit words (``lanes`` of them, int32) whose fields hold ``elems`` (of the
    integer ``dtype``, e.g. ``int8``: 4 fields; the first in the lowest field)."""
    bits = np.dtype(dtype).itemsize * 8
    ut = "uint32" if lanes == 1 else f"uint32x{lanes}"
    ft = f"uint{bits}" if lanes == 1 else f"uint{bits}x{lanes}"
    word = None
    for i, e in enumerate(elems):
        # an unsigned element is widened as it is (TVM refuses a same-type reinterpret of a constant)
        u = tirx.Cast(ut, e if dtype.startswith("u") else tirx.reinterpret(ft, e))
        if i:
            sh = tirx.const(i * bits, "uint32")
            u = tirx.shift_left(u, sh if lanes == 1 else tirx.Broadcast(sh, lanes))
        word = u if word is None else tirx.bitwise_or(word, u)
    return tirx.reinterpret("int32" if lanes == 1 else f"int32x{lanes}", word)


def replicate_word(value: int, bits: int) -> int:
    """The int32 whose ``32 / bits`` fields all hold ``value`` (two's complement)."""
    u = value & ((1 << bits) - 1)
    w = sum(u << (bits * i) for i in range(32 // bits))
    return w - (1 << 32) if w >= 1 << 31 else w


def _half_swap(lo, hi, b: int, lanes: int, upper: bool):
    """One half of a transpose stage: ``lo``/``hi`` are rows ``k`` and ``k + b``;
    the row with bit ``b`` clear takes the ``b``-blocks of both with that bit
    clear, the other row those with it set."""
    if upper:
        idx = [j + b if not j & b else lanes + j for j in range(lanes)]
    else:
        idx = [j if not j & b else lanes + j - b for j in range(lanes)]
    return tirx.Shuffle([lo, hi], idx)


def transposer(lanes: int):
    """A TVMScript macro ``transpose(a0, a1, b0, b1)`` that transposes the
    ``lanes x lanes`` int32 matrix held in ``a0`` (rows ``0 .. lanes/2``) and ``a1``
    (the other half), each an int32 buffer of ``lanes/2`` rows of ``lanes``
    (:func:`row`), in place; ``b0``/``b1`` are scratch of the same shape.
    log2(lanes) stages of two-source shuffles that swap ever larger blocks (LLVM:
    unpack/permute/shuffle-lane instructions, about 3 per row for 16 lanes). Half
    buffers because TVM keeps an allocation on the stack (and so in registers) only
    below 1 KiB; scalar-typed ones because TVM's storage rewrite may merge a
    vector-typed allocation into another and then fails on its stores."""
    from tvm.script import tirx as T

    assert lanes in (4, 8, 16), lanes
    half = lanes // 2

    def pair(src, k, b):
        # rows k & ~b and k | b, in div/mod form: TVM's simplifier folds those on
        # the unrolled constant k, not bitwise ops (left as lets, they would make
        # the indices dynamic and the rows stack memory)
        bit = tirx.floormod(tirx.floordiv(k, b), 2)
        lo = row(src, k - bit * b, lanes)
        hi = row(src, k - bit * b + b, lanes)
        return tirx.Select(bit == 0, _half_swap(lo, hi, b, lanes, False), _half_swap(lo, hi, b, lanes, True))

    @T.macro
    def stage(s0, s1, d0, d1, b):
        for k in T.unroll(half):
            if b < half:
                d0[T.ramp(k * lanes, 1, lanes)] = pair(s0, k, b)
                d1[T.ramp(k * lanes, 1, lanes)] = pair(s1, k, b)
            else:
                d0[T.ramp(k * lanes, 1, lanes)] = _half_swap(row(s0, k, lanes), row(s1, k, lanes), b, lanes, False)
                d1[T.ramp(k * lanes, 1, lanes)] = _half_swap(row(s0, k, lanes), row(s1, k, lanes), b, lanes, True)

    @T.macro
    def copy(s0, s1, d0, d1):
        for k in T.unroll(half):
            d0[T.ramp(k * lanes, 1, lanes)] = row(s0, k, lanes)
            d1[T.ramp(k * lanes, 1, lanes)] = row(s1, k, lanes)

    @T.macro
    def transpose(a0, a1, b0, b1):
        stage(a0, a1, b0, b1, 1)
        stage(b0, b1, a0, a1, 2)
        if lanes >= 8:
            stage(a0, a1, b0, b1, 4)
        if lanes >= 16:
            stage(b0, b1, a0, a1, 8)
        if lanes == 8:
            copy(b0, b1, a0, a1)

    return transpose


def row(buf, k, lanes: int):
    """Row ``k`` (``lanes`` int32) of a transposer buffer."""
    return tirx.BufferLoad(buf, [tirx.Ramp(k * lanes, 1, lanes)])


MIN_PARALLEL_MACS = 1 << 18  # below this, waking the thread pool costs more than the work


def parallel_loop(op):
    """``T.parallel`` for ops big enough to share between threads, else ``T.serial``
    (TVM's pool wakes every worker per parallel loop: microseconds each)."""
    from tvm.script import tirx as T

    return T.parallel if op.macs >= MIN_PARALLEL_MACS else T.serial


MIN_PARALLEL_BYTES = 1 << 16  # a data pass (re-layout) below this runs serially


def parallel_pass(op, nbytes: int):
    """The loop kind of a side pass over ``nbytes`` (an activation re-layout):
    serial when small. Each parallel loop is one launch of TVM's pool: about a
    microsecond while its workers spin, tens of microseconds once they sleep (the
    first kernel after serial glue), which is the whole time of a GEMV's re-layout."""
    from tvm.script import tirx as T

    return T.parallel if op.macs >= MIN_PARALLEL_MACS and nbytes >= MIN_PARALLEL_BYTES else T.serial
