"""Every conv/matmul of an ONNX file, and whether its file quantizes it.

The plan must list every Conv, MatMul and Gemm of the file, including the ones
that run in float, each with the reason. This module reads that off the graph
(pure onnx, no TVM): an op whose activation and weight both come from a
DequantizeLinear (the weight's reading a constant) is *quantized* and should
fold into an integer kernel; one whose two operands are dequantized activations
is an *act-act* matmul (attention); anything else is float, with the reason
("weight not quantized", "activation not quantized", ...). The compiler compares
this with what its passes folded and reports the difference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import onnx

from .naming import node_label

__all__ = ["OpSurvey", "survey", "LINEAR_OPS"]

LINEAR_OPS = ("Conv", "MatMul", "Gemm")
_PASS_THROUGH = ("Identity", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast")


@dataclass(frozen=True)
class OpSurvey:
    name: str  # the compiler's name of the node (node_label)
    op_type: str
    status: Literal["quantized", "act-act", "float"]
    reason: str = ""  # why a float op is float


def _is_dq(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "DequantizeLinear"


def survey(model: onnx.ModelProto) -> list[OpSurvey]:
    """One entry per Conv / MatMul / Gemm of the main graph, in graph order."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output if o}
    constants = {t.name for t in g.initializer}
    constants |= {n.output[0] for n in g.node if n.op_type == "Constant" and n.output}

    def source(name: str) -> tuple[onnx.NodeProto | None, str]:
        """The node producing ``name`` once pass-through ops are skipped."""
        seen = 0
        node = producer.get(name)
        while node is not None and node.op_type in _PASS_THROUGH and node.input and seen < 8:
            name, node, seen = node.input[0], producer.get(node.input[0]), seen + 1
        return node, name

    def dq_kind(name: str) -> str:
        """"weight" (DQ of a constant), "activation" (DQ of a computed tensor),
        "float-constant" or "float"."""
        node, root = source(name)
        if _is_dq(node):
            return "weight" if node.input[0] in constants else "activation"
        return "float-constant" if root in constants else "float"

    out = []
    for i, n in enumerate(g.node):
        if n.op_type not in LINEAR_OPS or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        label = node_label(n, i)
        x, w = dq_kind(n.input[0]), dq_kind(n.input[1])
        if n.op_type == "Gemm" and x in ("weight", "float-constant") and w in ("activation", "float"):
            x, w = w, x  # Gemm(W, X): the constant may come first (transA/transB)
        if x == "activation" and w == "weight":
            out.append(OpSurvey(label, n.op_type, "quantized"))
        elif x == "activation" and w == "activation" and n.op_type == "MatMul":
            fixed = all(_one_constant(source(t)[0], constants, g) for t in n.input[:2])
            out.append(OpSurvey(label, n.op_type, "act-act") if fixed else OpSurvey(
                label, n.op_type, "float", "activation x activation with a scale or zero point that is not a "
                "constant"))
        else:
            out.append(OpSurvey(label, n.op_type, "float", _float_reason(x, w, n)))
    return out


def _one_constant(dq: onnx.NodeProto, constants: set, graph: onnx.GraphProto) -> bool:
    """Whether a DequantizeLinear's scale and zero point are constants (one per
    tensor or one per index of its axis: the fold groups the reduction's channels
    by their steps, and reports an op with too many groups as float)."""
    return all(not name or name in constants for name in dq.input[1:3])


def _float_reason(x: str, w: str, node: onnx.NodeProto) -> str:
    w_ok = w in ("weight", "activation")
    x_ok = x == "activation"
    if not w_ok and not x_ok:
        return "not quantized (no DequantizeLinear on either input)"
    if not w_ok:
        what = "float initializer" if w == "float-constant" else "float tensor"
        return f"weight not quantized ({what} {node.input[1]!r})"
    if x in ("weight", "float-constant"):
        return "activation is a constant"
    if x == "activation" and w == "activation":
        return f"weight {node.input[1]!r} is computed at run time (not a constant)"
    return f"activation not quantized ({node.input[0]!r} is float)"
