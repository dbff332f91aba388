"""Activation zero points (``QOp.a_zero``) folded by the kernels, bit-exact.

ORT's quantizer writes asymmetric u8 activations (and s8 ones) with a zero point
per tensor. The kernels read the stored codes and compute ``sum (x - z) * w``;
a padding pixel stands for the code ``z`` (a real zero). The int8-dot families
fold ``z`` into their per-channel correction, the references subtract it; the
other families refuse such ops. Padded convs are the sharp case: a kernel that
padded with 0 instead of ``z`` differs on every border pixel.
"""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.qop import reference  # noqa: E402
from soniq_tvm.schedules import registry  # noqa: E402

from test_cpu_families import AVX2, HOST_T, check, make_op, needs_avx2, needs_vnni  # noqa: E402

ARM = tv.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"], "num-cores": 2})

# (id, kind, kwargs): padded 3x3 (border pixels), the 7x7 stem, a strided 1x1,
# channel padding inside words, a matmul that the VNNI kernel reads in place, a GEMV
SHAPES = [
    ("3x3-pad", "conv2d", dict(x=(1, 40, 6, 11), w=(20, 40, 3, 3), padding=(1, 1, 1, 1))),
    ("7x7-s2-stem", "conv2d", dict(x=(1, 3, 17, 15), w=(9, 3, 7, 7), strides=(2, 2), padding=(3, 3, 3, 3))),
    ("1x1-s2", "conv2d", dict(x=(1, 64, 12, 12), w=(48, 64, 1, 1), strides=(2, 2))),
    ("3x3-c35-asym", "conv2d", dict(x=(1, 35, 5, 17), w=(17, 35, 3, 1), padding=(1, 0, 1, 0))),
    ("matmul", "matmul", dict(x=(37, 96), w=(96, 64))),
    ("gemv-k13", "matmul", dict(x=(1, 13), w=(13, 24))),
]
U8_ZEROS = [3, 128, 255]
S8_ZEROS = [-128, 77]


def _op(kind, kw, signed, zero):
    return make_op(kind, 8, 8, a_signed=signed, a_zero=zero, **dict(kw))


@pytest.mark.parametrize("name,kind,kw", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("signed,zero", [(False, 255), (True, -128)])
def test_references(name, kind, kw, signed, zero):
    for fam in ("int8-ref", "bitplane-ref"):
        check(fam, _op(kind, kw, signed, zero), HOST_T)


@needs_vnni
@pytest.mark.parametrize("name,kind,kw", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("signed,zero", [(False, z) for z in U8_ZEROS] + [(True, z) for z in S8_ZEROS])
def test_vnni(name, kind, kw, signed, zero):
    check("x86-avx512-vnni", _op(kind, kw, signed, zero), HOST_T)


@needs_avx2
@pytest.mark.parametrize("name,kind,kw", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("signed,zero", [(False, 3), (True, 77)])
def test_avx2(name, kind, kw, signed, zero):
    check("x86-avx2-dot", _op(kind, kw, signed, zero), AVX2)


@needs_vnni
def test_worst_case_codes():
    """Every activation at the far end from the zero point, every weight at -128."""
    for zero, x_val in ((0 + 1, 255), (255, 0), (128, 0)):
        op = _op("conv2d", dict(x=(1, 64, 5, 9), w=(32, 64, 3, 3), padding=(1, 1, 1, 1)), False, zero)
        fam = registry.get("x86-avx512-vnni")
        x = np.full(op.x_shape, x_val, np.uint8)
        w = np.full(op.w_shape, -128, np.int64)
        lib = tvm.compile(fam.primfunc(op, HOST_T), target=HOST_T)
        out = tvm.runtime.empty(op.out_shape, "int32")
        lib["main"](tv.tensor(x), *[tv.tensor(p) for p in fam.pack(w, op)], out)
        np.testing.assert_array_equal(out.numpy(), reference(x, w, op))


def test_neon_builds():
    """The NEON sdot kernel with a zero point compiles for aarch64 (cross-built here)."""
    op = _op("conv2d", dict(x=(1, 40, 6, 11), w=(20, 40, 3, 3), padding=(1, 1, 1, 1)), False, 3)
    fam = registry.get("arm-neon-sdot")
    assert fam.cost(op, ARM) is not None
    src = tvm.compile(fam.primfunc(op, ARM), target=ARM).mod.inspect_source("asm")
    assert "sdot" in src


def test_reference_pads_with_the_zero_point():
    """The numpy twin: a 1x1-padded conv of an all-z image is 0 everywhere."""
    op = _op("conv2d", dict(x=(1, 4, 3, 3), w=(2, 4, 3, 3), padding=(1, 1, 1, 1)), False, 3)
    x = np.full(op.x_shape, 3, np.uint8)
    w = np.ones(op.w_shape, np.int64)
    assert not reference(x, w, op).any()
    assert reference(x + 1, w, op)[0, 0, 1, 1] == 36  # (4 - 3) x 36 taps


def test_other_families_refuse():
    """Families that cannot fold a zero point say 'not mine'."""
    op = make_op("matmul", 2, 8, a_signed=False, x=(1, 4096), w=(4096, 64), a_zero=3)
    folding = {"int8-ref", "bitplane-ref", "x86-avx2-dot", "x86-avx512-vnni", "arm-neon-sdot"}
    for fam in registry.families():
        if fam.name in folding:
            continue
        for t in (HOST_T, AVX2, ARM):
            assert fam.cost(op, t) is None, (fam.name, t)
    assert registry.select(op, HOST_T).name in ("bitplane-ref", "x86-avx512-vnni", "x86-avx2-dot")
