"""Writing the ``soniq-qdq/1`` convention: node annotations, the quant map, and
the sub-byte initializers TVM's importer cannot read widened to bytes.

The reading side (and every check) is :mod:`soniq_tvm.annotation`, which also
re-exports these functions; :mod:`soniq_tvm.builder` builds whole models.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .annotation import (
    _PACKED_TO_BYTE,
    FORMAT,
    KEY_AXIS,
    KEY_BITS,
    KEY_FORMAT,
    KEY_MAP,
    KEY_SIGNED,
    _GraphIndex,
    _is_dq,
    _label,
    read_annotations,
)
from .errors import AnnotationError

__all__ = ["annotate", "write_quant_map", "to_int8_initializers"]

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
