"""Single-op annotated models with an exact integer reference, for the tests."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from soniq_tvm.annotation import bit_range
from soniq_tvm.builder import QDQBuilder

X_SCALE = 2.0 ** -4  # powers of two: x / scale is exact, so codes are unambiguous
W_SCALE = 2.0 ** -6


@dataclass
class Case:
    model: object
    x: np.ndarray  # float input whose codes are exactly xq
    xq: np.ndarray  # integer activation codes (after per-channel clamping)
    w: np.ndarray  # integer weights as the op uses them (conv OIHW / matmul [K, N])
    scale: np.ndarray  # per output channel: X_SCALE * w_scale
    kind: str


def _weights(rng, shape, bits, axis, signed=True):
    w = np.zeros(shape, np.int64)
    for c, b in enumerate(bits):
        lo, hi = bit_range(b, signed)
        idx = [slice(None)] * len(shape)
        idx[axis] = c
        vals = rng.integers(lo, hi + 1, w[tuple(idx)].shape)
        if signed and b == 1:
            vals = np.where(vals >= 0, 1, -1)
        w[tuple(idx)] = vals
    return w.astype(np.int8)


def _codes(rng, shape, bits, axis, signed):
    q = np.zeros(shape, np.int64)
    for c, b in enumerate(bits):
        lo, hi = bit_range(b, signed) if (signed and b > 1) or not signed else (-1, 0)
        idx = [slice(None)] * len(shape)
        idx[axis] = c
        q[tuple(idx)] = rng.integers(lo - 1, hi + 2, q[tuple(idx)].shape)  # a little out of range: clamped
        q[tuple(idx)] = np.clip(q[tuple(idx)], lo, hi)
    return q


def conv_case(rng, cin, cout, a_bits, w_bits, w_axis=1, a_signed=False, hw=(6, 7), k=3, stride=1, pad=1,
              group=1) -> Case:
    b = QDQBuilder("conv_case")
    x = b.input("x", [1, cin, *hw])
    xd = b.quant_act(x, X_SCALE, a_bits, signed=a_signed, axis=1)
    w = _weights(rng, (cout, cin // group, k, k), w_bits, w_axis)
    w_scale = np.full(cout, W_SCALE, np.float32) * (1 + np.arange(cout) % 3)
    y = b.conv(xd, w, w_scale, w_bits, w_axis=w_axis, strides=(stride, stride), pads=(pad,) * 4, group=group)
    b.output(y, "y")
    xq = _codes(rng, (1, cin, *hw), a_bits, 1, a_signed)
    return Case(b.build(), (xq * X_SCALE).astype(np.float32), xq, w, (X_SCALE * w_scale).astype(np.float32),
                "conv2d")


def matmul_case(rng, lead, k, n, a_bits, w_bits, w_axis=0, a_signed=True) -> Case:
    b = QDQBuilder("matmul_case")
    x = b.input("x", [*lead, k])
    xd = b.quant_act(x, X_SCALE, a_bits, signed=a_signed, axis=len(lead))
    w = _weights(rng, (k, n), w_bits, w_axis)
    w_scale = np.full(n, W_SCALE, np.float32)
    y = b.matmul(xd, w, w_scale, w_bits, w_axis=w_axis)
    b.output(y, "y")
    xq = _codes(rng, (*lead, k), a_bits, len(lead), a_signed)
    return Case(b.build(), (xq * X_SCALE).astype(np.float32), xq, w, (X_SCALE * w_scale).astype(np.float32),
                "matmul")


def two_level(count: int, low: int, high: int, fraction: float, rng) -> list[int]:
    """``round(fraction * count)`` channels at ``low`` bits, scattered; the rest ``high``."""
    n_low = int(round(fraction * count))
    bits = np.full(count, high)
    bits[rng.permutation(count)[:n_low]] = low
    return [int(v) for v in bits]


# ---- files as users have them: torch.onnx.export + ONNX Runtime's quantizer ----------
def ort_quantize(fp32_path, out_path, calibration, *, fmt="QDQ", activation="QUInt8", per_channel=True):
    """``quantize_static`` as a user runs it (MinMax calibration over ``calibration``,
    a list of input dicts); ``fmt``: "QDQ" or "QOperator"; ``activation``:
    "QUInt8" or "QInt8"; weights QInt8."""
    import logging

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration)

        def get_next(self):
            return next(self._it, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=getattr(QuantFormat, fmt),
                        per_channel=per_channel, reduce_range=False,
                        activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return str(out_path)


def exported_model(name: str, workdir, seed: int = 0):
    """A tiny benchmark model (``resnet18`` or ``bert``) exported by
    ``torch.onnx.export`` (initializers named ``onnx::...``) and four calibration
    inputs."""
    from benchmarks import models

    bm = models.build(name, workdir, tiny=True, seed=seed)
    return bm, [bm.random_input(s) for s in range(4)]
