"""Per-channel precision in plain ONNX: the ``soniq-qdq/1`` convention.

A SONIQ model stores every quantized tensor as standard QDQ, and says how many
bits each channel uses in three places, read in this order:

1. ``metadata_props`` on the DequantizeLinear node (``soniq.bits``, ``soniq.axis``,
   ``soniq.signed``);
2. the model-level mirror ``soniq.quant_map`` (found by the DQ output name, or by
   one of its aliases when an optimizer renamed the output or dropped node
   metadata);
3. the graph itself: per-channel Max/Min constants or a scalar Clip between
   QuantizeLinear and DequantizeLinear, else the full range of the container
   dtype (INT4/UINT4/INT2/UINT2 weights give 4 or 2 bits, int8/uint8 give 8).

Whatever the source, the reader cross-checks the claim against what ONNX Runtime
actually computes (weights inside each channel's range, Max/Min constants equal to
the annotated ranges), because ORT's fake-quant result is the reference every
compiled module is compared with.

The writing side (:func:`annotate`, :func:`write_quant_map`,
:func:`to_int8_initializers`) lives in :mod:`soniq_tvm.annotation_writer` and file
input/output (:func:`load_model`, :func:`save_model`) in :mod:`soniq_tvm.onnx_files`;
both are re-exported here. :mod:`soniq_tvm.builder` builds annotated models from
numpy, for tests, examples and the PyTorch exporter. It needs numpy and onnx only.
``docs/annotation-format.md`` is the full description.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import AnnotationError
from .onnx_files import as_model as _as_model
from .onnx_files import check_model, load_model, save_model

__all__ = [
    "FORMAT",
    "MAX_BITS",
    "IR_VERSION",
    "bit_range",
    "bits_from_range",
    "TensorAnnotation",
    "read_annotations",
    "load_model",
    "save_model",
    "check_model",
    "check_weight_values",
    "to_int8_initializers",
    "annotate",
    "write_quant_map",
]

FORMAT = "soniq-qdq/1"
MAX_BITS = 8
IR_VERSION = 10  # ORT 1.31 refuses IR 14, which onnx 1.23's make_model writes
OPSET_RANGE = range(21, 27)

KEY_BITS = "soniq.bits"
KEY_AXIS = "soniq.axis"
KEY_SIGNED = "soniq.signed"
KEY_FORMAT = "soniq.format"
KEY_MAP = "soniq.quant_map"

_DQ_DOMAINS = ("", "ai.onnx", "com.microsoft")

# Integer containers a DequantizeLinear may read: ONNX dtype -> (bits, signed).
_INT_CONTAINERS: dict[int, tuple[int, bool]] = {
    TensorProto.INT2: (2, True),
    TensorProto.UINT2: (2, False),
    TensorProto.INT4: (4, True),
    TensorProto.UINT4: (4, False),
    TensorProto.INT8: (8, True),
    TensorProto.UINT8: (8, False),
    TensorProto.INT16: (16, True),
    TensorProto.UINT16: (16, False),
    TensorProto.INT32: (32, True),
}
# Packed sub-byte types the TVM ONNX importer cannot read, and their byte twins.
_PACKED_TO_BYTE: dict[int, tuple[int, type]] = {
    TensorProto.INT4: (TensorProto.INT8, np.int8),
    TensorProto.UINT4: (TensorProto.UINT8, np.uint8),
    TensorProto.INT2: (TensorProto.INT8, np.int8),
    TensorProto.UINT2: (TensorProto.UINT8, np.uint8),
}


# ---------------------------------------------------------------------------
# Integer ranges
# ---------------------------------------------------------------------------
def bit_range(bits: int, signed: bool) -> tuple[int, int]:
    """Inclusive integer range ``(lo, hi)`` of one channel of width ``bits``.

    Signed widths of 2 or more are two's complement; unsigned widths are
    ``[0, 2**bits - 1]``. Signed 1-bit is *bipolar*: its values are -1 and +1,
    returned as ``(-1, 1)`` although 0 is not one of them.
    """
    bits = int(bits)
    if bits < 1:
        raise ValueError(f"a bit width must be at least 1, got {bits}")
    if not signed:
        return 0, (1 << bits) - 1
    if bits == 1:
        return -1, 1
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def bits_from_range(lo: int, hi: int) -> int:
    """Bit width of the inclusive integer range ``[lo, hi]``: ``ceil(log2(hi-lo+1))``.

    Bipolar weights cannot be recognised this way (``(-1, 1)`` reads as 2 bits):
    they are known from their annotation, never from a range.
    """
    lo, hi = int(lo), int(hi)
    if hi < lo:
        raise ValueError(f"empty integer range [{lo}, {hi}]")
    return (hi - lo).bit_length()  # == ceil(log2(hi - lo + 1)), 0 for one value


def _contains(outer: tuple[int, int], inner: tuple[int, int]) -> bool:
    return outer[0] <= inner[0] and inner[1] <= outer[1]


# ---------------------------------------------------------------------------
# The annotation of one DequantizeLinear
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorAnnotation:
    """Precision of the tensor one DequantizeLinear produces.

    ``bits`` holds one width per channel along ``axis``; a single entry is one
    group covering the whole tensor (what plain QDQ, a scalar Clip or an INT4 type
    describe). ``source`` says where the widths were read: ``"node"`` (node
    metadata), ``"quant_map"`` (model-level mirror), ``"max_min"`` / ``"clip"``
    (clamp constants in the graph) or ``"dtype"`` (the container's full range).
    ``axis`` is negative (counted from the end) only when the tensor's rank is
    unknown.
    """

    name: str
    node: str
    kind: Literal["weight", "activation"]
    axis: int
    bits: tuple[int, ...]
    signed: bool
    source: str
    input: str = ""
    scale: str = ""

    # ---- derived ---------------------------------------------------------
    @property
    def channels(self) -> int:
        """Number of entries in ``bits`` (1 for a one-group tensor)."""
        return len(self.bits)

    @property
    def uniform(self) -> bool:
        """True when every channel has the same width."""
        return len(set(self.bits)) == 1

    @property
    def max_bits(self) -> int:
        return max(self.bits)

    @property
    def min_bits(self) -> int:
        return min(self.bits)

    @property
    def bipolar(self) -> bool:
        """True when some channel is signed 1-bit ({-1, +1})."""
        return self.signed and 1 in self.bits

    @property
    def groups(self) -> dict[int, tuple[int, ...]]:
        """Bit width -> indices of the channels that use it, widths ascending."""
        out: dict[int, list[int]] = {}
        for c, b in enumerate(self.bits):
            out.setdefault(b, []).append(c)
        return {b: tuple(out[b]) for b in sorted(out)}

    def range(self, channel: int) -> tuple[int, int]:
        """Integer range of ``channel`` (any channel of a one-group tensor)."""
        b = self.bits[0] if len(self.bits) == 1 else self.bits[channel]
        return bit_range(b, self.signed)

    def bits_for(self, channels: int) -> tuple[int, ...]:
        """The widths spread over ``channels`` channels (expands one group)."""
        if len(self.bits) == 1:
            return self.bits * channels
        if len(self.bits) != channels:
            raise AnnotationError(
                f"has {len(self.bits)} channel widths, asked for {channels}",
                node=self.node or None,
                tensor=self.name,
            )
        return self.bits

    # ---- serialisation ---------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, tagged with the format version it follows."""
        return {
            "format": FORMAT,
            "name": self.name,
            "node": self.node,
            "kind": self.kind,
            "axis": self.axis,
            "bits": list(self.bits),
            "signed": self.signed,
            "source": self.source,
            "input": self.input,
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorAnnotation":
        if d.get("format", FORMAT) != FORMAT:
            raise AnnotationError(
                f"tensor annotation of format {d.get('format')!r}, expected {FORMAT!r}"
            )
        try:
            kind = d["kind"]
            if kind not in ("weight", "activation"):
                raise ValueError(f"kind {kind!r}")
            return cls(
                name=str(d["name"]),
                node=str(d.get("node", "")),
                kind=kind,
                axis=_as_int(d["axis"]),
                bits=tuple(_as_int(b) for b in d["bits"]),
                signed=bool(d["signed"]),
                source=str(d.get("source", "")),
                input=str(d.get("input", "")),
                scale=str(d.get("scale", "")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise AnnotationError(f"not a tensor annotation: {e}") from None


def _as_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{v!r} is not an integer")
    return int(v)


# ---------------------------------------------------------------------------
# A read-only index of the main graph
# ---------------------------------------------------------------------------
class _GraphIndex:
    """Producers, constants, element types and shapes of a model's main graph."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.producer: dict[str, onnx.NodeProto] = {}
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
        self._init = {t.name: t for t in g.initializer}
        self._const_nodes = {
            n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output
        }
        self._cache: dict[str, np.ndarray] = {}
        self.types: dict[str, tuple[int, tuple[int | None, ...] | None]] = {}
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            self._add_type(vi)
        if any(t.data_location == TensorProto.EXTERNAL for t in g.initializer):
            return  # inference would need the data in memory; keep what is declared
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - inference is a best-effort aid here
            return
        for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
            if vi.name not in self.types or self.types[vi.name][1] is None:
                self._add_type(vi)

    def _add_type(self, vi: onnx.ValueInfoProto) -> None:
        if not vi.type.HasField("tensor_type"):
            return
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        self.types[vi.name] = (tt.elem_type, shape)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant-node output, else ``None``."""
        if name in self._cache:
            return self._cache[name]
        if name in self._init:
            value = numpy_helper.to_array(self._init[name])
        elif name in self._const_nodes:
            value = _constant_node_value(self._const_nodes[name])
            if value is None:
                return None
        else:
            return None
        self._cache[name] = value
        return value

    def elem_type(self, name: str) -> int | None:
        if name in self._init:
            return self._init[name].data_type
        if name in self._const_nodes:
            for a in self._const_nodes[name].attribute:
                if a.name == "value":
                    return a.t.data_type
        return self.types.get(name, (None, None))[0]

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        if name in self._init:
            return tuple(self._init[name].dims)
        value = self.constant(name) if name in self._const_nodes else None
        if value is not None:
            return tuple(value.shape)
        return self.types.get(name, (None, None))[1]


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), np.float32)
        if a.name == "value_int":
            return np.array(a.i, np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), np.int64)
    return None


def _label(node: onnx.NodeProto) -> str:
    """A node's name, or a description of it when it has none."""
    if node.name:
        return node.name
    out = node.output[0] if node.output else "?"
    return f"<{node.op_type} -> {out}>"


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _is_dq(node: onnx.NodeProto) -> bool:
    return node.op_type == "DequantizeLinear" and node.domain in _DQ_DOMAINS


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Declared:
    """Widths stated by node metadata or the quant map, before checking."""

    bits: tuple[int, ...]
    axis: int
    signed: bool | None
    source: str


def read_annotations(
    model_or_path: onnx.ModelProto | str | os.PathLike,
) -> dict[str, TensorAnnotation]:
    """Precision of every DequantizeLinear of the main graph, keyed by its output.

    A path is loaded and checked first (:class:`ModelLoadError` on failure).
    Widths come from node metadata, else the ``soniq.quant_map`` mirror, else the
    graph structure; any contradiction with the graph raises
    :class:`AnnotationError` naming the node, the channel and both values.
    """
    model = _as_model(model_or_path)
    index = _GraphIndex(model)
    dq_nodes = [n for n in model.graph.node if _is_dq(n)]
    qmap = _QuantMap.from_model(model, {n.output[0] for n in dq_nodes})
    out: dict[str, TensorAnnotation] = {}
    for node in dq_nodes:
        ann = _read_one(node, index, qmap)
        out[ann.name] = ann
    from .scales import check_scales

    check_scales(model, index, out)
    return out


def _read_one(node: onnx.NodeProto, index: _GraphIndex, qmap: "_QuantMap") -> TensorAnnotation:
    label = _label(node)
    x_name = node.input[0]
    scale = node.input[1] if len(node.input) > 1 else ""
    declared = _declared_from_node(node, label) or qmap.lookup(node)
    container = _container_type(node, index)
    if index.constant(x_name) is not None and container in _INT_CONTAINERS:
        bits, axis, signed, source = _read_weight(node, label, index, container, declared)
        kind: Literal["weight", "activation"] = "weight"
    else:
        bits, axis, signed, source = _read_activation(node, label, index, container, declared)
        kind = "activation"
    return TensorAnnotation(
        name=node.output[0],
        node=node.name,
        kind=kind,
        axis=axis,
        bits=bits,
        signed=signed,
        source=source,
        input=x_name,
        scale=scale,
    )


def _container_type(node: onnx.NodeProto, index: _GraphIndex) -> int:
    """ONNX dtype of the DQ input: its own type, else its zero point's, else uint8."""
    t = index.elem_type(node.input[0])
    if t:
        return t
    if len(node.input) > 2 and node.input[2]:
        t = index.elem_type(node.input[2])
        if t:
            return t
    return TensorProto.UINT8  # QuantizeLinear's output without a zero point


def _container_range(container: int) -> tuple[int, int] | None:
    if container not in _INT_CONTAINERS:
        return None
    b, s = _INT_CONTAINERS[container]
    return (-(1 << (b - 1)), (1 << (b - 1)) - 1) if s else (0, (1 << b) - 1)


def _parse_bits(raw: Any, label: str, where: str) -> tuple[int, ...]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise AnnotationError(
                f"{where} soniq.bits is not JSON: {raw!r}", node=label
            ) from None
    if not isinstance(raw, list) or not raw:
        raise AnnotationError(
            f"{where} soniq.bits must be a non-empty list of integers, found {raw!r}",
            node=label,
        )
    try:
        return tuple(_as_int(b) for b in raw)
    except ValueError as e:
        raise AnnotationError(f"{where} soniq.bits: {e}", node=label) from None


def _parse_signed(raw: Any, label: str, where: str) -> bool:
    table = {"1": True, "0": False, "true": True, "false": False}
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in table:
        return table[raw.strip().lower()]
    raise AnnotationError(f"{where} soniq.signed must be \"1\" or \"0\", found {raw!r}", node=label)


def _parse_axis(raw: Any, label: str, where: str) -> int:
    try:
        return _as_int(int(raw) if isinstance(raw, str) else raw)
    except ValueError:
        raise AnnotationError(
            f"{where} soniq.axis is not an integer: {raw!r}", node=label
        ) from None


def _declared_from_node(node: onnx.NodeProto, label: str) -> _Declared | None:
    meta = {p.key: p.value for p in node.metadata_props}
    if KEY_BITS not in meta:
        return None
    where = "node metadata"
    if KEY_AXIS not in meta:
        raise AnnotationError(f"{where} has soniq.bits but no soniq.axis", node=label)
    signed = _parse_signed(meta[KEY_SIGNED], label, where) if KEY_SIGNED in meta else None
    return _Declared(
        bits=_parse_bits(meta[KEY_BITS], label, where),
        axis=_parse_axis(meta[KEY_AXIS], label, where),
        signed=signed,
        source="node",
    )


class _QuantMap:
    """The model-level ``soniq.quant_map``, with lookup by output name or alias."""

    def __init__(self, entries: dict[str, dict], claimed: set[str]):
        self.entries = entries
        self.aliases: dict[str, list[str]] = {}
        for key, e in entries.items():
            if key in claimed:
                continue  # an output of the graph owns it; aliases must not steal it
            for alias in e.get("aliases", []) or []:
                if isinstance(alias, str) and alias:
                    self.aliases.setdefault(alias, []).append(key)

    @classmethod
    def from_model(cls, model: onnx.ModelProto, dq_outputs: set[str]) -> "_QuantMap":
        meta = {p.key: p.value for p in model.metadata_props}
        fmt = meta.get(KEY_FORMAT)
        if fmt is not None and fmt != FORMAT:
            raise AnnotationError(
                f"model metadata soniq.format is {fmt!r}, this reader understands {FORMAT!r}",
                hint="upgrade soniq-tvm or re-export the model",
            )
        if KEY_MAP not in meta:
            return cls({}, set())
        try:
            entries = json.loads(meta[KEY_MAP])
        except json.JSONDecodeError as e:
            raise AnnotationError(f"model metadata soniq.quant_map is not JSON: {e}") from None
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            raise AnnotationError(
                "model metadata soniq.quant_map must map output names to objects"
            )
        return cls(entries, dq_outputs & set(entries))

    def lookup(self, node: onnx.NodeProto) -> _Declared | None:
        key = node.output[0]
        if key not in self.entries:
            key = None
            aliases = [node.input[0]] + ([node.input[1]] if len(node.input) > 1 else [])
            for alias in aliases:
                keys = self.aliases.get(alias, [])
                if len(keys) == 1:
                    key = keys[0]
                    break
            if key is None:
                return None
        e = self.entries[key]
        where = f"soniq.quant_map entry {key!r}"
        label = _label(node)
        for field in ("bits", "axis"):
            if field not in e:
                raise AnnotationError(f"{where} has no {field!r}", node=label)
        signed = _parse_signed(e["signed"], label, where) if "signed" in e else None
        return _Declared(
            bits=_parse_bits(e["bits"], label, where),
            axis=_parse_axis(e["axis"], label, where),
            signed=signed,
            source="quant_map",
        )


def _normalize_axis(axis: int, rank: int | None, label: str, what: str) -> int:
    if rank is None:
        return axis
    if not -rank <= axis < max(rank, 1):
        raise AnnotationError(
            f"soniq.axis {axis} is out of range for the {rank}-D {what}", node=label
        )
    return axis % rank if rank else 0


def _default_axis(node: onnx.NodeProto, rank: int | None) -> int:
    """Axis reported for a one-group tensor: the DQ's own axis attribute."""
    axis = int(_attr(node, "axis", 1))
    if rank is None:
        return axis
    if rank == 0 or not -rank <= axis < rank:
        return 0
    return axis % rank


def _check_widths(bits: tuple[int, ...], label: str) -> None:
    for c, b in enumerate(bits):
        if not 1 <= b <= MAX_BITS:
            raise AnnotationError(
                f"bit width {b} is outside 1..{MAX_BITS}", node=label, channel=c
            )


def _check_count(
    bits: tuple[int, ...], count: int | None, axis: int, label: str, what: str
) -> None:
    if count is not None and len(bits) != count:
        raise AnnotationError(
            f"soniq.bits has {len(bits)} entries but the {what} has {count} channels "
            f"along axis {axis}",
            node=label,
        )


def _check_container(
    bits: tuple[int, ...], signed: bool, container: int, label: str
) -> None:
    """Each channel's range must fit the dtype the integers are stored in."""
    crange = _container_range(container)
    if crange is None:
        return
    name = TensorProto.DataType.Name(container).lower()
    for c, b in enumerate(bits):
        r = bit_range(b, signed)
        if not _contains(crange, r):
            kind = "signed" if signed else "unsigned"
            raise AnnotationError(
                f"{kind} {b}-bit range [{r[0]}, {r[1]}] does not fit the {name} "
                f"container [{crange[0]}, {crange[1]}]",
                node=label,
                channel=c,
            )


def check_weight_values(
    w: np.ndarray, bits: Sequence[int], axis: int, signed: bool, label: str
) -> None:
    """Raise :class:`AnnotationError` for the first weight outside its channel's range.

    Signed 1-bit channels are bipolar: every value must be -1 or +1.
    """
    w = np.asarray(w)
    flat = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.int64)
    bits_a = np.asarray(bits, np.int64)
    if bits_a.size == 1:
        bits_a = np.repeat(bits_a, flat.shape[0])
    ranges = np.array([bit_range(int(b), signed) for b in bits_a], np.int64)
    bad = (flat < ranges[:, :1]) | (flat > ranges[:, 1:])
    if signed:
        bad |= (bits_a[:, None] == 1) & (flat == 0)
    if not bad.any():
        return
    c, i = np.argwhere(bad)[0]
    b = int(bits_a[c])
    value = int(flat[c, i])
    if signed and b == 1:
        expected = "bipolar {-1, +1}"
    else:
        lo, hi = ranges[c]
        expected = f"[{lo}, {hi}]"
    raise AnnotationError(
        f"weight value {value} is outside the {'signed' if signed else 'unsigned'} "
        f"{b}-bit range {expected}",
        node=label,
        channel=int(c),
    )


def _read_weight(
    node: onnx.NodeProto,
    label: str,
    index: _GraphIndex,
    container: int,
    declared: _Declared | None,
) -> tuple[tuple[int, ...], int, bool, str]:
    w = index.constant(node.input[0])
    rank = w.ndim
    cbits, csigned = _INT_CONTAINERS[container]
    if declared is None:
        return (cbits,), _default_axis(node, rank), csigned, "dtype"
    axis = _normalize_axis(declared.axis, rank, label, "weight")
    bits = declared.bits
    _check_count(bits, w.shape[axis] if rank else 1, axis, label, "weight")
    _check_widths(bits, label)
    signed = csigned if declared.signed is None else declared.signed
    _check_container(bits, signed, container, label)
    check_weight_values(w if rank else w.reshape(1), bits, axis if rank else 0, signed, label)
    return bits, axis, signed, declared.source


# ---- activations ------------------------------------------------------------
@dataclass(frozen=True)
class _Clamp:
    """Integer bounds applied between QuantizeLinear and DequantizeLinear."""

    lo: np.ndarray  # per channel (or one value), already met with the container
    hi: np.ndarray
    axis: int | None  # None: one value for the whole tensor
    how: str  # "max_min" or "clip"


def _find_clamp(
    index: _GraphIndex, x_name: str, rank: int | None, crange: tuple[int, int] | None, label: str
) -> _Clamp | None:
    """Walk up from the DQ input through Max/Min/Clip nodes with constant bounds."""
    los: list[np.ndarray] = []
    his: list[np.ndarray] = []
    how = "clip"
    t = x_name
    for _ in range(8):  # a clamp chain is short; this bounds pathological graphs
        p = index.producer.get(t)
        if p is None:
            break
        if p.op_type in ("Max", "Min") and len(p.input) == 2:
            consts = [index.constant(i) for i in p.input]
            if sum(c is not None for c in consts) != 1:
                break
            k = 0 if consts[0] is not None else 1
            (los if p.op_type == "Max" else his).append(consts[k])
            t = p.input[1 - k]
            how = "max_min"
        elif p.op_type == "Clip" and len(p.input) >= 1:
            bounds = list(p.input[1:3]) + [""] * (3 - len(p.input))
            vals = [index.constant(b) if b else None for b in bounds[:2]]
            if any(b and v is None for b, v in zip(bounds, vals)):
                break
            if vals[0] is not None:
                los.append(vals[0])
            if vals[1] is not None:
                his.append(vals[1])
            t = p.input[0]
        else:
            break
    if not los and not his:
        return None
    return _combine_bounds(los, his, rank, crange, how, label)


def _combine_bounds(
    los: list[np.ndarray],
    his: list[np.ndarray],
    rank: int | None,
    crange: tuple[int, int] | None,
    how: str,
    label: str,
) -> _Clamp:
    lo_c, hi_c = crange if crange else (-(1 << 31), (1 << 31) - 1)
    lo = np.asarray(lo_c, np.int64)
    hi = np.asarray(hi_c, np.int64)
    for a in los:
        lo = np.maximum(lo, np.asarray(a).astype(np.int64))
    for a in his:
        hi = np.minimum(hi, np.asarray(a).astype(np.int64))
    try:
        shape = np.broadcast_shapes(lo.shape, hi.shape)
    except ValueError:
        raise AnnotationError(
            f"Max/Min bounds of shapes {lo.shape} and {hi.shape} do not broadcast",
            node=label,
        ) from None
    lo, hi = np.broadcast_to(lo, shape), np.broadcast_to(hi, shape)
    varying = [i for i, d in enumerate(shape) if d != 1]
    if not varying:
        return _Clamp(lo.reshape(1), hi.reshape(1), None, how)
    if len(varying) > 1:
        raise AnnotationError(
            f"clamp bounds of shape {tuple(shape)} vary along more than one axis",
            node=label,
            hint="per-channel bounds must be shaped to broadcast along the channel axis",
        )
    from_end = varying[0] - len(shape)
    axis = from_end if rank is None else rank + from_end
    if rank is not None and axis < 0:
        raise AnnotationError(
            f"clamp bounds of shape {tuple(shape)} have more axes than the {rank}-D tensor",
            node=label,
        )
    return _Clamp(lo.reshape(-1), hi.reshape(-1), axis, how)


def _read_activation(
    node: onnx.NodeProto,
    label: str,
    index: _GraphIndex,
    container: int,
    declared: _Declared | None,
) -> tuple[tuple[int, ...], int, bool, str]:
    x_name = node.input[0]
    shape = index.shape(x_name) or index.shape(node.output[0])
    rank = len(shape) if shape is not None else None
    crange = _container_range(container)
    clamp = _find_clamp(index, x_name, rank, crange, label)
    if declared is None:
        return _activation_from_structure(node, label, rank, container, clamp)

    axis = _normalize_axis(declared.axis, rank, label, "activation")
    bits = declared.bits
    count = shape[axis] if shape is not None and rank else None
    _check_count(bits, count, axis, label, "activation")
    _check_widths(bits, label)
    csigned = _INT_CONTAINERS.get(container, (8, True))[1]
    signed = csigned if declared.signed is None else declared.signed
    _check_container(bits, signed, container, label)
    if signed and 1 in bits:
        raise AnnotationError(
            "signed 1-bit (bipolar) is for weights only: a Max/Min clamp cannot "
            "exclude 0 from an activation",
            node=label,
            channel=bits.index(1),
        )
    if crange is not None:
        _check_against_clamp(bits, axis, signed, clamp, crange, label)
    return bits, axis, signed, declared.source


def _check_against_clamp(
    bits: tuple[int, ...],
    axis: int,
    signed: bool,
    clamp: _Clamp | None,
    crange: tuple[int, int],
    label: str,
) -> None:
    """The annotated widths must be the ranges ORT really clamps each channel to."""
    what = "Max/Min" if clamp is not None and clamp.how == "max_min" else "Clip"
    if clamp is None:
        lo = np.full(len(bits), crange[0])
        hi = np.full(len(bits), crange[1])
        what = "the container (no Max/Min in the graph)"
    elif clamp.axis is None:
        lo = np.repeat(clamp.lo, len(bits))
        hi = np.repeat(clamp.hi, len(bits))
    else:
        if clamp.axis != axis and (clamp.axis >= 0) == (axis >= 0):
            raise AnnotationError(
                f"soniq.axis is {axis} but the {what} bounds vary along axis {clamp.axis}",
                node=label,
            )
        if len(clamp.lo) != len(bits):
            raise AnnotationError(
                f"soniq.bits has {len(bits)} entries but the {what} bounds have "
                f"{len(clamp.lo)} channels",
                node=label,
            )
        lo, hi = clamp.lo, clamp.hi
    for c, b in enumerate(bits):
        l, h = int(lo[c]), int(hi[c])
        r = bit_range(b, signed)
        found = bits_from_range(l, h) if h >= l else 0
        if found != b or not _contains(r, (l, h)):
            raise AnnotationError(
                f"annotated {'signed' if signed else 'unsigned'} {b} bits "
                f"[{r[0]}, {r[1]}], but {what} clamps to [{l}, {h}] ({found} bits)",
                node=label,
                channel=c,
            )


def _activation_from_structure(
    node: onnx.NodeProto, label: str, rank: int | None, container: int, clamp: _Clamp | None
) -> tuple[tuple[int, ...], int, bool, str]:
    if container not in _INT_CONTAINERS:  # float8 and friends: no integer range
        return (8,), _default_axis(node, rank), True, "dtype"
    cbits, csigned = _INT_CONTAINERS[container]
    if clamp is None:
        return (cbits,), _default_axis(node, rank), csigned, "dtype"
    signed = bool((clamp.lo < 0).any())
    bits = []
    for c, (l, h) in enumerate(zip(clamp.lo.tolist(), clamp.hi.tolist())):
        b = bits_from_range(l, h) if h >= l else 0
        if not 1 <= b <= MAX_BITS or not _contains(bit_range(b, signed), (l, h)):
            raise AnnotationError(
                f"clamp range [{l}, {h}] is not the range of a "
                f"{'signed' if signed else 'unsigned'} width of 1..{MAX_BITS} bits "
                f"(it reads as {b} bits)",
                node=label,
                channel=c if clamp.axis is not None else None,
                hint="annotate the tensor with soniq.bits",
            )
        bits.append(b)
    axis = clamp.axis if clamp.axis is not None else _default_axis(node, rank)
    return tuple(bits), axis, signed, clamp.how


_WRITERS = ("annotate", "write_quant_map", "to_int8_initializers", "_set_props")


def __getattr__(name: str):
    """The writing side, from :mod:`soniq_tvm.annotation_writer` on first use (it
    imports this module, so it cannot be imported at the top)."""
    if name in _WRITERS:
        from . import annotation_writer

        return getattr(annotation_writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
