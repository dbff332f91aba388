"""Quantizer and module numerics against an independent numpy reference of the
compiler's integer semantics: q = clamp(round_half_to_even(x / s), lo_c, hi_c)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from soniq_tvm.qop import QOp, reference  # noqa: E402
from soniq_tvm.torch import QConv2d, QLinear, prepare, snap  # noqa: E402
from soniq_tvm.torch.quant import fake_quant, noise_quant, quantize_int  # noqa: E402

from ._models import settled_cnn  # noqa: E402

pytestmark = pytest.mark.torch


def np_range(bits: int, signed: bool) -> tuple[int, int]:
    if not signed:
        return 0, 2**bits - 1
    if bits == 1:
        return -1, 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def np_quant(x: np.ndarray, scale, bits: np.ndarray, signed: bool) -> np.ndarray:
    """Integer codes, numpy only. ``bits`` broadcasts against ``x``."""
    v = (x.astype(np.float32) / np.float32(scale)).astype(np.float32)
    bits = np.broadcast_to(bits, x.shape)
    lo = np.vectorize(lambda b: np_range(int(b), signed)[0])(bits)
    hi = np.vectorize(lambda b: np_range(int(b), signed)[1])(bits)
    q = np.clip(np.round(v), lo, hi)  # np.round: half to even
    if signed:
        q = np.where(bits == 1, np.where(v >= 0, 1, -1), q)
    return q.astype(np.int64)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantize_int_matches_numpy(bits, signed):
    rng = np.random.default_rng(bits)
    s = 2.0**-3  # power of two: x / s is exact, so the .5 ties below are real ties
    ties = (np.arange(-300, 300) + 0.5) * s
    x = np.concatenate([ties, rng.normal(0, 20 * s, 1000)]).astype(np.float32)
    b = np.full(x.shape, bits)
    got = quantize_int(torch.from_numpy(x), torch.tensor(s), torch.from_numpy(b), signed).numpy()
    want = np_quant(x, s, b, signed)
    np.testing.assert_array_equal(got.astype(np.int64), want)
    if signed and bits == 1:
        assert set(np.unique(got)) <= {-1.0, 1.0}  # bipolar: never 0


def test_quantize_int_per_channel_ranges_and_fake_quant():
    rng = np.random.default_rng(0)
    bits = np.array([1, 2, 4, 8, 3])[:, None]  # per row
    x = rng.normal(0, 1, (5, 64)).astype(np.float32)
    s = np.float32(0.07)
    want = np_quant(x, s, bits, True)
    q = quantize_int(torch.from_numpy(x), torch.tensor(s), torch.from_numpy(bits), True)
    np.testing.assert_array_equal(q.numpy().astype(np.int64), want)
    fq = fake_quant(torch.from_numpy(x), torch.tensor(s), torch.from_numpy(bits), True)
    np.testing.assert_array_equal(fq.numpy(), (want.astype(np.float32) * s))


def test_fake_quant_straight_through_gradients():
    x = torch.tensor([0.1, 0.26, 5.0, -5.0], requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    y = fake_quant(x, s, torch.tensor(3.0), True)  # range [-4, 3]
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), [1, 1, 0, 0])  # clipped values pass nothing
    # LSQ: in range q - x/s, clipped: the bound
    np.testing.assert_allclose(s.grad.item(), (1 - 1.0) + (3 - 2.6) + 3 + (-4), atol=1e-5)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_noise_matches_quantizer_at_integer_bits(bits, signed):
    """At an integer precision the noise has the quantizer's range and spread: every
    value stays inside the channel's range and moves by at most half a step
    (a whole step of the bipolar grid) from the clipped input."""
    if signed and bits == 1:
        half = 1.0  # bipolar grid spacing is 2
    else:
        half = 0.5
    torch.manual_seed(0)
    s = 0.05
    x = torch.randn(20000) * 0.5
    b = torch.tensor(float(bits))
    y = noise_quant(x, torch.tensor(s), b, signed) / s
    lo, hi = np_range(bits, signed)
    assert y.min() >= lo - 1e-4 and y.max() <= hi + 1e-4
    clipped = torch.clamp(x / s, lo, hi)
    assert (y - clipped).abs().max() <= half + 1e-4
    # inside the range the perturbation is uniform with the step's variance
    inside = ((x / s) > lo + half) & ((x / s) < hi - half)
    if inside.sum() > 1000:
        err = (y - x / s)[inside]
        assert abs(err.mean()) < 0.03
        assert err.var().item() == pytest.approx((2 * half) ** 2 / 12, rel=0.1)


def test_noise_gives_precision_a_gradient():
    x = torch.randn(4096) * 3
    b = torch.tensor(3.0, requires_grad=True)
    y = noise_quant(x, torch.tensor(0.5), b, True)
    ((y - x) ** 2).mean().backward()
    assert b.grad is not None and b.grad.item() < 0  # more bits, less clipping error


def _np_conv_int(xq, wq, layer):
    op = QOp(kind="conv2d", layer="t", x_shape=xq.shape, w_shape=wq.shape, w_bits=(8,) * wq.shape[1],
             a_bits=(8,) * xq.shape[1], strides=tuple(layer.stride), padding=layer.pads(xq.shape[-2:]))
    return reference(xq, wq, op)


@pytest.mark.parametrize("weight_axis", ["in", "out"])
@pytest.mark.parametrize("palette", [(2, 8), (1, 4)])
def test_qconv2d_eval_equals_integer_reference(palette, weight_axis):
    """Eval-mode QConv2d == s_x * s_w[o] * (int conv of the numpy codes) + bias: the
    exact factorisation the compiled kernels use."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)
    layer = QConv2d(conv, palette, weight_axis, act_signed=True)
    rng = np.random.default_rng(1)
    for p in layer.precisions():  # a random mix of the two levels
        p.snap(torch.from_numpy(rng.choice(palette, p.channels)))
    layer.init_weight_scale()
    x = torch.randn(2, 6, 9, 9)
    layer.eval()
    with torch.no_grad():
        y = layer(x).numpy()
    steps = layer.act.channel_scale(layer.act_precision.bits.float()).detach().numpy()  # one per width
    assert len(set(steps.tolist())) == len(set(layer.act_precision.bits.tolist()))
    a_bits = layer.act.effective_bits(layer.act_precision.bits.float()).numpy()
    xq = np_quant(x.numpy(), steps.reshape(1, -1, 1, 1), a_bits.reshape(1, -1, 1, 1), True)
    w_bits = layer.w_prec.bits.numpy()
    w_bits = w_bits.reshape(1, -1, 1, 1) if weight_axis == "in" else w_bits.reshape(-1, 1, 1, 1)
    s_w = layer.weight_scale().detach().numpy().reshape(-1)
    wq = np_quant(layer.weight.detach().numpy(), s_w.reshape(-1, 1, 1, 1), w_bits, True)
    want = layer.bias.detach().numpy().reshape(1, -1, 1, 1).astype(np.float64)
    for step in sorted(set(steps.tolist())):  # one exact integer conv per step group
        idx = np.flatnonzero(steps == step)
        acc = _np_conv_int(xq[:, idx], wq[:, idx], layer)
        want = want + acc * (np.float32(step) * s_w).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    exported = layer.export_weight()[0]
    np.testing.assert_array_equal(exported.astype(np.int64), wq)


def test_qlinear_eval_equals_integer_reference():
    torch.manual_seed(2)
    lin = torch.nn.Linear(13, 6)
    layer = QLinear(lin, (2, 8), "in", act_signed=False)
    layer.w_prec.snap(torch.tensor([2, 8] * 6 + [2]))
    layer.init_weight_scale()
    x = torch.rand(3, 4, 13) * 2  # 3-D input: channels on the last axis
    layer.eval()
    with torch.no_grad():
        y = layer(x).numpy()
    steps = layer.act.channel_scale(layer.w_prec.bits.float()).detach().numpy()  # one per width
    xq = np_quant(x.numpy(), steps, layer.w_prec.bits.numpy(), False)
    s_w = layer.weight_scale().detach().numpy().reshape(-1)
    wq = np_quant(layer.weight.detach().numpy(), s_w[:, None], layer.w_prec.bits.numpy()[None, :], True)
    want = layer.bias.detach().numpy().astype(np.float64)
    for step in sorted(set(steps.tolist())):
        idx = np.flatnonzero(steps == step)
        want = want + (xq[..., idx] @ wq[:, idx].T) * (np.float32(step) * s_w)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert xq.max() <= 255 and xq.min() >= 0
    assert (xq[..., layer.w_prec.bits.numpy() == 2] <= 3).all()  # 2-bit unsigned channels


def test_prepare_folds_batchnorm_and_keeps_float_function():
    """BN folding is exact: with every channel at 8 bits and a tiny step, the
    prepared model is the float model up to quantization error."""
    model = settled_cnn()
    q = prepare(model, palette=(7, 8), target_bits=8.0, init_bits=8.0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in q.modules())
    snap(q)
    x = torch.rand(16, 1, 8, 8)
    q.eval()
    with torch.no_grad():
        ref, got = model(x), q(x)
    assert torch.corrcoef(torch.stack([ref.flatten(), got.flatten()]))[0, 1] > 0.999


def test_signedness_follows_relu():
    q = prepare(settled_cnn(), palette=(2, 8), target_bits=4.0)
    assert int(q.conv1.act.signed_flag) == -1  # graph input: decided on data
    assert q.conv2.act.signed is False  # after ReLU
    assert q.fc.act.signed is False  # ReLU -> max-pool -> flatten
    q(torch.rand(2, 1, 8, 8))
    assert q.conv1.act.signed is False  # non-negative data
