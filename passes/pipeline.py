"""The whole compilation flow in one place, phase by phase.

    0  import       ONNX -> Relax (TVM's importer; weights stay named parameters)
    1  canonicalize n-ary Max/Min -> maximum/minimum            (canonicalize_minmax)
    2  fold QDQ     conv/matmul on dequantized ints -> int32 kernels + rescale (fold_qdq)
    3  bind         remaining parameters become constants; dead code goes
    4  split        mixed-precision ops -> uniform channel groups (split_groups)
    5  permute      channel gathers folded into their producers  (fold_permutations)
    6  pack         a kernel family per group, weights packed     (pack_weights)
    7  act_matmul   activation x activation matmuls onto dot-product kernels (lower_act_matmul)
    8  pool_codes   quantize(max_pool(x)) -> max_pool(quantize(x)): pool the codes (quantize_before_pool)
    9  cleanup      dead code elimination
   10  fuse_groups  a matmul's activation scale groups in one kernel (fuse_scale_groups)
   11  probes       (optional) ``soniq_probe``: main plus every kernel's input and result (add_probes)
   12  lift         (optional) kernel weights -> parameters of main, stored at their real widths (lift_weights)

``dump_dir`` writes the IR after every phase (``NN-name.py``), so anyone can see,
diff and reorder the flow. Building (``tvm.compile``) is the caller's step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from soniq_tvm import tvm_shim as tv

from .add_probes import PROBE_FUNC, add_probes
from .canonicalize_minmax import CanonicalizeMinMax
from .fold_permutations import FoldPermutations, count_gathers
from .fold_qdq import FoldQDQ, WeightInfo
from .fuse_scale_groups import FuseScaleGroups, count_fused
from .lift_weights import lift_weights
from .lower_act_matmul import LowerActMatmul
from .pack_weights import PackWeights
from .quantize_before_pool import QuantizeBeforePool
from .split_groups import SplitChannelGroups

__all__ = ["run_pipeline", "PipelineResult", "WeightInfo", "import_onnx", "PHASES"]

PHASES = ("import", "canonicalize", "fold_qdq", "bind", "split", "permute", "pack", "act_matmul", "pool_codes",
          "cleanup", "fuse_groups", "probes")


@dataclass
class PipelineResult:
    mod: object  # tvm.IRModule, ready for tvm.compile
    layers: list = field(default_factory=list)  # whole-layer QOps after folding
    gathers_after_split: dict = field(default_factory=dict)
    gathers: dict = field(default_factory=dict)  # run-time gathers left, per layer
    gathers_folded: int = 0  # of gathers_after_split, folded into producers (phase 5)
    declined: dict = field(default_factory=dict)  # layer -> why its quantized op stayed float
    probes: list = field(default_factory=list)  # QOp dicts of soniq_probe's kernel calls (phase 11)
    fused: int = 0  # conv/matmul layers whose scale groups run in one kernel (phase 10)
    weights: object = None  # soniq_tvm.weights.WeightStore of the lifted parameters (phase 12)


def import_onnx(model, shapes: dict | None = None):
    """Phase 0: (module with named parameters, {parameter name: numpy value})."""
    mod = tv.from_onnx(model, shape_dict=shapes, keep_params_in_input=True)
    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    names = [tv.var_name(p) for p in func.params[num_input:]]
    values = [t.numpy() for t in func.attrs["params"]] if "params" in func.attrs else []
    mod, _ = tv.relax.frontend.detach_params(mod)
    return mod, dict(zip(names, values))


def _dump(dump_dir, index: int, name: str, mod) -> None:
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        with open(os.path.join(dump_dir, f"{index:02d}-{name}.py"), "w") as f:
            f.write(mod.script())


def _soniq_layers(mod) -> list:
    """The QOp of every integer kernel ``main`` calls (a scale-group kernel: each group's)."""
    from ._common import soniq_call
    from .fuse_scale_groups import group_ops

    found = []

    def visit(expr):
        hit = soniq_call(expr, mod)
        if hit is not None:
            found.append(hit[0])
        found.extend(group_ops(expr, mod))

    for gv, func in mod.functions.items():
        if isinstance(func, tv.relax.Function) and gv.name_hint != PROBE_FUNC:  # the probe repeats main
            tv.relax.analysis.post_order_visit(func.body, visit)
    return found


def act_kernels(mod) -> list[str]:
    """One entry per call of an activation x activation kernel (phase 7): the
    kernel's description, e.g. ``"avx512-vnni R12 J2"``."""
    from ._common import CALL_TIR
    from .lower_act_matmul import ACT_ATTR

    found = []

    def visit(expr):
        if isinstance(expr, tv.relax.Call) and expr.op == CALL_TIR:
            func = mod.functions.get(expr.args[0]) if hasattr(mod.functions, "get") else None
            text = tv.prim_func_attr(func, ACT_ATTR) if isinstance(func, tv.PrimFunc) else None
            if text is not None:
                found.append(str(text))

    for gv, func in mod.functions.items():
        if isinstance(func, tv.relax.Function) and gv.name_hint != PROBE_FUNC:  # the probe repeats main
            tv.relax.analysis.post_order_visit(func.body, visit)
    return found


def run_pipeline(model, weights: dict[str, WeightInfo], target, *, shapes=None, family: str | None = None,
                 dump_dir: str | None = None, stop_after: str | None = None, tuned=None,
                 split: str = "auto", probes: bool = False, lift: bool = False) -> PipelineResult:
    """Run phases 0-12 on an ONNX ModelProto (int4 initializers already widened),
    or up to and including ``stop_after`` (one of :data:`PHASES`). ``tuned``: a
    :class:`soniq_tvm.tuning.TunedSchedules`; the pack phase takes its
    (family, knobs) for the kernels it has records of. ``split``: "auto" keeps a
    mixed layer whole where splitting is not faster (never with a forced family),
    "always" splits every mixed layer. ``probes``: add the ``soniq_probe`` entry
    point (phase 11) for verifying the built module layer by layer. ``lift``:
    the kernels' weights become parameters of ``main`` (phase 12), in
    ``result.weights``, for a module that stores them at their real widths."""
    assert stop_after is None or stop_after in PHASES, stop_after
    mod, params = import_onnx(model, shapes)
    _dump(dump_dir, 0, "import", mod)
    result = PipelineResult(mod=mod)
    if stop_after == "import":
        return result
    steps = [
        ("canonicalize", CanonicalizeMinMax),
        ("fold_qdq", FoldQDQ(params, weights, target, result.declined)),
        ("bind", tv.tvm.transform.Sequential([
            tv.relax.transform.BindParams("main", params),
            tv.relax.transform.FoldConstant(),
            tv.relax.transform.DeadCodeElimination(),
        ])),
        ("split", tv.tvm.transform.Sequential([SplitChannelGroups(target, merge=family is None and split == "auto"),
                                               tv.relax.transform.CanonicalizeBindings()])),
        ("permute", FoldPermutations),
        ("pack", PackWeights(target, force=family, knobs_for=tuned.knobs_for if tuned is not None else None)),
        ("act_matmul", LowerActMatmul(target, force=family)),
        ("pool_codes", QuantizeBeforePool),
        ("cleanup", tv.relax.transform.DeadCodeElimination()),
        ("fuse_groups", tv.tvm.transform.Sequential([FuseScaleGroups(target, force=family),
                                                     tv.relax.transform.DeadCodeElimination()])),
    ]
    for i, (name, p) in enumerate(steps, start=1):
        mod = p(mod)
        _dump(dump_dir, i, name, mod)
        if name == "fold_qdq":
            result.layers = _soniq_layers(mod)
        elif name == "split":
            result.gathers_after_split = count_gathers(mod)
        elif name == "permute":
            result.gathers = count_gathers(mod)
            result.gathers_folded = sum(result.gathers_after_split.values()) - sum(result.gathers.values())
        elif name == "fuse_groups":  # a scale-group kernel gathers in its re-layout
            result.gathers = count_gathers(mod)
        result.mod = mod
        if name == stop_after:
            return result
    result.fused = count_fused(result.mod)
    if probes:
        result.mod, result.probes = add_probes(result.mod)
        _dump(dump_dir, len(steps) + 1, "probes", result.mod)
    if lift:
        result.mod, result.weights = lift_weights(result.mod)
        _dump(dump_dir, len(steps) + 2, "lift", result.mod)
    return result


def build_pipeline(target, tuned=None):
    """The Relax pipeline ``tvm.compile`` runs on our module: TVM's default, plus,
    on CPUs, default schedules for every PrimFunc that is not one of our kernels
    (TVM 0.27 schedules nothing on CPU by itself). Returns a pass, or "default".
    ``tuned`` (a :class:`soniq_tvm.tuning.TunedSchedules`): its MetaSchedule
    records are applied after legalisation, before the default schedules."""
    if target.kind.name != "llvm":
        return "default"
    from soniq_tvm.schedules.cpu.generic import default_rules

    @tv.tvm.transform.module_pass(opt_level=0, name="soniq.BuildPipeline")
    def _build(mod, _ctx):
        with target:
            dispatch, legalize, lower, finalize = tv.cpu_pipeline_stages(target)
            schedule = [tv.dlight.ApplyDefaultSchedule(*default_rules())]
            if tuned is not None and tuned.has_ms:
                schedule.insert(0, tuned.schedule_pass())
            return tv.tvm.transform.Sequential(dispatch + legalize + schedule + lower + finalize)(mod)

    return _build
