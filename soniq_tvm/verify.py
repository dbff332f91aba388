"""Check a compiled module against ONNX Runtime running the same annotated file.

The reference is ORT with every graph optimisation disabled (``ORT_DISABLE_ALL``):
it executes the QDQ graph as written, i.e. fake-quant in float. Its optimised
levels fuse QDQ into int8 kernels that saturate in int16 on AVX2, so they are a
speed peer, not the reference.

Outputs are compared in *quantisation steps*: an output produced by a
DequantizeLinear uses that node's scale; a float output uses its 8-bit
resolution, ``max|reference| / 127``. The criterion: at least 99.9 % of output
codes identical and none off by more than one step (float accumulation may flip
a rounding tie in an intermediate activation).
"""
from __future__ import annotations

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
    outputs: tuple[OutputAgreement, ...]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    def __str__(self) -> str:
        lines = []
        for o in self.outputs:
            lines.append(f"{o.name}: {o.identical * 100:.3f}% codes identical, max {o.max_steps} step(s) "
                         f"(step {o.step:.3g}, max |diff| {o.max_abs:.3g}) -> {'OK' if o.ok else 'FAIL'}")
        lines.append("PASS" if self.ok else "FAIL")
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


def verify(model, compiled=None, *, target="llvm", inputs: dict | None = None, seed: int = 0) -> VerifyReport:
    """Compare ``compiled`` (a CompiledModule, a saved-module path, or None to
    compile ``model`` for ``target``) with the ORT reference on ``inputs``
    (random normal inputs from ``seed`` when None)."""
    from .annotation import load_model
    from .artifact import CompiledModule, load

    proto = load_model(str(model)) if not hasattr(model, "graph") else model
    if compiled is None:
        from .compiler import compile as _compile

        compiled = _compile(proto, target)
    elif not isinstance(compiled, CompiledModule):
        compiled = load(compiled)
    if inputs is None:
        inputs = random_inputs(compiled.inputs, seed)
    ours = compiled.run(inputs)
    ref = ort_reference(proto, inputs)
    steps = output_steps(proto)
    names = [o["name"] for o in compiled.outputs]
    return VerifyReport(tuple(compare(n, o, r, steps.get(n)) for n, o, r in zip(names, ours, ref)))
