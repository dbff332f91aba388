"""The activation x activation dot-product kernel (:mod:`soniq_tvm.schedules.cpu.actdot`).

Bit-exact against numpy for every code path of the kernel, on VNNI (this host,
when it has it) and AVX2 (``vpmaddwd`` on int16 pairs): signed ``a`` (VNNI: the xor
shift and its column-sum correction) and unsigned ``a`` (read as it is), unsigned
``b`` (AVX2 only), whole vectors and words (shuffle packing, vector stores) and
partial ones (``K % 4``, ``N % 16``: zero-padded packing, scalar stores), the
widened copy of ``a`` (AVX2), overlapping row tiles, one task or many, knobs at
their limits. Cross-built for NEON and disassembled; refused where no instruction
takes the operands exactly.
"""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.schedules.cpu import actdot  # noqa: E402
from soniq_tvm.schedules.cpu.actdot import ActMatmul, act_matmul  # noqa: E402

from test_cpu_crossbuild import CASCADELAKE, NEON, count  # noqa: E402
from test_cpu_families import AVX2, HOST_T, needs_avx2, needs_vnni  # noqa: E402

# (batch, m, k, n): attention's shapes, then the awkward ones
SHAPES = [
    (4, 128, 64, 128),   # BERT scores: 4 heads, whole words and vectors, parallel tasks
    (4, 128, 128, 64),   # BERT context
    (3, 37, 70, 50),     # K % 4 = 2, N % 16 = 2
    (2, 5, 7, 33),       # K % 4 = 3, rows fewer than a tile
    (1, 1, 4, 16),       # one row, one word, one vector: one serial task
    (1, 13, 1, 1),       # K = 1, N = 1
    (6, 24, 256, 32),    # long reduction
]


def _codes(rng, dtype, shape):
    info = np.iinfo(dtype)
    return rng.integers(info.min, int(info.max) + 1, shape).astype(dtype)


def run(spec: ActMatmul, a, b, knobs=None, target=HOST_T):
    func = act_matmul(spec, target, knobs)
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    out = tvm.runtime.empty((spec.batch, spec.m, spec.n), "int32", tvm.cpu())
    lib["main"](tv.tensor(a), tv.tensor(b), out)
    return out.numpy()


@needs_vnni
@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_exact_full_range(shape, a_dtype):
    """Full-range codes, including -128 and 255 (where an int16 path would saturate)."""
    rng = np.random.default_rng(sum(shape))
    bt, m, k, n = shape
    a, b = _codes(rng, a_dtype, (bt, m, k)), _codes(rng, "int8", (bt, k, n))
    a.flat[0], b.flat[0] = np.iinfo(a_dtype).min, -128
    np.testing.assert_array_equal(run(ActMatmul(bt, m, k, n, a_dtype, "int8"), a, b), actdot.reference(a, b))


@needs_avx2
@pytest.mark.parametrize("ab", [("int8", "int8"), ("uint8", "int8"), ("int8", "uint8"), ("uint8", "uint8")])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_avx2_exact_full_range(shape, ab):
    """AVX2 has no exact 8-bit dot: int16 pairs (``vpmaddwd``), any signedness of either side."""
    rng = np.random.default_rng(sum(shape) + 1)
    bt, m, k, n = shape
    a, b = _codes(rng, ab[0], (bt, m, k)), _codes(rng, ab[1], (bt, k, n))
    a.flat[-1], b.flat[-1] = np.iinfo(ab[0]).max, np.iinfo(ab[1]).min
    spec = ActMatmul(bt, m, k, n, *ab)
    assert actdot.mode_for(spec, AVX2).name == "avx2-wide"
    np.testing.assert_array_equal(run(spec, a, b, target=AVX2), actdot.reference(a, b))


@needs_vnni
@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
def test_extreme_sums(a_dtype):
    """Every product at its extreme: the correction and the int32 sums stay exact."""
    bt, m, k, n = 2, 9, 260, 48
    a = np.full((bt, m, k), np.iinfo(a_dtype).min if a_dtype == "int8" else 255, a_dtype)
    b = np.full((bt, k, n), -128, np.int8)
    b[1] = 127
    np.testing.assert_array_equal(run(ActMatmul(bt, m, k, n, a_dtype, "int8"), a, b), actdot.reference(a, b))


@needs_vnni
@pytest.mark.parametrize("knobs", [{"R": 1, "J": 1}, {"R": 3, "J": 2}, {"R": 16, "J": 1}, {"R": 5, "J": 4}])
def test_tiles(knobs):
    rng = np.random.default_rng(7)
    spec = ActMatmul(2, 45, 36, 64, "int8", "int8")
    a, b = _codes(rng, "int8", (2, 45, 36)), _codes(rng, "int8", (2, 36, 64))
    np.testing.assert_array_equal(run(spec, a, b, knobs), actdot.reference(a, b))


def test_invalid_knobs_are_refused():
    spec = ActMatmul(1, 8, 16, 48, "int8", "int8")  # 3 column vectors
    with pytest.raises(ValueError, match="knobs"):
        act_matmul(spec, tv.Target(CASCADELAKE), {"J": 2})
    with pytest.raises(ValueError, match="knobs"):
        act_matmul(spec, tv.Target(CASCADELAKE), {"R": 9})


def test_default_knobs_fit_registers():
    for spec in (ActMatmul(4, 128, 64, 128, "int8", "int8"), ActMatmul(1, 3, 8, 48, "uint8", "int8")):
        k = actdot.default_knobs(spec, actdot.mode_for(spec, tv.Target(CASCADELAKE)))
        assert 1 <= k["R"] <= spec.m and -(-spec.n // 16) % k["J"] == 0
        assert (k["R"] + 1) // 2 * k["J"] * 16 * 4 < 1024


def test_mode_per_target_and_operands():
    vnni = tv.Target(CASCADELAKE)
    spec = ActMatmul(1, 8, 8, 16, "int8", "int8")
    assert actdot.mode_for(spec, vnni).name == "avx512-vnni"
    assert actdot.mode_for(spec, AVX2).name == "avx2-wide"
    assert actdot.mode_for(spec, tv.Target(NEON)).name == "neon-sdot"
    # vpdpbusd needs a signed b: unsigned b on a VNNI target takes the int16 pairs
    assert actdot.mode_for(ActMatmul(1, 8, 8, 16, "int8", "uint8"), vnni).name == "avx2-wide"


def test_not_mine():
    """No instruction for the operands or the target: None, and the generic matmul stays."""
    vnni = tv.Target(CASCADELAKE)
    spec = ActMatmul(1, 8, 8, 16, "int8", "int8")
    assert act_matmul(spec, tv.Target({"kind": "llvm", "mcpu": "x86-64"})) is None  # SSE2 only
    assert act_matmul(spec, tv.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})) is None
    assert act_matmul(ActMatmul(1, 8, 8, 16, "uint8", "uint8"), tv.Target(NEON)) is None  # sdot: signed b
    assert act_matmul(ActMatmul(1, 8, 8, 16, "int16", "int8"), vnni) is None
    assert act_matmul(ActMatmul(1, 8, 1 << 16, 16, "uint8", "int8"), vnni) is None  # int32 could overflow
    assert act_matmul(spec, tv.Target({"kind": "cuda"})) is None


def _asm(spec, target_dict):
    target = tv.Target(target_dict)
    return tvm.compile(tvm.IRModule({"main": act_matmul(spec, target)}), target=target).mod.inspect_source("asm")


@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
def test_vnni_uses_vpdpbusd(a_dtype):
    asm = _asm(ActMatmul(2, 32, 64, 64, a_dtype, "int8"), CASCADELAKE)
    assert count(asm, "vpdpbusd") >= 8
    assert count(asm, "vpmulld") == 0


def test_avx2_uses_vpmaddwd():
    asm = _asm(ActMatmul(2, 32, 64, 64, "int8", "uint8"), {"kind": "llvm", "mcpu": "x86-64-v3"})
    assert count(asm, "vpmaddwd") >= 8
    assert count(asm, "vpmulld") == 0 and count(asm, "vpdpbusd") == 0


@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
def test_neon_uses_sdot(a_dtype):
    asm = _asm(ActMatmul(2, 32, 64, 64, a_dtype, "int8"), NEON)
    assert count(asm, "sdot") >= 8
