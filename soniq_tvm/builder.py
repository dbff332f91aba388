"""Build annotated ``soniq-qdq/1`` models from numpy: :class:`QDQBuilder` and the
quantisation helpers it uses (per-channel weight quantisation, activation scale
calibration, random two-level bit assignments). Tests, examples, benchmarks and
the PyTorch exporter produce their ONNX files through it; the format itself (the
reader, the cross-checks, the writer of annotations) lives in :mod:`annotation`.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .annotation import (
    IR_VERSION,
    KEY_AXIS,
    KEY_BITS,
    KEY_SIGNED,
    MAX_BITS,
    OPSET_RANGE,
    _check_widths,
    _set_props,
    bit_range,
    check_model,
    check_weight_values,
    write_quant_map,
)
from .errors import AnnotationError, UnsupportedModelError

__all__ = ["quantize_weights", "calibrate_scale", "calibrate_scales", "choose_bits", "QDQBuilder",
           "SCALE_LAYOUTS"]

# how an activation's steps are laid out: one per tensor, one per precision group
# (the channels of one width share a step), one per channel
SCALE_LAYOUTS = ("tensor", "group", "channel")

# ---------------------------------------------------------------------------
# Quantization helpers (numpy)
# ---------------------------------------------------------------------------
def _per_channel(bits: int | Sequence[int], channels: int, what: str) -> np.ndarray:
    if isinstance(bits, (int, np.integer)):
        return np.full(channels, int(bits), np.int64)
    arr = np.asarray(list(bits), np.int64)
    if arr.shape != (channels,):
        raise AnnotationError(
            f"{what}: {arr.size} bit widths given for {channels} channels",
        )
    return arr


def _along(v: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """``v`` reshaped to broadcast along ``axis`` of a ``rank``-D array."""
    shape = [1] * rank
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def quantize_weights(
    w_float: np.ndarray,
    bits_per_channel: int | Sequence[int],
    axis: int,
    signed: bool = True,
    *,
    scale_axis: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float weights to per-channel widths with a symmetric scale.

    ``bits_per_channel`` runs along ``axis`` (1 for SONIQ's tied Conv case);
    the scale runs along ``scale_axis``, the output channel (0 for Conv and
    Gemm ``[N, K]``, 1 for MatMul ``[K, N]``). Each output channel's scale is
    the one, among a grid of candidates, that gives the least squared error once
    every element is rounded and clipped to its own channel's range (signed
    1-bit channels become bipolar ``sign(w)``). Returns ``(w_int, scale)``:
    int8 (uint8 when unsigned) integers and a float32 scale per output channel.
    """
    w = np.asarray(w_float, np.float64)
    rank = w.ndim
    axis, scale_axis = axis % rank, scale_axis % rank
    bits = _per_channel(bits_per_channel, w.shape[axis], "quantize_weights")
    if (bits < 1).any() or (bits > MAX_BITS).any():
        raise AnnotationError(f"bit widths must lie in 1..{MAX_BITS}, got {bits.tolist()}")
    ranges = np.array([bit_range(int(b), signed) for b in bits], np.float64)
    lo, hi = _along(ranges[:, 0], axis, rank), _along(ranges[:, 1], axis, rank)
    bip = _along((bits == 1) & signed, axis, rank)
    reduce = tuple(i for i in range(rank) if i != scale_axis)
    amax = np.max(np.abs(w), axis=reduce, keepdims=True)
    amax = np.where(amax > 0, amax, 1e-8)
    qmax = np.maximum(ranges[:, 1], 1.0)
    steps = np.geomspace(max(qmax.min() * 0.5, 0.5), qmax.max(), 48)
    best_err = np.full(amax.shape, np.inf)
    best_scale = amax / qmax.max()
    for t in steps:
        s = amax / t
        q = _round_clip(w / s, lo, hi, bip, w)
        err = np.sum((q * s - w) ** 2, axis=reduce, keepdims=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, s, best_scale)
    scale = best_scale.astype(np.float32)
    q = _round_clip(w / scale.astype(np.float64), lo, hi, bip, w)
    w_int = q.astype(np.int8 if signed else np.uint8)
    return w_int, scale.reshape(-1)


def _round_clip(
    v: np.ndarray, lo: np.ndarray, hi: np.ndarray, bip: np.ndarray, sign_of: np.ndarray
) -> np.ndarray:
    q = np.clip(np.rint(v), lo, hi)
    return np.where(bip, np.where(sign_of >= 0, 1.0, -1.0), q)


def calibrate_scale(
    values: np.ndarray,
    bits: int | Sequence[int],
    signed: bool,
    axis: int = 1,
    zero_point: int = 0,
) -> float:
    """Per-tensor activation scale with the least squared fake-quant error.

    ``values`` are sample activations; channel ``c`` along ``axis`` is clamped
    to ``bits[c]``. One scale serves every channel, so narrow channels and wide
    channels trade off: the grid search finds the scale that loses least overall.
    :func:`calibrate_scales` gives each precision group (or channel) its own.
    """
    x = np.asarray(values, np.float64)
    rank = x.ndim
    axis = axis % rank
    widths = _per_channel(bits, x.shape[axis], "calibrate_scale")
    ranges = np.array([bit_range(int(b), signed) for b in widths], np.float64)
    lo = _along(ranges[:, 0], axis, rank) - zero_point
    hi = _along(ranges[:, 1], axis, rank) - zero_point
    amax = float(np.max(np.abs(x))) if signed else float(np.max(x))
    if amax <= 0:
        return 1.0
    best, best_err = amax / float(ranges[:, 1].max()), math.inf
    for t in np.geomspace(max(float(ranges[:, 1].min()) * 0.5, 0.5), ranges[:, 1].max(), 64):
        s = np.float32(amax / t)
        err = float(np.sum((np.clip(np.rint(x / s), lo, hi) * s - x) ** 2))
        if err < best_err:
            best, best_err = float(s), err
    return best


def calibrate_scales(
    values: np.ndarray,
    bits: int | Sequence[int],
    signed: bool,
    axis: int = 1,
    zero_point: int = 0,
    per: str = "group",
) -> float | np.ndarray:
    """Activation steps laid out ``per`` "tensor" (a float, as
    :func:`calibrate_scale`), "group" (one step per distinct width, shared by the
    channels of that width: what the compiler runs as one integer kernel per
    group) or "channel" (one per channel; more than a few distinct steps run in
    float). Returns a float, or a float32 array with one step per channel."""
    if per not in SCALE_LAYOUTS:
        raise ValueError(f"per={per!r} is not one of {', '.join(SCALE_LAYOUTS)}")
    if per == "tensor":
        return calibrate_scale(values, bits, signed, axis, zero_point)
    x = np.asarray(values, np.float64)
    axis = axis % x.ndim
    widths = _per_channel(bits, x.shape[axis], "calibrate_scales")
    keys = list(range(len(widths))) if per == "channel" else [int(b) for b in widths]
    out = np.empty(len(widths), np.float32)
    for key in sorted(set(keys)):
        idx = np.array([c for c, k in enumerate(keys) if k == key])
        out[idx] = calibrate_scale(np.take(x, idx, axis=axis), widths[idx], signed, axis, zero_point)
    return out


def choose_bits(
    channels: int,
    palette: Sequence[int] = (2, 8),
    low_fraction: float = 0.75,
    rng: np.random.Generator | int | None = None,
) -> tuple[int, ...]:
    """A random two-level (or more) precision assignment for ``channels`` channels.

    ``round(low_fraction * channels)`` channels, picked at random, get
    ``palette[0]``; the others cycle through ``palette[1:]``. With
    ``0 < low_fraction < 1`` and at least two channels both levels are present,
    so every assignment really mixes precisions. ``rng`` may be a seed.
    """
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    if not palette:
        raise ValueError("palette is empty")
    if not 0.0 <= low_fraction <= 1.0:
        raise ValueError(f"low_fraction must lie in [0, 1], got {low_fraction}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng or 0)
    n_low = int(math.floor(low_fraction * channels + 0.5))
    if 0.0 < low_fraction < 1.0 and channels >= 2 and len(palette) > 1:
        n_low = min(max(n_low, 1), channels - 1)
    high = list(palette[1:]) or [palette[0]]
    order = gen.permutation(channels)
    bits = [0] * channels
    for rank_, c in enumerate(order):
        bits[c] = palette[0] if rank_ < n_low else high[(rank_ - n_low) % len(high)]
    return tuple(int(b) for b in bits)


# ---------------------------------------------------------------------------
# Building annotated models from numpy
# ---------------------------------------------------------------------------
_NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
}


class QDQBuilder:
    """Build a ``soniq-qdq/1`` model from numpy arrays, one layer per call.

    Every method returns the name of the tensor it produces; names are generated
    (``conv1``, ``act2``, ...) unless given with ``name=``. :meth:`build` checks
    the model with ``onnx.checker`` and the annotation reader, writes the quant
    map and returns IR version 10 at the chosen opset (21..26)::

        b = QDQBuilder("tiny")
        x = b.input("x", [1, 3, 8, 8])
        a = b.quant_act(x, 0.05, [8, 2, 8], signed=True)
        w, s = quantize_weights(w_float, [2, 8, 2, 8], axis=0)
        y = b.conv(a, w, s, [2, 8, 2, 8], w_axis=0, pads=(1, 1, 1, 1))
        b.output(b.node("Relu", [y]), "y")
        model = b.build()
    """

    def __init__(self, name: str = "soniq_model", opset: int = 21):
        if opset not in OPSET_RANGE:
            raise UnsupportedModelError(
                f"opset {opset} is outside {OPSET_RANGE.start}..{OPSET_RANGE.stop - 1}",
                hint="ONNX Runtime 1.31 runs opset 21..26",
            )
        self.name = name
        self.opset = opset
        self._nodes: list[onnx.NodeProto] = []
        self._inits: dict[str, TensorProto] = {}
        self._inputs: list[onnx.ValueInfoProto] = []
        self._outputs: list[str] = []
        self._names: set[str] = set()
        self._counters: dict[str, int] = {}
        self._dq_outputs: set[str] = set()
        self._shape_cache: tuple[int, dict[str, tuple[int, tuple | None]]] = (-1, {})

    # ---- names -----------------------------------------------------------
    def _fresh(self, prefix: str, name: str | None = None) -> str:
        if name is not None:
            if name in self._names:
                raise AnnotationError(f"name {name!r} is already used", tensor=name)
            self._names.add(name)
            return name
        while True:
            self._counters[prefix] = self._counters.get(prefix, 0) + 1
            cand = f"{prefix}{self._counters[prefix]}"
            if cand not in self._names:
                self._names.add(cand)
                return cand

    def _sub(self, base: str, suffix: str) -> str:
        """Reserve ``base.suffix`` (or a fresh name if taken) for a helper tensor."""
        name = f"{base}.{suffix}"
        return self._fresh(f"{base}.{suffix}_", name if name not in self._names else None)

    def _add(
        self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs: Any
    ) -> onnx.NodeProto:
        node = helper.make_node(op, list(inputs), list(outputs), name=name, **attrs)
        self._nodes.append(node)
        return node

    # ---- graph inputs, outputs, constants ----------------------------------
    def input(self, name: str, shape: Sequence[int | str | None], dtype: Any = np.float32) -> str:
        """Declare a graph input (float32 unless ``dtype`` says otherwise)."""
        self._fresh("input", name)
        elem = _NP_TO_ONNX[np.dtype(dtype)]
        self._inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def output(self, tensor: str, name: str | None = None) -> str:
        """Make ``tensor`` a graph output, renamed through an Identity if ``name``."""
        if name is not None and name != tensor:
            self._fresh("output", name)
            self._add("Identity", [tensor], [name], name)
            tensor = name
        self._outputs.append(tensor)
        return tensor

    def const(self, array: Any, name: str | None = None) -> str:
        """Add an initializer holding ``array`` (its numpy dtype is kept)."""
        return self._init_const(np.asarray(array), self._fresh("const", name))

    def _init_const(self, arr: np.ndarray, name: str) -> str:
        """Store an initializer under an already reserved name."""
        self._inits[name] = numpy_helper.from_array(np.asarray(arr), name)
        return name

    # ---- shapes and evaluation ---------------------------------------------
    def _partial_model(self, outputs: Sequence[str]) -> onnx.ModelProto:
        types = self._types() if outputs else {}
        outs = [
            helper.make_tensor_value_info(o, types.get(o, (TensorProto.FLOAT, None))[0], None)
            for o in outputs
        ]
        graph = helper.make_graph(
            list(self._nodes), self.name, list(self._inputs), outs, list(self._inits.values())
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="soniq-tvm"
        )
        model.ir_version = IR_VERSION
        return model

    def _types(self) -> dict[str, tuple[int, tuple | None]]:
        count, cache = self._shape_cache
        if count == len(self._nodes):
            return cache
        model = onnx.shape_inference.infer_shapes(self._partial_model([]))
        types: dict[str, tuple[int, tuple | None]] = {}
        for vi in list(model.graph.input) + list(model.graph.value_info):
            tt = vi.type.tensor_type
            shape = (
                tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
                if tt.HasField("shape")
                else None
            )
            types[vi.name] = (tt.elem_type, shape)
        for name, t in self._inits.items():
            types[name] = (t.data_type, tuple(t.dims))
        self._shape_cache = (len(self._nodes), types)
        return types

    def shape(self, tensor: str) -> tuple[int | None, ...] | None:
        """Inferred shape of ``tensor`` (``None`` where unknown)."""
        return self._types().get(tensor, (None, None))[1]

    def evaluate(self, tensors: Sequence[str], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Compute ``tensors`` of the graph built so far with onnx's reference
        evaluator (numpy only), e.g. to calibrate the next activation scale."""
        from onnx.reference import ReferenceEvaluator

        model = self._partial_model(list(tensors))
        return list(ReferenceEvaluator(model).run(None, dict(feeds)))

    def _known_shape(self, tensor: str, what: str) -> tuple[int, ...]:
        shape = self.shape(tensor)
        if shape is None or any(d is None for d in shape):
            raise AnnotationError(
                f"{what} needs the static shape of its input, which is {shape}",
                tensor=tensor,
            )
        return tuple(int(d) for d in shape)

    # ---- quantized activations -----------------------------------------------
    def quant_act(
        self,
        x: str,
        scale: float | np.ndarray,
        bits: int | Sequence[int],
        signed: bool,
        axis: int = 1,
        zero_point: int = 0,
        name: str | None = None,
    ) -> str:
        """Quantize activation ``x``: QuantizeLinear -> Max(lo) -> Min(hi) -> DQ.

        ``bits`` is one width, or one per channel along ``axis``. The Max/Min pair
        clamps each channel to its own range (bounds shaped ``[C, 1, 1]`` for axis
        1 of a 4-D tensor, ``[C]`` for the last axis) and is left out when every
        channel is 8-bit. ``scale`` is a scalar (per tensor) or one per channel.
        """
        shape = self._known_shape(x, "quant_act")
        rank = len(shape)
        if not -rank <= axis < rank:
            raise AnnotationError(f"axis {axis} is out of range for the {rank}-D input", tensor=x)
        axis %= rank
        channels = shape[axis]
        widths = _per_channel(bits, channels, f"quant_act of {x!r}")
        _check_widths(tuple(int(b) for b in widths), name or x)
        if signed and (widths == 1).any():
            raise AnnotationError(
                "signed 1-bit (bipolar) activations cannot be expressed with Max/Min",
                tensor=x,
                channel=int(np.argmax(widths == 1)),
                hint="use unsigned 1-bit {0, 1} after a ReLU",
            )
        base = self._fresh("act", name)
        qdtype = np.int8 if signed else np.uint8
        s = np.asarray(scale, np.float32)
        if s.ndim not in (0, 1) or (s.ndim == 1 and s.shape != (channels,)):
            raise AnnotationError(
                f"scale of shape {s.shape} is neither a scalar nor one per channel ({channels})",
                tensor=x,
            )
        qattrs = {"axis": axis} if s.ndim == 1 else {}
        s_name = self._init_const(s, self._sub(base, "scale"))
        zp_name = self._init_const(np.full(s.shape, zero_point, qdtype), self._sub(base, "zp"))
        q = self._sub(base, "q")
        self._add("QuantizeLinear", [x, s_name, zp_name], [q], q, **qattrs)
        if (widths != MAX_BITS).any():
            ranges = np.array([bit_range(int(b), signed) for b in widths])
            bshape = [channels] + [1] * (rank - 1 - axis)
            bounds = ranges.astype(qdtype)
            lo = self._init_const(bounds[:, 0].reshape(bshape), self._sub(base, "lo"))
            hi = self._init_const(bounds[:, 1].reshape(bshape), self._sub(base, "hi"))
            clamped_lo = self._sub(base, "max")
            self._add("Max", [q, lo], [clamped_lo], clamped_lo)
            q = self._sub(base, "min")
            self._add("Min", [clamped_lo, hi], [q], q)
        node = self._add(
            "DequantizeLinear", [q, s_name, zp_name], [base], self._sub(base, "dq"), **qattrs
        )
        self._annotate(node, widths, axis, signed)
        return base

    def _annotate(self, node: onnx.NodeProto, widths: np.ndarray, axis: int, signed: bool) -> None:
        _set_props(
            node.metadata_props,
            {
                KEY_BITS: json.dumps([int(b) for b in widths]),
                KEY_AXIS: str(int(axis)),
                KEY_SIGNED: "1" if signed else "0",
            },
        )
        self._dq_outputs.add(node.output[0])

    # ---- quantized weights -----------------------------------------------------
    def _weight(
        self,
        base: str,
        w_int: np.ndarray,
        w_scale: np.ndarray | float,
        w_bits: int | Sequence[int],
        w_axis: int,
        dq_axis: int,
        signed: bool,
        rank: int,
    ) -> str:
        """Add ``w_int -> DequantizeLinear(axis=dq_axis)`` with its annotation."""
        w = np.asarray(w_int)
        if w.ndim != rank or not np.issubdtype(w.dtype, np.integer):
            raise AnnotationError(
                f"weight must be a {rank}-D integer array, got {w.ndim}-D {w.dtype}", tensor=base
            )
        if not -rank <= w_axis < rank:
            raise AnnotationError(
                f"w_axis {w_axis} is out of range for a {rank}-D weight", tensor=base
            )
        w_axis %= rank
        widths = _per_channel(w_bits, w.shape[w_axis], f"weight of {base!r}")
        _check_widths(tuple(int(b) for b in widths), base)
        check_weight_values(w, widths.tolist(), w_axis, signed, base)
        s = np.asarray(w_scale, np.float32)
        out_ch = w.shape[dq_axis]
        if s.ndim not in (0, 1) or (s.ndim == 1 and s.shape != (out_ch,)):
            raise AnnotationError(
                f"weight scale of shape {s.shape} is neither a scalar nor one per output "
                f"channel ({out_ch})",
                tensor=base,
            )
        qdtype = np.int8 if signed else np.uint8
        w_name = self._init_const(w.astype(qdtype), self._sub(base, "w"))
        s_name = self._init_const(s, self._sub(base, "w_scale"))
        zp_name = self._init_const(np.zeros(s.shape, qdtype), self._sub(base, "w_zp"))
        out = self._sub(base, "w_deq")
        attrs = {"axis": dq_axis} if s.ndim == 1 else {}
        node = self._add(
            "DequantizeLinear", [w_name, s_name, zp_name], [out], self._sub(base, "w_dq"), **attrs
        )
        self._annotate(node, widths, w_axis, signed)
        return out

    def _bias(
        self, base: str, bias: np.ndarray | None, channels: int, row: bool = False
    ) -> str | None:
        """A float bias initializer of shape [channels] (or [1, channels] if ``row``)."""
        if bias is None:
            return None
        b = np.asarray(bias, np.float32)
        if b.shape != (channels,):
            raise AnnotationError(f"bias of shape {b.shape}, expected ({channels},)", tensor=base)
        return self._init_const(b.reshape(1, -1) if row else b, self._sub(base, "bias"))

    def conv(
        self,
        x: str,
        w_int: np.ndarray,
        w_scale: np.ndarray | float,
        w_bits: int | Sequence[int],
        w_axis: int = 1,
        bias: np.ndarray | None = None,
        strides: Sequence[int] = (1, 1),
        pads: Sequence[int] = (0, 0, 0, 0),
        dilations: Sequence[int] = (1, 1),
        group: int = 1,
        w_signed: bool = True,
        name: str | None = None,
    ) -> str:
        """Conv with integer weights ``[O, I/group, kh, kw]`` and a float bias.

        The weight DQ uses axis 0 (scale per output channel); ``w_bits`` runs along
        ``w_axis`` (1: per input channel, SONIQ's tied case; 0: per output channel).
        """
        base = self._fresh("conv", name)
        w = self._weight(base, w_int, w_scale, w_bits, w_axis, 0, w_signed, 4)
        inputs = [x, w]
        b = self._bias(base, bias, np.asarray(w_int).shape[0])
        if b is not None:
            inputs.append(b)
        self._add(
            "Conv",
            inputs,
            [base],
            base,
            strides=list(strides),
            pads=list(pads),
            dilations=list(dilations),
            group=int(group),
        )
        return base

    def matmul(
        self,
        x: str,
        w_int: np.ndarray,
        w_scale: np.ndarray | float,
        w_bits: int | Sequence[int],
        w_axis: int = 0,
        bias: np.ndarray | None = None,
        w_signed: bool = True,
        name: str | None = None,
    ) -> str:
        """``x @ W (+ bias)`` with integer ``W[K, N]`` (DQ axis 1, scale per N).

        ``w_bits`` runs along ``w_axis`` (0: per input channel K, the tied case).
        """
        base = self._fresh("matmul", name)
        w = self._weight(base, w_int, w_scale, w_bits, w_axis, 1, w_signed, 2)
        # A bias of shape [1, N] (not [N]) keeps ORT 1.31's MatMulAddFusion away: on a
        # 3-D int8 input it inserts a QuantizeLinear whose types disagree and the
        # session fails to load at the default optimization level.
        rank = len(self.shape(x) or (1, 1))
        b = self._bias(base, bias, np.asarray(w_int).shape[1], row=rank >= 2)
        if b is None:
            self._add("MatMul", [x, w], [base], base)
            return base
        mm = self._sub(base, "mm")
        self._add("MatMul", [x, w], [mm], mm)
        self._add("Add", [mm, b], [base], base)
        return base

    def gemm(
        self,
        x: str,
        w_int: np.ndarray,
        w_scale: np.ndarray | float,
        w_bits: int | Sequence[int],
        w_axis: int = 1,
        bias: np.ndarray | None = None,
        w_signed: bool = True,
        name: str | None = None,
    ) -> str:
        """``Gemm(x, W, bias, transB=1)`` with integer ``W[N, K]`` (DQ axis 0).

        ``w_bits`` runs along ``w_axis`` (1: per input channel K, the tied case).
        """
        base = self._fresh("gemm", name)
        w = self._weight(base, w_int, w_scale, w_bits, w_axis, 0, w_signed, 2)
        inputs = [x, w]
        b = self._bias(base, bias, np.asarray(w_int).shape[0])
        if b is not None:
            inputs.append(b)
        self._add("Gemm", inputs, [base], base, transB=1)
        return base

    def matmul_act(self, a: str, b: str, name: str | None = None) -> str:
        """MatMul of two quantized activations (both must come from :meth:`quant_act`)."""
        for t in (a, b):
            if t not in self._dq_outputs:
                raise AnnotationError(
                    "matmul_act needs quantized activations on both sides",
                    tensor=t,
                    hint="pass it through quant_act first, or use node('MatMul', ...)",
                )
        base = self._fresh("matmul", name)
        self._add("MatMul", [a, b], [base], base)
        return base

    def node(
        self,
        op_type: str,
        inputs: Sequence[str | np.ndarray | None],
        outputs: int = 1,
        name: str | None = None,
        **attrs: Any,
    ) -> str | list[str]:
        """Any standard op. Arrays among ``inputs`` become initializers, ``None``
        an omitted optional input. Returns the output name, or a list of them
        when ``outputs > 1``."""
        base = self._fresh(op_type.lower(), name)
        names = []
        for i in inputs:
            if i is None:
                names.append("")
            elif isinstance(i, str):
                names.append(i)
            else:
                names.append(self._init_const(np.asarray(i), self._sub(base, f"c{len(names)}")))
        outs = [base] if outputs == 1 else [self._sub(base, str(k)) for k in range(outputs)]
        self._add(op_type, names, outs, base, **attrs)
        return outs[0] if outputs == 1 else outs

    # ---- the model ---------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        """Check and return the model: IR 10, quant map written, full checker run."""
        if not self._outputs:
            raise AnnotationError("the model has no outputs", hint="call output() first")
        types = self._types()
        model = self._partial_model([])
        del model.graph.output[:]
        for o in self._outputs:
            elem, shape = types.get(o, (TensorProto.FLOAT, None))
            dims = None if shape is None else [
                d if d is not None else f"{o}_d{i}" for i, d in enumerate(shape)
            ]
            model.graph.output.append(helper.make_tensor_value_info(o, elem, dims))
        write_quant_map(model)
        check_model(model)
        return model
