"""Checks of the quantization steps a file declares (every Q/DQ node's scale).

A scale must be a positive, finite float, one per tensor or one per index of the
node's ``axis``; a per-channel activation scale must run along the axis the
precision annotation (``soniq.axis``) runs along. Anything else gets an
:class:`~soniq_tvm.errors.AnnotationError` naming the node, the scale tensor and
the channel, before any compilation starts. Called by
:func:`soniq_tvm.annotation.read_annotations` with its graph index, so this
module imports neither onnx nor the annotation reader.
"""
from __future__ import annotations

import numpy as np

from .errors import AnnotationError

__all__ = ["check_scales", "QDQ_OPS"]

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _label(node) -> str:
    return node.name or f"<{node.op_type} -> {node.output[0] if node.output else '?'}>"


def _axis(node) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return 1


def check_scales(model, index, annotations: dict) -> None:
    """Raise on the first bad scale of ``model``. ``index``: the annotation
    reader's graph index (``constant(name)``, ``shape(name)``); ``annotations``:
    its result, keyed by DQ output."""
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS or len(node.input) < 2:
            continue
        scale = index.constant(node.input[1])
        if scale is None or not np.issubdtype(scale.dtype, np.floating):
            continue  # computed at run time (ORT checks it), or a type ONNX itself rejects
        label, name = _label(node), node.input[1]
        flat = np.asarray(scale, np.float64).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(flat) | (flat <= 0))
        if bad.size:
            c = int(bad[0])
            raise AnnotationError(
                f"scale {flat[c]!r} is not a positive finite step", node=label, tensor=name,
                channel=c if flat.size > 1 else None,
                hint="every quantization step must be > 0 and finite: recalibrate or re-export this tensor")
        if flat.size == 1 or scale.ndim > 1:
            continue  # one step per tensor; blocked scales are checked by to_qdq
        shape = index.shape(node.input[0])
        axis = _axis(node)
        if shape is not None:
            if not -len(shape) <= axis < len(shape):
                raise AnnotationError(f"scale axis {axis} is out of range for the {len(shape)}-D input",
                                      node=label, tensor=name)
            axis %= len(shape)
            if shape[axis] is not None and shape[axis] != flat.size:
                raise AnnotationError(
                    f"scale has {flat.size} values but axis {axis} of the input has {shape[axis]} channels",
                    node=label, tensor=name,
                    hint="a per-channel scale needs one value per index of the node's axis")
        ann = annotations.get(node.output[0]) if node.op_type == "DequantizeLinear" else None
        if ann is not None and ann.kind == "activation" and len(ann.bits) > 1 and ann.axis >= 0 \
                and shape is not None and ann.axis != axis:
            raise AnnotationError(
                f"scale runs along axis {axis} but soniq.axis (the precision of each channel) runs along "
                f"axis {ann.axis}", node=label, tensor=name,
                hint="per-channel steps and per-channel widths must describe the same channels")
