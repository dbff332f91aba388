"""The reference kernel families compile and are exact for every width pair."""
from __future__ import annotations

import numpy as np
import pytest
import tvm

from soniq_tvm import tvm_shim as tv
from soniq_tvm.qop import QOp, reference, weight_range
from soniq_tvm.schedules import registry
from soniq_tvm.targets import to_tvm_target


def _random_case(op: QOp, rng):
    lo, hi = weight_range(op.w_bit, op.w_signed)
    w = rng.integers(lo, hi + 1, op.w_shape)
    if op.bipolar:
        w = np.where(w >= 0, 1, -1)
    a = op.a_bit
    alo, ahi = (-(1 << (a - 1)), (1 << (a - 1)) - 1) if op.a_signed else (0, (1 << a) - 1)
    x = rng.integers(alo, ahi + 1, op.x_shape).astype(op.a_dtype)
    return x, w


def _run(family, op, x, w, target):
    packed = family.pack(w, op)
    lib = tvm.compile(family.primfunc(op, target), target=target)
    out = tvm.runtime.empty(op.out_shape, "int32")
    lib["main"](tv.tensor(x), *[tv.tensor(p) for p in packed], out)
    return out.numpy(), packed


@pytest.mark.parametrize("w_bits", range(1, 9))
@pytest.mark.parametrize("a_bits", [1, 2, 4, 8])
def test_bitplane_matmul_exact(w_bits, a_bits, host_target, rng):
    k = 19
    signed_act = a_bits > 1
    op = QOp("matmul", "L", (3, k), (k, 6), (w_bits,) * k, (a_bits,) * k, a_signed=signed_act,
             a_dtype="int8" if signed_act else "uint8")
    x, w = _random_case(op, rng)
    fam = registry.get("bitplane-ref")
    out, packed = _run(fam, op, x, w, to_tvm_target(host_target))
    np.testing.assert_array_equal(out, reference(x, w, op))
    np.testing.assert_array_equal(fam.reference(x, packed, op), reference(x, w, op))


@pytest.mark.parametrize("family", ["int8-ref", "bitplane-ref"])
@pytest.mark.parametrize("geometry", [
    dict(strides=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=1, k=3),
    dict(strides=(2, 2), padding=(3, 3, 3, 3), dilation=(1, 1), groups=1, k=7),
    dict(strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1, k=1),
    dict(strides=(1, 2), padding=(2, 1, 2, 0), dilation=(2, 1), groups=1, k=3),
    dict(strides=(1, 1), padding=(1, 1, 1, 1), dilation=(1, 1), groups=6, k=3),  # depthwise
])
def test_conv_geometries_exact(family, geometry, host_target, rng):
    geometry = dict(geometry)
    k = geometry.pop("k")
    groups = geometry["groups"]
    c = 6
    op = QOp("conv2d", "L", (1, c, 9, 10), (6, c // groups, k, k), (3,) * c, (4,) * c,
             a_signed=False, a_dtype="uint8", **geometry)
    x, w = _random_case(op, rng)
    out, _ = _run(registry.get(family), op, x, w, to_tvm_target(host_target))
    np.testing.assert_array_equal(out, reference(x, w, op))


def test_select_prefers_registered_cost(host_target):
    op = QOp("matmul", "L", (1, 16), (16, 4), (2,) * 16, (2,) * 16)
    fam = registry.select(op, to_tvm_target(host_target))
    assert fam.name != "int8-ref"
    assert fam.cost(op, to_tvm_target(host_target)) is not None
