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

This module also writes the convention (:func:`annotate`, :func:`write_quant_map`,
:func:`save_model`) and builds annotated models from numpy (:class:`QDQBuilder`),
for tests, examples and the PyTorch exporter. It needs numpy and onnx only.
``docs/annotation-format.md`` is the full description.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import AnnotationError, ModelLoadError, UnsupportedModelError

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
    "quantize_weights",
    "calibrate_scale",
    "choose_bits",
    "QDQBuilder",
]

FORMAT = "soniq-qdq/1"
MAX_BITS = 8
IR_VERSION = 10  # ORT 1.31 refuses IR 14, which onnx 1.23's make_model writes
OPSET_RANGE = range(21, 27)
_PROTOBUF_LIMIT = 2**31 - 1

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
# Loading, checking, saving
# ---------------------------------------------------------------------------
def check_model(model: onnx.ModelProto, *, file: str | None = None) -> None:
    """Run ``onnx.checker`` with ``full_check`` (strict shape inference).

    A model over 2 GB can only be checked through its ``file``. Raises
    :class:`ModelLoadError` naming ``file`` and the checker's complaint.
    """
    target: onnx.ModelProto | str = model
    if file is not None and model.ByteSize() > _PROTOBUF_LIMIT and os.path.exists(file):
        target = file
    try:
        onnx.checker.check_model(target, full_check=True)
    except Exception as e:  # noqa: BLE001 - ValidationError, InferenceError, ValueError
        raise ModelLoadError(f"onnx.checker failed: {e}", file=file) from None


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (and its external data) and check it.

    Raises :class:`ModelLoadError` naming the file when it is missing, unreadable,
    not ONNX, or fails ``onnx.checker``.
    """
    file = os.fspath(path)
    if not os.path.exists(file):
        raise ModelLoadError("no such file", file=file)
    if os.path.isdir(file):
        raise ModelLoadError("is a directory, not an ONNX file", file=file)
    try:
        model = onnx.load(file)
    except OSError as e:
        raise ModelLoadError(f"cannot read: {e.strerror or e}", file=file) from None
    except Exception as e:  # noqa: BLE001 - DecodeError and friends
        raise ModelLoadError(
            f"not an ONNX model ({type(e).__name__}: {e})", file=file
        ) from None
    if not model.HasField("graph") or model.ir_version == 0:
        raise ModelLoadError(
            "not an ONNX model (no graph or IR version)",
            file=file,
            hint="the bytes parse as protobuf but hold no model",
        )
    check_model(model, file=file)
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Check ``model`` fully, then write it atomically to ``path``.

    The bytes go to a temporary file in the same folder that replaces ``path``
    only once it is complete, so a reader never sees half a model and a failed
    write leaves nothing behind.
    """
    file = os.fspath(path)
    check_model(model, file=file)
    try:
        data = model.SerializeToString()
    except ValueError as e:
        raise ModelLoadError(
            f"cannot serialize: {e}", file=file, hint="models over 2 GB need external data"
        ) from None
    folder = os.path.dirname(os.path.abspath(file))
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(file)}.", suffix=".tmp", dir=folder
        )
    except OSError as e:
        raise ModelLoadError(f"cannot write: {e.strerror or e}", file=file) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except OSError as e:
        _unlink_quietly(tmp)
        raise ModelLoadError(f"cannot write: {e.strerror or e}", file=file) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _as_model(model_or_path: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return load_model(model_or_path)
    raise TypeError(
        f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}"
    )


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


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------
def _set_props(props: Any, values: Mapping[str, str]) -> None:
    """Replace or add ``key -> value`` in a repeated StringStringEntryProto field."""
    kept = [(p.key, p.value) for p in props if p.key not in values]
    del props[:]
    for k, v in kept + list(values.items()):
        entry = props.add()
        entry.key, entry.value = k, v


def _find_dq(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for n in model.graph.node:
        if _is_dq(n) and n.name == name:
            return n
    for n in model.graph.node:  # unnamed nodes: accept the output name
        if _is_dq(n) and not n.name and n.output[0] == name:
            return n
    raise AnnotationError("no DequantizeLinear node of this name", node=name)


def _channel_count(model: onnx.ModelProto, node: onnx.NodeProto, axis: int) -> int:
    index = _GraphIndex(model)
    shape = index.shape(node.input[0]) or index.shape(node.output[0])
    if shape is None or not -len(shape) <= axis < len(shape) or shape[axis] is None:
        raise AnnotationError(
            f"cannot spread one width: the channel count along axis {axis} is unknown",
            node=_label(node),
            hint="pass one width per channel",
        )
    return int(shape[axis])


def annotate(
    model: onnx.ModelProto,
    dq_node_name: str,
    bits: int | Sequence[int],
    axis: int,
    signed: bool,
) -> None:
    """Set ``soniq.bits/axis/signed`` on a DequantizeLinear node, in place.

    ``bits`` is one width per channel along ``axis``, or one int spread over all
    of them. ``dq_node_name`` is the node's name (its output name for an unnamed
    node). Nothing is checked here beyond the node's existence:
    :func:`read_annotations` (and :func:`write_quant_map`) check everything.
    """
    node = _find_dq(model, dq_node_name)
    if isinstance(bits, (int, np.integer)):
        widths = [int(bits)] * _channel_count(model, node, int(axis))
    else:
        widths = [int(b) for b in bits]
    _set_props(
        node.metadata_props,
        {
            KEY_BITS: json.dumps(widths),
            KEY_AXIS: str(int(axis)),
            KEY_SIGNED: "1" if signed else "0",
        },
    )


def write_quant_map(model: onnx.ModelProto) -> None:
    """Mirror every stated annotation into the model metadata, in place.

    Reads the model (which checks it), then writes ``soniq.format`` and
    ``soniq.quant_map`` keyed by the current DQ output names, with the DQ input
    and scale names as aliases. Widths that the structure alone gives are not
    mirrored: any reader derives them again.
    """
    entries = {}
    for a in read_annotations(model).values():
        if a.source not in ("node", "quant_map"):
            continue
        entries[a.name] = {
            "axis": a.axis,
            "bits": list(a.bits),
            "signed": a.signed,
            "aliases": [n for n in (a.input, a.scale) if n],
        }
    _set_props(
        model.metadata_props,
        {KEY_FORMAT: FORMAT, KEY_MAP: json.dumps(entries, sort_keys=True, separators=(",", ":"))},
    )


def to_int8_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with INT4/UINT4/INT2/UINT2 constants stored as int8/uint8.

    TVM's ONNX importer cannot read packed sub-byte tensors. The width a DQ read
    from such a type would be lost with it, so each of those DQs gets node
    metadata stating the width (one entry per channel along the DQ axis) and the
    quant map is rewritten. A packed zero point of a QuantizeLinear is left
    alone: widening it would widen that QuantizeLinear's saturation.
    """
    before = read_annotations(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    keep = {n.input[2] for n in g.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    converted: dict[str, int] = {}
    tensors = [(t, t.name) for t in g.initializer]
    tensors += [
        (a.t, n.output[0])
        for n in g.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    for t, name in tensors:
        if t.data_type in _PACKED_TO_BYTE and name not in keep:
            new_type, np_type = _PACKED_TO_BYTE[t.data_type]
            converted[name] = new_type
            value = numpy_helper.to_array(t).astype(np_type)
            t.CopyFrom(numpy_helper.from_array(value, t.name))
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.name in converted and vi.type.HasField("tensor_type"):
            vi.type.tensor_type.elem_type = converted[vi.name]
    if not converted:
        return out
    index = _GraphIndex(out)
    for n in g.node:
        ann = before.get(n.output[0]) if _is_dq(n) else None
        if ann is None or ann.source != "dtype" or n.input[0] not in converted:
            continue
        w = index.constant(n.input[0])
        axis = ann.axis if w.ndim else 0
        channels = w.shape[axis] if w.ndim else 1
        _set_props(
            n.metadata_props,
            {
                KEY_BITS: json.dumps(list(ann.bits) * channels),
                KEY_AXIS: str(axis),
                KEY_SIGNED: "1" if ann.signed else "0",
            },
        )
    write_quant_map(out)
    return out


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
    to ``bits[c]``. One scale serves every channel (the compiler requires one
    scale per precision group), so narrow channels and wide channels trade off:
    the grid search finds the scale that loses least overall.
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
