"""Check a compiled module against ONNX Runtime running the same annotated file.

The reference is ORT with every graph optimisation disabled (``ORT_DISABLE_ALL``):
it executes the QDQ graph as written, i.e. fake-quant in float. Its optimised
levels fuse QDQ into int8 kernels that saturate in int16 on AVX2, so they are a
speed peer, not the reference.

Comparing end-to-end outputs cannot tell a correct module from a broken one in
a deep network: fp32 rounding flips a code at a near-tie, and depth amplifies
the flips (ORT's output and the exact arithmetic part ways on a third of the codes of an
ORT-quantized ResNet-18).
So a module built with probes (the default) is checked **layer by layer**
(:mod:`soniq_tvm.layercheck`): every integer kernel exactly against the file's
weights and zero points, the glue between kernels teacher-forced against ORT.
The verdict comes from those checks and names the first layer that fails; the
end-to-end agreement is reported for information: once every layer has passed, it
measures how far ORT's fp32 accumulation drifts from the exact arithmetic.

A module without probes gets the end-to-end check alone: at least 99.9 % of
output codes identical and none off by more than one step.
"""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import numpy as np

__all__ = ["verify", "OutputAgreement", "VerifyReport", "ort_reference", "compare", "random_inputs"]

MIN_IDENTICAL = 0.999
MAX_STEPS = 1


@dataclass(frozen=True)
class OutputAgreement:
    name: str
    step: float
    identical: float  # fraction of codes identical
    max_steps: int  # largest code difference
    max_abs: float

    @property
    def ok(self) -> bool:
        return self.identical >= MIN_IDENTICAL and self.max_steps <= MAX_STEPS


@dataclass(frozen=True)
class VerifyReport:
    outputs: tuple[OutputAgreement, ...]  # end to end, module vs ORT
    layers: tuple = ()  # LayerCheck per kernel / kernel input / output (modules with probes)

    @property
    def layered(self) -> bool:
        return bool(self.layers)

    @property
    def ok(self) -> bool:
        if self.layered:
            return all(c.ok for c in self.layers)
        return all(o.ok for o in self.outputs)

    @property
    def first_failure(self):
        """The first failing layer check (file order), else None."""
        return next((c for c in self.layers if not c.ok), None)

    def __str__(self) -> str:
        lines = []
        if self.layered:
            kernels = [c for c in self.layers if c.what == "kernel"]
            glue = [c for c in self.layers if c.what != "kernel"]
            bad = [c for c in self.layers if not c.ok]
            lines.append(f"kernels: {sum(c.ok for c in kernels)} of {len(kernels)} exact against the file's "
                         "weights and zero points")
            lines.append(f"glue (teacher-forced, ORT): {sum(c.ok for c in glue)} of {len(glue)} tensors within "
                         "one code at fp32 near-ties")
            lines.extend(f"  {c}" for c in bad[:12])
            if len(bad) > 12:
                lines.append(f"  ... {len(bad) - 12} more")
        for o in self.outputs:
            mark = (" (ORT's fp32 accumulation against the exact arithmetic, layers checked above)"
                    if self.layered else f" -> {'OK' if o.ok else 'FAIL'}")
            lines.append(f"end to end {o.name}: {o.identical * 100:.3f}% codes identical, max {o.max_steps} "
                         f"step(s) (step {o.step:.3g}, max |diff| {o.max_abs:.3g}){mark}")
        first = self.first_failure
        if self.ok:
            lines.append("PASS")
        elif first is not None:
            lines.append(f"FAIL: first at {first.what} of layer {first.layer!r}"
                         + (f" ({first.detail})" if first.detail else ""))
        else:
            lines.append("FAIL")
        return "\n".join(lines)


def random_inputs(specs: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s["name"]: rng.standard_normal(s["shape"]).astype(s["dtype"]) for s in specs}


def ort_reference(model, inputs: dict) -> list[np.ndarray]:
    """Outputs of ONNX Runtime with graph optimisations disabled."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    data = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return sess.run(None, inputs)


def output_steps(model) -> dict[str, float]:
    """Scale of the DequantizeLinear producing each graph output, where one does."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    steps = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[1] in inits:
            s = inits[n.input[1]]
            if s.size == 1:
                steps[n.output[0]] = float(s.reshape(-1)[0])
    return {o.name: steps[o.name] for o in model.graph.output if o.name in steps}


def compare(name: str, ours: np.ndarray, ref: np.ndarray, step: float | None = None) -> OutputAgreement:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return OutputAgreement(name, float("nan"), 0.0, 1 << 30, float("inf"))
    if step is None:
        peak = float(np.abs(ref).max()) if ref.size else 0.0
        step = peak / 127 if peak > 0 else 1.0
    a, b = np.round(ours / step), np.round(ref / step)
    diff = np.abs(a - b)
    return OutputAgreement(name, float(step), float((diff == 0).mean()) if diff.size else 1.0,
                           int(diff.max()) if diff.size else 0, float(np.abs(ours - ref).max()) if diff.size else 0.0)


def verify(model, compiled=None, *, target="llvm", inputs: dict | None = None, seed: int = 0,
           layers: bool = True) -> VerifyReport:
    """Compare ``compiled`` (a CompiledModule, a saved-module path, or None to
    compile ``model`` for ``target``) with the ORT reference on ``inputs``
    (random normal inputs from ``seed`` when None). With probes in the module
    and ``layers`` (default), the verdict is the layer-by-layer check."""
    from .annotation import load_model
    from .artifact import CompiledModule, load

    from .qonnx_import import from_qonnx

    proto = from_qonnx(load_model(str(model)) if not hasattr(model, "graph") else model)  # QONNX: as compiled
    if compiled is None:
        from .compiler import compile as _compile

        compiled = _compile(proto, target)
    elif not isinstance(compiled, CompiledModule):
        compiled = load(compiled)
    if inputs is None:
        inputs = random_inputs(compiled.inputs, seed)
    ref = ort_reference(proto, inputs)
    steps = output_steps(proto)
    names = [o["name"] for o in compiled.outputs]
    if not (layers and compiled.has_probes):
        ours = compiled.run(inputs)
        return VerifyReport(tuple(compare(n, o, r, steps.get(n)) for n, o, r in zip(names, ours, ref)))
    from .layercheck import act_checks, file_layers, forced_layers, glue_checks, kernel_checks
    from .qoperator import to_qdq
    from .survey import survey

    ours, probes = compiled.probe(inputs)
    qdq = to_qdq(proto)  # QOperator files: the layers as the compiler reads them
    file = file_layers(qdq)
    checks, layer_inputs, totals = kernel_checks(file, probes)
    acts, forced_acts = act_checks(qdq, [p for p in probes if p[0].get("kind") == "act-matmul"])
    forced = forced_layers(file, layer_inputs, totals)
    forced.values.update(forced_acts.values)
    for k, v in forced_acts.codes.items():
        forced.codes.setdefault(k, v)
    checks += acts + glue_checks(qdq, forced, inputs, ours, steps)
    order = {s.name: i for i, s in enumerate(survey(qdq))}

    def rank(c):
        base = c.layer.split("[g")[0]
        return (order.get(base, len(order)), 0 if c.what == "glue" else 1)

    end_to_end = tuple(compare(n, o, r, steps.get(n)) for n, o, r in zip(names, ours, ref))
    return VerifyReport(end_to_end, tuple(sorted(checks, key=rank)))


class _CallableModule(types.ModuleType):
    """``soniq_tvm.verify`` names both this module and its function: importing the
    module (``from soniq_tvm.verify import ...``) makes the package attribute the
    module, so calling ``soniq_tvm.verify(...)`` must still verify."""

    def __call__(self, *args, **kwargs):
        return verify(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
