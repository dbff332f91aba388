"""Example SONIQ models built in code: a small CNN and a transformer encoder block.

Both are ``soniq-qdq/1`` models with two-level per-channel precision (by default
half the channels at 2 bits, half at 8), deterministic for a given seed, and need
no download. They are what the tests, tutorials and benchmarks compile.

Precision is *tied* the SONIQ way: a weight's width follows its **input** channel
(``soniq.axis`` 1 for Conv, 0 for MatMul ``[K, N]``, 1 for Gemm ``[N, K]``) and
equals the width of the activation channel it multiplies. Each activation has one
step per precision group by default (``scales="group"``: the 2-bit channels share
one step, the 8-bit channels another; "tensor" and "channel" are the other
layouts), chosen by :func:`~soniq_tvm.builder.calibrate_scales` on a random input
propagated through the quantized graph built so far (onnx's reference evaluator,
numpy only); weights have one scale per output channel.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
import onnx

from .annotation import save_model
from .builder import SCALE_LAYOUTS, QDQBuilder, calibrate_scales, choose_bits, quantize_weights
from .errors import ModelLoadError

__all__ = ["example_cnn", "example_transformer", "example_inputs", "save_examples"]

_BN_EPS = 1e-5
_CALIBRATION_INPUTS = 8


class _Calibrated:
    """A :class:`QDQBuilder` plus a few random inputs, so every ``act`` call picks
    its scale from the values the graph built so far really produces."""

    def __init__(self, builder: QDQBuilder, feeds: Sequence[Mapping[str, np.ndarray]], per: str = "group"):
        if per not in SCALE_LAYOUTS:
            raise ValueError(f"scales={per!r} is not one of {', '.join(SCALE_LAYOUTS)}")
        self.b = builder
        self.feeds = [dict(f) for f in feeds]
        self.per = per

    def values(self, x: str) -> np.ndarray:
        """``x`` for every calibration input, stacked along the batch axis."""
        return np.concatenate([self.b.evaluate([x], f)[0] for f in self.feeds], axis=0)

    def act(
        self, x: str, bits: Sequence[int], signed: bool, axis: int, name: str | None = None,
        per: str | None = None,
    ) -> str:
        scale = calibrate_scales(self.values(x), bits, signed, axis, per=per or self.per)
        return self.b.quant_act(x, scale, bits, signed, axis=axis, name=name)


def _random_feeds(rng: np.random.Generator, name: str, shape: Sequence[int], n: int) -> list[dict]:
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _folded_conv(
    rng: np.random.Generator, out_ch: int, in_ch: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """He-initialised conv weights with a random BatchNorm folded in: (w, bias)."""
    w = rng.standard_normal((out_ch, in_ch, k, k)) * np.sqrt(2.0 / (in_ch * k * k))
    gamma = rng.uniform(0.5, 1.5, out_ch)
    beta = rng.normal(0.0, 0.1, out_ch)
    mean = rng.normal(0.0, 0.1, out_ch)
    var = rng.uniform(0.5, 1.5, out_ch)
    g = gamma / np.sqrt(var + _BN_EPS)
    return w * g[:, None, None, None], (beta - mean * g).astype(np.float32)


def _qconv(
    c: _Calibrated,
    rng: np.random.Generator,
    x: str,
    in_bits: Sequence[int],
    out_ch: int,
    name: str,
    out_bits: Sequence[int] | None = None,
) -> str:
    """3x3 conv (pad 1) with BN folded. Weight widths are tied to the input
    channels (``in_bits``) unless ``out_bits`` asks for per-output-channel widths."""
    w, bias = _folded_conv(rng, out_ch, len(in_bits), 3)
    bits, axis = (in_bits, 1) if out_bits is None else (out_bits, 0)
    w_int, scale = quantize_weights(w, bits, axis=axis, signed=True, scale_axis=0)
    return c.b.conv(x, w_int, scale, bits, w_axis=axis, bias=bias, pads=(1, 1, 1, 1), name=name)


def example_cnn(
    seed: int = 0,
    palette: Sequence[int] = (2, 8),
    low_fraction: float = 0.5,
    image: int = 16,
    channels: Sequence[int] = (16, 32),
    classes: int = 10,
    scales: str = "group",
) -> onnx.ModelProto:
    """A small residual CNN, input ``x [1, 3, image, image]``, output ``logits``.

    stem conv 3 -> 3/4 * channels[0] (12 by default: not a multiple of 8) ->
    conv -> channels[0] -> residual block (conv tied, conv with per-output-channel
    weight widths, Add) -> MaxPool 2x2 -> conv -> channels[1] ->
    GlobalAveragePool -> Flatten -> float neck (Mul, Add: standardises the pooled
    features) -> Gemm -> ``classes``. Every conv is followed by ReLU, so the
    activations between the convs are unsigned; the input and the head's input
    are signed.
    """
    rng = np.random.default_rng(seed)
    c0, c1 = int(channels[0]), int(channels[1])
    stem = max(1, 3 * c0 // 4)
    b = QDQBuilder("soniq_example_cnn")
    x = b.input("x", [1, 3, image, image])
    c = _Calibrated(b, _random_feeds(rng, "x", (1, 3, image, image), _CALIBRATION_INPUTS), scales)

    def bits(n: int) -> tuple[int, ...]:
        return choose_bits(n, palette, low_fraction, rng)

    a_in = bits(3)
    h = c.act(x, a_in, signed=True, axis=1, name="x_q")
    h = b.node("Relu", [_qconv(c, rng, h, a_in, stem, "stem")], name="stem_relu")
    a_stem = bits(stem)
    h = c.act(h, a_stem, signed=False, axis=1, name="stem_q")
    h = b.node("Relu", [_qconv(c, rng, h, a_stem, c0, "conv1")], name="conv1_relu")
    a_block = bits(c0)
    block_in = c.act(h, a_block, signed=False, axis=1, name="block_in_q")
    h = b.node("Relu", [_qconv(c, rng, block_in, a_block, c0, "block_conv1")], name="block_relu1")
    a_mid = bits(c0)
    h = c.act(h, a_mid, signed=False, axis=1, name="block_mid_q")
    h = _qconv(c, rng, h, a_mid, c0, "block_conv2", out_bits=bits(c0))
    h = b.node("Add", [h, block_in], name="block_add")
    h = b.node("Relu", [h], name="block_relu2")
    h = b.node("MaxPool", [h], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    a_pool = bits(c0)
    h = c.act(h, a_pool, signed=False, axis=1, name="pool_q")
    h = b.node("Relu", [_qconv(c, rng, h, a_pool, c1, "conv2")], name="conv2_relu")
    h = b.node("GlobalAveragePool", [h], name="gap")
    h = b.node("Flatten", [h], name="flatten", axis=1)
    # Pooled features of different inputs differ by a few percent of their mean:
    # a float "neck" standardises them (like a BatchNorm1d) so the head's
    # quantizer resolves what distinguishes one input from another.
    # The gain is capped (std floored at a tenth of the typical std) so that
    # channels which barely vary are not amplified into rounding noise.
    pooled = c.values(h)
    mean, std = pooled.mean(axis=0), pooled.std(axis=0)
    std = np.maximum(std, 0.1 * float(np.median(std)) + 1e-6)
    h = b.node("Mul", [h, (1.0 / std).astype(np.float32)], name="neck_scale")
    h = b.node("Add", [h, (-mean / std).astype(np.float32)], name="neck_shift")
    a_head = bits(c1)
    h = c.act(h, a_head, signed=True, axis=1, name="head_q")
    w = rng.standard_normal((classes, c1)) * np.sqrt(1.0 / c1)
    w_int, scale = quantize_weights(w, a_head, axis=1, signed=True, scale_axis=0)
    bias = rng.normal(0.0, 0.1, classes).astype(np.float32)
    logits = b.gemm(h, w_int, scale, a_head, w_axis=1, bias=bias, name="head")
    b.output(logits, "logits")
    return b.build()


def _linear(
    c: _Calibrated,
    rng: np.random.Generator,
    x: str,
    in_bits: Sequence[int],
    out_features: int,
    name: str,
) -> str:
    """``x @ W + b`` with ``W [K, N]`` quantized, widths tied to the K channels."""
    k = len(in_bits)
    w = rng.standard_normal((k, out_features)) * np.sqrt(1.0 / k)
    w_int, scale = quantize_weights(w, in_bits, axis=0, signed=True, scale_axis=1)
    bias = rng.normal(0.0, 0.02, out_features).astype(np.float32)
    return c.b.matmul(x, w_int, scale, in_bits, w_axis=0, bias=bias, name=name)


def _layer_norm(b: QDQBuilder, rng: np.random.Generator, x: str, hidden: int, name: str) -> str:
    gamma = rng.uniform(0.8, 1.2, hidden).astype(np.float32)
    beta = rng.normal(0.0, 0.05, hidden).astype(np.float32)
    return b.node("LayerNormalization", [x, gamma, beta], name=name, axis=-1, epsilon=1e-5)


def example_transformer(
    seed: int = 0,
    palette: Sequence[int] = (2, 8),
    low_fraction: float = 0.5,
    seq: int = 16,
    hidden: int = 32,
    heads: int = 2,
    ffn: int = 64,
    scales: str = "group",
) -> onnx.ModelProto:
    """One post-norm encoder block, input ``x [1, seq, hidden]``, output ``y``.

    Q/K/V, output and FFN projections are MatMuls with integer weights tied to the
    hidden (last) axis of their quantized input. Both attention matmuls multiply
    two quantized activations whose widths are tied along the reduction: Q (last
    axis) with K^T (axis 2) over the head dimension, and the Softmax probabilities
    (last axis) with V (axis 2) over the key positions. Softmax, Gelu and
    LayerNormalization stay in float, as do the residual Adds.
    """
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    rng = np.random.default_rng(seed)
    dh = hidden // heads
    b = QDQBuilder("soniq_example_transformer")
    x = b.input("x", [1, seq, hidden])
    c = _Calibrated(b, _random_feeds(rng, "x", (1, seq, hidden), _CALIBRATION_INPUTS), scales)

    def bits(n: int) -> tuple[int, ...]:
        return choose_bits(n, palette, low_fraction, rng)

    def heads_first(t: str, name: str) -> str:  # [1, seq, hidden] -> [1, heads, seq, dh]
        t = b.node("Reshape", [t, np.array([1, seq, heads, dh], np.int64)], name=f"{name}_split")
        return b.node("Transpose", [t], name=f"{name}_heads", perm=[0, 2, 1, 3])

    a_x = bits(hidden)
    xq = c.act(x, a_x, signed=True, axis=2, name="x_q")
    q = heads_first(_linear(c, rng, xq, a_x, hidden, "q_proj"), "q")
    k = heads_first(_linear(c, rng, xq, a_x, hidden, "k_proj"), "k")
    v = heads_first(_linear(c, rng, xq, a_x, hidden, "v_proj"), "v")
    kt = b.node("Transpose", [k], name="k_t", perm=[0, 1, 3, 2])

    a_dh = bits(dh)
    scores = b.matmul_act(
        c.act(q, a_dh, signed=True, axis=3, name="q_q"),
        c.act(kt, a_dh, signed=True, axis=2, name="kt_q"),
        name="scores",
    )
    scores = b.node("Mul", [scores, np.array(1.0 / np.sqrt(dh), np.float32)], name="scores_scaled")
    probs = b.node("Softmax", [scores], name="softmax", axis=-1)
    a_keys = bits(seq)
    # one step per tensor here: ONNX Runtime's optimiser (default level) fuses this
    # MatMul into MatMulIntegerToFloat, which refuses per-channel zero points
    ctx = b.matmul_act(
        c.act(probs, a_keys, signed=False, axis=3, name="probs_q", per="tensor"),
        c.act(v, a_keys, signed=True, axis=2, name="v_q", per="tensor"),
        name="context",
    )
    ctx = b.node("Transpose", [ctx], name="context_merge", perm=[0, 2, 1, 3])
    ctx = b.node("Reshape", [ctx, np.array([1, seq, hidden], np.int64)], name="context_flat")

    a_ctx = bits(hidden)
    ctx = c.act(ctx, a_ctx, signed=True, axis=2, name="context_q")
    attn = _linear(c, rng, ctx, a_ctx, hidden, "out_proj")
    h = _layer_norm(b, rng, b.node("Add", [attn, x], name="attn_residual"), hidden, "ln1")

    a_h = bits(hidden)
    f = _linear(c, rng, c.act(h, a_h, signed=True, axis=2, name="ln1_q"), a_h, ffn, "ffn1")
    f = b.node("Gelu", [f], name="gelu")
    a_f = bits(ffn)
    f = _linear(c, rng, c.act(f, a_f, signed=True, axis=2, name="gelu_q"), a_f, hidden, "ffn2")
    y = _layer_norm(b, rng, b.node("Add", [f, h], name="ffn_residual"), hidden, "ln2")
    b.output(y, "y")
    return b.build()


def example_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal float32 inputs for every graph input of ``model``
    (initializers listed as inputs excluded; symbolic dimensions become 1)."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else 1 for d in vi.type.tensor_type.shape.dim
        ]
        feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def save_examples(directory: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write ``example_cnn.onnx`` and ``example_transformer.onnx`` into
    ``directory`` (created if needed). Returns model name -> path."""
    folder = os.fspath(directory)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"cannot create the folder: {e.strerror or e}", file=folder) from None
    paths = {}
    for name, make in (("example_cnn", example_cnn), ("example_transformer", example_transformer)):
        path = os.path.join(folder, f"{name}.onnx")
        save_model(make(seed=seed), path)
        paths[name] = path
    return paths
