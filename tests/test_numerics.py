"""Compiled single ops against the exact integer reference and ONNX Runtime.

Inputs are exact multiples of power-of-two scales, so the integer codes are
unambiguous and the float output of the compiled module must equal
``float32(integer accumulator) * float32(scale)`` bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest

import soniq_tvm
from soniq_tvm.qop import QOp, reference
from soniq_tvm.verify import compare, ort_reference

from .helpers import conv_case, matmul_case, two_level


def _exact(case, out):
    if case.kind == "conv2d":
        op = QOp("conv2d", "t", case.xq.shape, case.w.shape, (8,), (8,), padding=(1, 1, 1, 1))
        acc = reference(case.xq, case.w, op)
        expect = acc.astype(np.float32) * case.scale.reshape(1, -1, 1, 1)
    else:
        acc = case.xq.astype(np.int64) @ case.w.astype(np.int64)
        expect = acc.astype(np.float32) * case.scale
    np.testing.assert_array_equal(out, expect.astype(np.float32))


def _check(case, split="always"):
    """Compile (every mixed layer split into its channel groups, unless ``split``
    says otherwise) and check bit-exactness and agreement with ONNX Runtime."""
    m = soniq_tvm.compile(case.model, "llvm", split=split)
    out = m.run({"x": case.x})[0]
    _exact(case, out)
    agreement = compare("y", out, ort_reference(case.model, {"x": case.x})[0])
    assert agreement.ok, agreement
    return m


@pytest.mark.parametrize("w_bits", range(1, 9))
@pytest.mark.parametrize("a_bits", range(1, 9))
def test_matmul_every_width_pair(w_bits, a_bits, rng):
    """Low channels at (w_bits, a_bits), the rest at 8: split along K, 13 channels."""
    k = 13
    low = rng.permutation(k)[:6]
    a = [a_bits if c in low else 8 for c in range(k)]
    w = [w_bits if c in low else 8 for c in range(k)]
    m = _check(matmul_case(rng, (1, 3), k, 5, a, w, w_axis=0, a_signed=a_bits != 1))
    layer = m.plan.layers[0]
    expect_groups = 1 if (w_bits, a_bits) == (8, 8) else 2
    assert len(layer.groups) == expect_groups
    assert {(g.w_bits, g.a_bits) for g in layer.groups} == {(w_bits, a_bits), (8, 8)}


@pytest.mark.parametrize("w_bits,a_bits", [(1, 1), (2, 2), (4, 8), (8, 3)])
def test_auto_split_is_exact_either_way(w_bits, a_bits, rng):
    """split='auto' keeps a layer whole at its widest width where splitting does
    not pay: the results are bit-identical to the split module's."""
    k = 21
    low = rng.permutation(k)[:15]
    a = [a_bits if c in low else 8 for c in range(k)]
    w = [w_bits if c in low else 8 for c in range(k)]
    case = matmul_case(rng, (4, 3), k, 19, a, w, w_axis=0, a_signed=a_bits != 1)
    auto = _check(case, split="auto")
    split = _check(case, split="always")
    np.testing.assert_array_equal(auto.run({"x": case.x})[0], split.run({"x": case.x})[0])
    layer = auto.plan.layers[0]
    assert len(split.plan.layers[0].groups) == 2
    if len(layer.groups) == 1:
        assert (layer.groups[0].w_bits, layer.groups[0].a_bits) == (8, 8)
        assert any("run whole at their widest width" in n for n in auto.plan.notes), auto.plan.notes
    with pytest.raises(soniq_tvm.SoniqError, match="split="):
        soniq_tvm.inspect(case.model, split="sometimes")


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("axis", ["in", "out", "both"])
def test_conv_split_axes_and_fractions(fraction, axis, rng):
    cin, cout = 10, 12  # not multiples of 8
    a_bits = two_level(cin, 2, 8, fraction, rng) if axis in ("in", "both") else [8] * cin
    if axis == "in":
        w_bits, w_axis = list(a_bits), 1  # tied: weight slice follows its activation channel
    else:
        w_bits, w_axis = two_level(cout, 3, 8, fraction, rng), 0
    case = conv_case(rng, cin, cout, a_bits, w_bits, w_axis=w_axis, a_signed=False)
    _check(case)
    layer = soniq_tvm.inspect(case.model, family="bitplane-ref").layers[0]
    n_in = len(set(a_bits))
    n_out = len(set(w_bits)) if w_axis == 0 else 1
    assert len(layer.groups) == n_in * n_out
    assert sum(g.bytes_int8 for g in layer.groups) == cin * cout * 9
    packed = sum(cout_g * wb * ((cin_g * 9 + 7) // 8) for cout_g, cin_g, wb in
                 ((g.out_channels, g.in_channels, g.w_bits) for g in layer.groups))
    assert layer.bytes_after == packed  # bit-planes: each group at its own width


@pytest.mark.parametrize("a_signed", [True, False])
def test_conv_strided_and_grouped(a_signed, rng):
    case = conv_case(rng, 8, 8, [4] * 8, [2] * 8, w_axis=1, a_signed=a_signed, k=3, stride=1, pad=1, group=1)
    _check(case)
    dw = conv_case(rng, 6, 6, two_level(6, 2, 8, 0.5, rng), [4] * 6, w_axis=0, a_signed=a_signed, group=6)
    m = soniq_tvm.compile(dw.model, "llvm")
    out = m.run({"x": dw.x})[0]
    assert compare("y", out, ort_reference(dw.model, {"x": dw.x})[0]).ok


def test_bipolar_one_bit_weights(rng):
    _check(matmul_case(rng, (2,), 16, 7, [1] * 16, [1] * 16, a_signed=False))
