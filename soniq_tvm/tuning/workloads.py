"""What there is to tune in a model, and the keys that name it in the database.

Two kinds of workload:

* **qop**: an integer kernel (one uniform channel group), identified by its
  :class:`~soniq_tvm.qop.QOp` without the fields that do not change what is
  computed (layer and group names, the family that happens to be chosen, its
  knobs, the packed size). Two layers with the same shapes and widths share one
  workload; its weight is how many kernels of the model it stands for. Its
  candidates are (family, knobs) pairs.
* **ms**: every other PrimFunc after TVM's CPU legalisation and fusion (the same
  passes :func:`soniq_tvm.passes.pipeline.build_pipeline` runs), named by its
  structural hash as MetaSchedule names it; weight = calls in the model.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["KnobTask", "MSTask", "qop_key", "qop_body", "ms_key", "extract", "legalize"]

# QOp fields that do not change the computation (a deny-list: a new field counts
# as significant until listed here, so a record never fits a kernel it was not
# measured for).
_NOT_KEYED = ("layer", "group", "family", "knobs", "packed_bytes", "in_index", "out_index")


def qop_body(op) -> dict:
    body = {k: v for k, v in op.to_dict().items() if k not in _NOT_KEYED}
    if not body.get("a_zero"):
        body.pop("a_zero", None)  # keys from before zero points existed stay valid
    return body


def qop_key(op) -> str:
    text = json.dumps(qop_body(op), sort_keys=True, separators=(",", ":"))
    return "qop:" + hashlib.sha256(text.encode()).hexdigest()[:24]


def _normalized(func):
    """A PrimFunc as MetaSchedule sees a task: alone in a module, named main."""
    import tvm

    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def ms_key(func_or_mod) -> str:
    import tvm
    import tvm_ffi

    mod = func_or_mod if isinstance(func_or_mod, tvm.IRModule) else _normalized(func_or_mod)
    return f"ms:{tvm_ffi.structural_hash(mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def is_tunable_primfunc(func) -> bool:
    """A PrimFunc MetaSchedule may schedule: not one of our kernels, not already scheduled."""
    attrs = func.attrs or {}
    return "soniq.qop" not in attrs and not bool(attrs.get("tirx.is_scheduled", False))


@dataclass
class KnobTask:
    key: str
    op: object  # QOp as PackWeights sees it (family int8-ref, no knobs)
    weight: int
    layers: list = field(default_factory=list)  # "layer[gN]" of every kernel it stands for
    default_family: str = ""

    @property
    def name(self) -> str:
        op = self.op
        shape = "x".join(map(str, op.x_shape))
        return f"{op.kind} {shape} w{op.w_bit}a{op.a_bit} ({', '.join(self.layers[:3])}{'...' if len(self.layers) > 3 else ''})"

    @property
    def size(self) -> float:
        return float(self.op.macs) * self.weight


@dataclass
class MSTask:
    key: str
    name: str
    mod: object  # IRModule with one PrimFunc "main"
    weight: int
    size: float = 0.0  # bytes touched (+ FLOPs when TVM can estimate them), times weight


def legalize(mod, target):
    """The legalisation + fusion stages of our build pipeline (dispatch, legalize)."""
    from .. import tvm_shim as tv

    with target:
        dispatch, legal, _lower, _finalize = tv.cpu_pipeline_stages(target)
        # a new module: module passes may update the one they are given in place
        return tv.tvm.transform.Sequential(dispatch + legal)(tv.tvm.IRModule(dict(mod.functions), attrs=mod.attrs,
                                                                            global_infos=mod.global_infos))


def _bytes_of(func) -> float:
    import numpy as np
    from tvm.s_tir import meta_schedule as ms

    total = 0.0
    for info in ms.arg_info.ArgInfo.from_prim_func(func):
        try:
            n = int(np.prod([int(d) for d in info.shape]))
            total += n * max(1, np.dtype(str(info.dtype)).itemsize)
        except (TypeError, ValueError):  # symbolic shape or a dtype numpy lacks
            continue
    return total


def _size(mod) -> float:
    func = mod["main"]
    size = _bytes_of(func)
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        size = max(size, float(estimate_tir_flops(mod)))
    except Exception:  # noqa: BLE001  (the estimator does not know every node)
        pass
    return size


def extract(result, target, *, with_ms: bool = True) -> tuple[list[KnobTask], list[MSTask]]:
    """Tasks of a pipeline result (``compiler.prepare``'s first value) on ``target``
    (a ``tvm.target.Target``): integer kernels and, if ``with_ms``, MetaSchedule tasks."""
    from ..passes.pipeline import _soniq_layers

    knob: dict[str, KnobTask] = {}
    for op in _soniq_layers(result.mod):
        base = op.with_(family="int8-ref", knobs={}, packed_bytes=0)
        key = qop_key(base)
        t = knob.get(key)
        if t is None:
            t = knob[key] = KnobTask(key, base, 0, default_family=op.family)
        t.weight += 1
        t.layers.append(op.layer + ("" if op.group < 0 else f"[g{op.group}]"))
    ms_tasks: list[MSTask] = []
    if with_ms and target.kind.name == "llvm":
        ms_tasks = _ms_tasks(legalize(result.mod, target))
    knob_tasks = sorted(knob.values(), key=lambda t: -t.size)
    return knob_tasks, ms_tasks


def _ms_tasks(legal) -> list[MSTask]:
    from .. import tvm_shim as tv

    calls = Counter()

    def visit(expr):
        if isinstance(expr, tv.relax.Call) and expr.op == tv.op("call_tir"):
            calls[expr.args[0].name_hint] += 1

    for _gv, func in legal.functions.items():
        if isinstance(func, tv.relax.Function):
            tv.relax.analysis.post_order_visit(func.body, visit)
    tasks: dict[str, MSTask] = {}
    for gv, func in legal.functions.items():
        if not isinstance(func, tv.PrimFunc) or not is_tunable_primfunc(func):
            continue
        mod = _normalized(func)
        key = ms_key(mod)
        t = tasks.get(key)
        if t is None:
            t = tasks[key] = MSTask(key, gv.name_hint, mod, 0, _size(mod))
        t.weight += max(1, calls.get(gv.name_hint, 0))
    return sorted(tasks.values(), key=lambda t: -t.size * t.weight)
