"""One mapping from a file's tensor names to the names the compiler uses.

TVM's ONNX importer renames what it reads: it strips ``onnx::`` from
initializer names (``torch.onnx.export`` writes ``onnx::Conv_123``), and two
initializers that differ only by that prefix would then share one parameter
name. The passes find weights by parameter name, so before import every
initializer gets a safe, unique name of our own (:func:`canonical_names`) and
everything keyed by an initializer name (the weight annotations) is translated
through the returned mapping once. Constant nodes that hold weights are turned
into initializers first, so they fold like any other weight.

Pure onnx; no TVM.
"""
from __future__ import annotations

import re

import onnx

__all__ = ["canonical_names", "safe_name", "node_label"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def safe_name(name: str) -> str:
    """``name`` as an identifier: letters, digits and ``_``, starting with a letter."""
    s = _UNSAFE.sub("_", name.removeprefix("onnx::")).strip("_") or "t"
    return s if s[0].isalpha() else f"t_{s}"


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {vi.name for vi in list(graph.input) + list(graph.output) + list(graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for n in graph.node:
        names.update(n.input)
        names.update(n.output)
    return names


def _constants_to_initializers(graph: onnx.GraphProto, keep: set[str]) -> None:
    """Constant nodes holding a tensor (``value``) become initializers of the same
    name, unless their output is a graph output."""
    nodes = list(graph.node)
    del graph.node[:]
    for n in nodes:
        value = next((a.t for a in n.attribute if a.name == "value"), None)
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and value is not None and n.output[0] not in keep:
            t = onnx.TensorProto()
            t.CopyFrom(value)
            t.name = n.output[0]
            graph.initializer.append(t)
        else:
            graph.node.append(n)


def _rename_uses(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename inputs of every node, here and in subgraphs (which may read outer
    names), unless a subgraph shadows the name with its own."""
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in mapping:
                n.input[i] = mapping[name]
        for a in n.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subs:
                own = {t.name for t in sub.initializer} | {vi.name for vi in sub.input}
                own |= {o for m in sub.node for o in m.output}
                _rename_uses(sub, {k: v for k, v in mapping.items() if k not in own})


def canonical_names(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` whose initializers all have safe, unique names, and the
    mapping ``{original name: new name}`` (every initializer, renamed or not).

    Initializers that are graph outputs keep their name (an output's name is part
    of the module's signature). Constant nodes with a tensor value are made
    initializers first and appear in the mapping under their output name.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    outputs = {o.name for o in g.output}
    _constants_to_initializers(g, outputs)
    used = _all_names(g) - {t.name for t in g.initializer}
    used |= outputs
    mapping: dict[str, str] = {}
    for t in g.initializer:
        if t.name in outputs:
            mapping[t.name] = t.name
            continue
        base = safe_name(t.name)
        new, k = base, 1
        while new in used:
            k += 1
            new = f"{base}_{k}"
        used.add(new)
        mapping[t.name] = new
    renamed = {k: v for k, v in mapping.items() if k != v}
    if not renamed:
        return out, mapping
    for t in g.initializer:
        t.name = mapping[t.name]
    for vi in list(g.input) + list(g.value_info):
        if vi.name in renamed:
            vi.name = renamed[vi.name]
    _rename_uses(g, renamed)
    return out, mapping


def node_label(node: onnx.NodeProto, index: int) -> str:
    """The name the compiler gives a node: its own, else ``<op_type>_<index>``."""
    return node.name or f"{node.op_type}_{index}"

