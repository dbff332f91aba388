"""QONNX files (``Quant`` / ``BipolarQuant`` nodes) rewritten into ``soniq-qdq/1``.

QONNX (the ``qonnx`` package's format, exported by Brevitas, QKeras and HAWQ)
carries quantization as custom operators that compute in float:
``Quant(x, scale, zeropt, bitwidth)`` with attributes ``signed``, ``narrow`` and
``rounding_mode`` gives ``(clip(round(x / scale + zeropt)) - zeropt) * scale``,
and ``BipolarQuant(x, scale)`` gives ``scale * (x >= 0 ? 1 : -1)``. ONNX Runtime
and TVM know neither. :func:`from_qonnx` rewrites each node into the standard
form of the same arithmetic:

* a ``Quant`` of a constant (a weight) becomes its integer codes, computed here
  with QONNX's own semantics (any rounding mode; a signed 1-bit Quant is bipolar,
  as in qonnx), stored as an int8/uint8 initializer and read by an annotated
  ``DequantizeLinear``;
* a ``Quant`` of an activation becomes ``QuantizeLinear -> Max -> Min ->
  DequantizeLinear`` with the per-channel integer range as Max/Min constants;
* a ``BipolarQuant`` of a weight becomes 1-bit bipolar codes;
* a ``Quant`` of a constant that no kernel reads as a weight (a bias quantized to
  32 bits, a constant operand of an Add) or that is wider than 8 bits becomes the
  float constant qonnx computes (float32, as its executor does): that layer's float
  parts stay float, and a conv or matmul with such a weight stays float, saying why.

``bitwidth``, ``scale`` and ``zeropt`` may each be one value or one per channel
along a single axis (all non-scalar ones along the same axis), so a file that
gives every channel its own width (SONIQ's mixed precision) keeps it: the widths
become the ``soniq.bits`` annotation of that axis. Anything else (a non-constant
scale, an activation wider than 8 bits, a bipolar or non-rounding activation, ``Trunc``,
``FloatQuant``, ...) raises :class:`~soniq_tvm.errors.UnsupportedModelError`
naming the node. Pure onnx and numpy: the ``qonnx`` package is not needed.

One difference remains: QONNX rounds ``x / scale + zeropt`` where
``QuantizeLinear`` rounds ``x / scale`` and then adds the zero point; for an odd
zero point an exact tie (``x / scale`` at ``k + 0.5``) rounds one step apart, and
float32 addition may move a value near a tie. Results agree within one step.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .annotation import KEY_AXIS, KEY_BITS, KEY_SIGNED
from .errors import UnsupportedModelError
from .naming import node_label

__all__ = ["from_qonnx", "is_qonnx", "QONNX_DOMAINS"]

QONNX_DOMAINS = ("qonnx.custom_op.general", "onnx.brevitas", "finn.custom_op.general")
_CONVERTED = ("Quant", "IntQuant", "BipolarQuant")
_ROUNDING = {
    "ROUND": np.round, "HALF_EVEN": np.round, "CEIL": np.ceil, "FLOOR": np.floor, "DOWN": np.fix,
    "UP": lambda v: np.sign(v) * np.ceil(np.abs(v)),
    "HALF_UP": lambda v: np.sign(v) * np.floor(np.abs(v) + 0.5),
    "HALF_DOWN": lambda v: np.sign(v) * np.ceil(np.abs(v) - 0.5),
}
_HINT = "export it with integer Quant nodes of at most 8 bits (constant scale, zero point and width)"


def is_qonnx(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds any QONNX custom operator."""
    return any(n.domain in QONNX_DOMAINS for n in model.graph.node)


def _rounding_mode(n: onnx.NodeProto, label: str) -> str:
    for a in n.attribute:
        if a.name == "rounding_mode":
            mode = helper.get_attribute_value(a)
            mode = (mode.decode() if isinstance(mode, bytes) else str(mode)).upper()
            if mode not in _ROUNDING:
                raise UnsupportedModelError(f"rounding mode {mode!r} is unknown", node=label,
                                            hint=f"one of {', '.join(_ROUNDING)}")
            return mode
    return "ROUND"


@dataclass(frozen=True)
class _Params:
    """A Quant node's constants: ``scale`` and ``zeropt`` per channel of ``s_axis``,
    ``bits`` per channel of ``b_axis`` (length 1 and axis None: one for the tensor)."""

    scale: np.ndarray
    zeropt: np.ndarray
    bits: np.ndarray
    signed: bool
    narrow: bool
    mode: str  # rounding
    s_axis: int | None
    b_axis: int | None
    rank: int
    shape: tuple | None


class _Converter:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:  # Constant nodes count as constants
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output:
                attr = next((a for a in n.attribute if a.name == "value"), None)
                if attr is not None:
                    self.consts[n.output[0]] = numpy_helper.to_array(attr.t)
        self.shapes: dict[str, tuple] = {k: v.shape for k, v in self.consts.items()}
        for vi in _shapes_through_quant(model):
            tt = vi.type.tensor_type
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                self.shapes.setdefault(vi.name, tuple(d.dim_value for d in tt.shape.dim))
        self.uses: dict[str, list] = {}  # tensor -> [(consumer op, input position)]
        for m in g.node:
            for i, name in enumerate(m.input):
                self.uses.setdefault(name, []).append((m.op_type, i))
        self.inits: list[onnx.TensorProto] = []

    def const(self, value: np.ndarray, name: str) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def constant(self, n, i: int, label: str, what: str) -> np.ndarray:
        name = n.input[i] if len(n.input) > i else ""
        if not name or name not in self.consts:
            raise UnsupportedModelError(f"the {what} of a {n.op_type} must be a constant", node=label,
                                        tensor=name or None, hint=_HINT)
        return np.asarray(self.consts[name], np.float64)

    @staticmethod
    def axis_of(v: np.ndarray, rank: int, what: str, label: str) -> int | None:
        """The one axis along which ``v`` varies once broadcast to ``rank`` (None: one value)."""
        if v.size == 1:
            return None
        if v.ndim > rank:
            raise UnsupportedModelError(f"{what} has {v.ndim} dimensions, the tensor {rank}", node=label,
                                        hint=_HINT)
        shape = (1,) * (rank - v.ndim) + v.shape
        big = [a for a, d in enumerate(shape) if d != 1]
        if len(big) != 1:
            raise UnsupportedModelError(f"{what} of shape {v.shape} varies along more than one axis",
                                        node=label, hint="one value, or one per channel of a single axis")
        return big[0]

    def parameters(self, n, label: str, bipolar: bool, max_bits: int | None = 8) -> _Params:
        """The node's constants as per-channel vectors, checked (widths up to
        ``max_bits``; None: any)."""
        scale = self.constant(n, 1, label, "scale")
        if bipolar:
            zeropt, bits, signed, narrow = np.zeros(1), np.ones(1), True, False
        else:
            zeropt = self.constant(n, 2, label, "zero point")
            bits = self.constant(n, 3, label, "bit width")
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            signed, narrow = bool(attrs.get("signed", 1)), bool(attrs.get("narrow", 0))
        mode = "ROUND" if bipolar else _rounding_mode(n, label)
        shape = self.shapes.get(n.input[0])
        rank = len(shape) if shape is not None else max(scale.ndim, zeropt.ndim, bits.ndim, 1)
        s_axis = self.axis_of(scale, rank, "scale", label)
        z_axis = self.axis_of(zeropt, rank, "zero point", label)
        if s_axis is not None and z_axis is not None and s_axis != z_axis:
            raise UnsupportedModelError(f"scale (axis {s_axis}) and zero point (axis {z_axis}) vary along "
                                        "different axes", node=label, hint="give both per channel of one axis")
        s_axis = s_axis if s_axis is not None else z_axis
        b_axis = self.axis_of(bits, rank, "bit width", label)

        def vec(v, axis, what):
            flat = np.asarray(v).reshape(-1)
            if axis is not None and shape is not None and flat.size not in (1, shape[axis]):
                raise UnsupportedModelError(f"{what} has {flat.size} values for {shape[axis]} channels",
                                            node=label, tensor=n.input[0])
            return flat

        scale, zeropt, bits = vec(scale, s_axis, "scale"), vec(zeropt, s_axis, "zero point"), vec(bits, b_axis,
                                                                                                 "bit width")
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            c = int(np.flatnonzero(~(np.isfinite(scale) & (scale > 0)))[0])
            raise UnsupportedModelError(f"scale {scale[c]} is not a positive finite number", node=label,
                                        channel=c if scale.size > 1 else None, tensor=n.input[1])
        for what, v in (("bit width", bits), ("zero point", zeropt)):
            bad = np.flatnonzero(v != np.round(v))
            if bad.size:
                raise UnsupportedModelError(f"{what} {v[bad[0]]} is not an integer", node=label,
                                            channel=int(bad[0]) if v.size > 1 else None, hint=_HINT)
        bad = np.flatnonzero((bits < 1) | (bits > (max_bits or np.inf)))
        if bad.size:
            raise UnsupportedModelError(f"bit width {bits[bad[0]]:g} is outside 1..{max_bits or 'any'}",
                                        node=label, channel=int(bad[0]) if bits.size > 1 else None,
                                        hint="the compiled kernels take 1 to 8 bits")
        bits = bits.astype(np.int64)
        if narrow and not signed and np.any(bits == 1):
            raise UnsupportedModelError("an unsigned narrow 1-bit range holds only 0", node=label,
                                        hint="use narrow=0 or at least 2 bits")
        return _Params(scale, zeropt.astype(np.int64), bits, signed, narrow, mode, s_axis, b_axis, rank, shape)

    def codes(self, n, p: _Params) -> np.ndarray:
        """The integer codes of a constant Quant's input, computed as qonnx does
        (float32; a signed 1-bit width is bipolar)."""
        x = np.asarray(self.consts[n.input[0]], np.float32)
        s = self.along(p.scale.astype(np.float32), p.s_axis, x.ndim)
        z = self.along(p.zeropt.astype(np.float32), p.s_axis, x.ndim)
        b = self.along(p.bits, p.b_axis, x.ndim)
        v = x / s + z
        lo, hi = int_range(b, p.signed, p.narrow)
        return np.where((b == 1) & p.signed, np.where(v >= 0, 1, -1), _ROUNDING[p.mode](np.clip(v, lo, hi)))

    @staticmethod
    def along(v: np.ndarray, axis: int | None, rank: int) -> np.ndarray:
        """A per-channel vector shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
        if axis is None or v.size == 1:
            return v.reshape(())
        shape = [1] * rank
        shape[axis] = v.size
        return v.reshape(shape)

    def annotated_dq(self, codes: str, scale: str, zp: str, out: str, axis: int | None, label: str,
                     bits, signed: bool, bits_axis: int, count: int) -> onnx.NodeProto:
        kw = {} if axis is None else {"axis": axis}
        node = helper.make_node("DequantizeLinear", [codes, scale, zp], [out], name=f"{label}_dq", **kw)
        widths = [int(b) for b in np.broadcast_to(np.asarray(bits).reshape(-1), (count,))]
        for key, value in ((KEY_BITS, json.dumps(widths)), (KEY_AXIS, str(bits_axis)),
                           (KEY_SIGNED, "1" if signed else "0")):
            node.metadata_props.add(key=key, value=value)
        return node

    def weight(self, n, label: str, bipolar: bool) -> list[onnx.NodeProto]:
        p = self.parameters(n, label, bipolar)
        if np.any(p.zeropt != 0):
            raise UnsupportedModelError("a weight Quant with a nonzero zero point is not supported", node=label,
                                        hint="weights are symmetric in soniq-qdq/1: quantize them with zeropt 0")
        w = self.consts[n.input[0]]
        q = self.codes(n, p)
        dtype = np.int8 if p.signed else np.uint8
        base = n.output[0]
        codes = self.const(q.astype(dtype), f"{base}__soniq_q")
        per_axis = p.s_axis is not None
        sc = self.const(p.scale.astype(np.float32) if per_axis else np.float32(p.scale[0]), f"{base}__soniq_scale")
        zp = self.const(np.zeros(p.scale.size if per_axis else (), dtype), f"{base}__soniq_zp")
        # the widths run along their own axis (SONIQ: the input channels), else the scale's or 0
        bits_axis = next(a for a in (p.b_axis, p.s_axis, 0) if a is not None)
        return [self.annotated_dq(codes, sc, zp, base, p.s_axis, label, p.bits, p.signed, bits_axis,
                                  w.shape[bits_axis] if w.ndim else 1)]

    def weight_slot(self, n) -> bool:
        """Whether Quant ``n``'s output is read only as a Conv / Gemm weight or a
        MatMul operand, with a width a kernel takes (at most 8 bits)."""
        uses = self.uses.get(n.output[0], [])
        slot = bool(uses) and all((op in ("Conv", "Gemm") and i == 1) or op == "MatMul" for op, i in uses)
        bits = self.consts.get(n.input[3]) if n.op_type != "BipolarQuant" and len(n.input) > 3 else None
        return slot and (bits is None or float(np.max(bits)) <= 8)

    def fold(self, n, label: str, bipolar: bool) -> None:
        """A constant Quant that feeds no kernel weight (a bias quantized to 16 or 32
        bits, a constant added or multiplied): its output computed here as qonnx does,
        in float32, and stored as a float initializer."""
        p = self.parameters(n, label, bipolar, max_bits=None)
        rank = np.ndim(self.consts[n.input[0]])
        s = self.along(p.scale.astype(np.float32), p.s_axis, rank)
        z = self.along(p.zeropt.astype(np.float32), p.s_axis, rank)
        y = ((self.codes(n, p).astype(np.float32) - z) * s).astype(np.float32)
        self.consts[n.output[0]] = y
        self.inits.append(numpy_helper.from_array(y, n.output[0]))

    def activation(self, n, label: str) -> list[onnx.NodeProto]:
        mode = _rounding_mode(n, label)
        if mode not in ("ROUND", "HALF_EVEN"):
            raise UnsupportedModelError(f"an activation Quant rounding {mode} cannot run as QuantizeLinear",
                                        node=label, hint="export activations with rounding_mode ROUND")
        p = self.parameters(n, label, bipolar=False)
        if p.s_axis is not None and p.b_axis is not None and p.s_axis != p.b_axis:
            raise UnsupportedModelError(f"an activation's steps (axis {p.s_axis}) and widths (axis {p.b_axis}) "
                                        "run along different axes", node=label,
                                        hint="give both per channel of the channel axis")
        scale, zeropt, bits, signed, narrow, rank = p.scale, p.zeropt, p.bits, p.signed, p.narrow, p.rank
        axis = p.s_axis if p.s_axis is not None else p.b_axis
        if signed and np.any(bits == 1):
            raise UnsupportedModelError("a bipolar (signed 1-bit) activation is a sign function, not a "
                                        "QuantizeLinear", node=label, hint="use at least 2 bits or an unsigned bit")
        dtype = np.int8 if signed else np.uint8
        info = np.iinfo(dtype)
        if np.any(zeropt < info.min) or np.any(zeropt > info.max):
            raise UnsupportedModelError(f"zero point outside the {np.dtype(dtype).name} container", node=label)
        # the channel axis the widths run along: the parameters' axis, else NCHW's 1 or the last
        c_axis = axis if axis is not None else (1 if rank == 4 else max(rank - 1, 0))
        count = p.shape[c_axis] if p.shape else bits.size
        per_axis = p.s_axis is not None
        if per_axis:
            scale, zeropt = (np.broadcast_to(v, (count,)) for v in (scale, zeropt))
        base = n.output[0]
        sc = self.const(scale.astype(np.float32) if per_axis else np.float32(scale[0]), f"{base}__soniq_scale")
        zp = self.const(zeropt.astype(dtype) if per_axis else dtype(zeropt[0]), f"{base}__soniq_zp")
        lo, hi = (np.broadcast_to(v, (count,)).astype(dtype) for v in int_range(bits, signed, narrow))
        trailing = [count] + [1] * max(rank - 1 - c_axis, 0)  # [C, 1, 1] for NCHW, [C] for the last axis
        lo_c = self.const(lo.reshape(trailing), f"{base}__soniq_lo")
        hi_c = self.const(hi.reshape(trailing), f"{base}__soniq_hi")
        kw = {"axis": p.s_axis} if per_axis else {}
        q, mx, mn = f"{base}__soniq_codes", f"{base}__soniq_max", f"{base}__soniq_min"
        return [helper.make_node("QuantizeLinear", [n.input[0], sc, zp], [q], name=f"{label}_q", **kw),
                helper.make_node("Max", [q, lo_c], [mx], name=f"{label}_max"),
                helper.make_node("Min", [mx, hi_c], [mn], name=f"{label}_min"),
                self.annotated_dq(mn, sc, zp, base, p.s_axis, label, bits, signed, c_axis, count)]


def int_range(bits, signed: bool, narrow: bool) -> tuple[np.ndarray, np.ndarray]:
    """QONNX's integer range (``min_int``, ``max_int``) of each width in ``bits``."""
    bits = np.asarray(bits, np.int64)
    if signed:
        return -(1 << (bits - 1)) + (1 if narrow else 0), (1 << (bits - 1)) - 1
    return np.zeros_like(bits), (1 << bits) - 1 - (1 if narrow else 0)


def _shapes_through_quant(model: onnx.ModelProto) -> list:
    """Value infos of ``model`` inferred with every QONNX node read as an Identity
    (they keep their input's shape; ONNX's inference stops at unknown ops)."""
    proxy = onnx.ModelProto()
    proxy.CopyFrom(model)
    for n in proxy.graph.node:
        if n.domain in QONNX_DOMAINS:
            x = n.input[0]
            del n.input[:], n.attribute[:]
            n.input.append(x)
            n.op_type, n.domain = "Identity", ""
    _drop_qonnx_opsets(proxy)
    g = proxy.graph
    try:
        g = onnx.shape_inference.infer_shapes(proxy).graph
    except Exception:  # noqa: BLE001 - best effort: the declared shapes only
        pass
    return list(g.value_info) + list(g.input) + list(g.output)


def from_qonnx(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in ``soniq-qdq/1`` form (see the module docstring); the
    model itself when it holds no QONNX operator."""
    if not is_qonnx(model):
        return model
    from .qoperator import _at_least_opset_13

    out = onnx.ModelProto()
    out.CopyFrom(model)
    conv = _Converter(out)
    nodes = []
    for i, n in enumerate(out.graph.node):
        label = node_label(n, i)
        if n.domain not in QONNX_DOMAINS:
            nodes.append(n)
            continue
        if n.op_type not in _CONVERTED:
            raise UnsupportedModelError(f"QONNX operator {n.op_type} is not supported", node=label,
                                        hint="Quant (IntQuant) and BipolarQuant convert; run qonnx's own "
                                             "transformations to remove the others first")
        bipolar = n.op_type == "BipolarQuant"
        if n.input[0] in conv.consts and not conv.weight_slot(n):
            conv.fold(n, label, bipolar)  # a quantized bias or other constant: its float values
        elif n.input[0] in conv.consts:
            nodes.extend(conv.weight(n, label, bipolar))
        elif bipolar:
            raise UnsupportedModelError("a BipolarQuant of an activation is a sign function, not a "
                                        "QuantizeLinear", node=label, hint="quantize activations with Quant")
        else:
            nodes.extend(conv.activation(n, label))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(conv.inits)
    _drop_unused_initializers(out)
    _drop_qonnx_opsets(out)
    result = _at_least_opset_13(out)
    from .annotation_writer import write_quant_map

    write_quant_map(result)  # reads (and so checks) every annotation written above
    return result


def _drop_qonnx_opsets(model: onnx.ModelProto) -> None:
    kept = [o for o in model.opset_import if o.domain not in QONNX_DOMAINS]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """The float weights the Quant nodes read are replaced by their codes: drop them,
    and their graph-input entries (files of IR < 4 list initializers as inputs)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    dropped = {t.name for t in model.graph.initializer if t.name not in used}
    keep = [t for t in model.graph.initializer if t.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    inputs = [v for v in model.graph.input if v.name not in dropped]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
