"""``compile()`` and ``inspect()``: an annotated ONNX file in, a module out.

The flow is ONNX file -> annotations -> Relax -> passes (``passes/pipeline.py``)
-> ``tvm.compile`` -> :class:`~soniq_tvm.artifact.CompiledModule`. This module
does the ONNX-side work (reading, validating, naming layers, input/output
signatures) and assembles the precision plan; the passes do the rest.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections import defaultdict

import numpy as np

from . import hardware
from .artifact import CompiledModule
from .errors import InputError, SoniqError, UnsupportedModelError
from .plan import GroupPlan, LayerPlan, Plan
from .targets import describe, parse_target, required_features, to_tvm_target

__all__ = ["compile", "inspect", "prepare", "FloatLayerWarning"]

_INT_OPS = ("Conv", "MatMul", "Gemm")


def _model(model):
    from .annotation import load_model

    if isinstance(model, (str, os.PathLike)):
        return load_model(str(model)), str(model)
    return model, "<ModelProto>"


def _node_names(graph) -> dict[int, str]:
    from .naming import node_label

    return {i: node_label(n, i) for i, n in enumerate(graph.node)}


def _weight_infos(model) -> dict:
    """Weight tensor name -> WeightInfo for every weight DequantizeLinear."""
    from soniq_tvm.passes.fold_qdq import WeightInfo

    from .annotation import read_annotations

    anns = read_annotations(model)
    names = _node_names(model.graph)
    consumers = defaultdict(list)
    for i, n in enumerate(model.graph.node):
        for t in n.input:
            consumers[t].append(i)
    infos = {}
    for ann in anns.values():
        if ann.kind != "weight":
            continue
        layer, frontier = None, [ann.name]
        for _hop in range(3):  # DQ -> [Transpose] -> Conv/MatMul/Gemm
            nxt = [i for t in frontier for i in consumers.get(t, [])]
            hit = [i for i in nxt if model.graph.node[i].op_type in _INT_OPS]
            if hit:
                layer = names[hit[0]]
                break
            frontier = [o for i in nxt for o in model.graph.node[i].output]
        infos[ann.input] = WeightInfo(node=layer or ann.node, bits=tuple(ann.bits), axis=ann.axis,
                                      signed=ann.signed)
    return infos


def _without_initializer_inputs(model):
    """``model`` without the graph inputs that are also initializers (the export style
    of ONNX IR < 4, still Brevitas's): they are constants to us, and TVM's importer
    would make two parameters of one name of each."""
    inits = {i.name for i in model.graph.initializer}
    if not any(vi.name in inits for vi in model.graph.input):
        return model
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [vi for vi in out.graph.input if vi.name not in inits]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    return out


def _signature(model, shapes: dict | None) -> tuple[list, list]:
    inits = {i.name for i in model.graph.initializer}
    ins, outs = [], []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = []
        for k, d in enumerate(tt.shape.dim):
            if shapes and vi.name in shapes:
                dims = [int(v) for v in shapes[vi.name]]
                break
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                raise UnsupportedModelError(
                    f"dimension {k} is dynamic ({d.dim_param or '?'}); the compiler needs static shapes",
                    tensor=vi.name, hint=f"pass shapes={{'{vi.name}': [...]}} (CLI: --shape {vi.name}=1,3,224,224)")
        ins.append({"name": vi.name, "shape": dims, "dtype": _dtype_name(model, vi)})
    for vi in model.graph.output:
        tt = vi.type.tensor_type
        outs.append({"name": vi.name, "dtype": _dtype_name(model, vi),
                     "shape": [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]})
    return ins, outs


def _dtype_name(model, vi) -> str:
    """numpy dtype name of a graph input/output (its declared type, else the
    inferred one); a typed error when neither is known."""
    from onnx import helper, shape_inference

    t = vi.type.tensor_type.elem_type
    if not t:
        try:
            inferred = shape_inference.infer_shapes(model)
            t = next((v.type.tensor_type.elem_type for v in list(inferred.graph.value_info)
                      + list(inferred.graph.output) if v.name == vi.name), 0)
        except Exception:  # noqa: BLE001 - inference is best effort
            t = 0
    try:
        return str(np.dtype(helper.tensor_dtype_to_np_dtype(t)))
    except (KeyError, TypeError):
        raise UnsupportedModelError("has no element type the compiler can use", tensor=vi.name,
                                    hint="declare the type of every graph input and output") from None


def _check_ops(model) -> None:
    """Fail early, naming the node, on operators TVM's importer does not know."""
    from . import tvm_shim

    known = tvm_shim.onnx_supported_ops()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    for i, n in enumerate(model.graph.node):
        if n.domain not in ("", "ai.onnx") or n.op_type not in known:
            raise UnsupportedModelError(
                f"operator {n.op_type!r} (domain {n.domain or 'ai.onnx'}, opset {opset}) is not supported",
                node=n.name or f"{n.op_type}_{i}",
                hint="convert it to standard ONNX ops (QOperator models: export as QDQ)")


SPLIT_MODES = ("auto", "always")


def prepare(model, target="llvm", *, shapes=None, family=None, dump_ir=None, stop_after=None, tuned=None,
            split="auto"):
    """Run the passes; returns ``(pipeline result, target dict, model, inputs, outputs)``.
    ``tuned``: a :class:`soniq_tvm.tuning.TunedSchedules`; ``split``: see :func:`compile`."""
    return _prepare(model, parse_target(target), shapes=shapes, family=family, dump_ir=dump_ir,
                    stop_after=stop_after, tuned=tuned, split=split)


def _prepare(model, tgt: dict, *, shapes=None, family=None, dump_ir=None, stop_after=None, tuned=None,
             split="auto", probes=False, memory_limit=None, lift=False):
    """:func:`prepare` for a target already parsed (``tgt``: a target dict)."""
    if split not in SPLIT_MODES:
        raise InputError(f"split={split!r} is not one of {', '.join(SPLIT_MODES)}",
                         hint="'auto' splits where a narrow kernel is faster, 'always' splits every mixed layer")
    from soniq_tvm.passes.pipeline import run_pipeline

    from .annotation import to_int8_initializers
    from .naming import canonical_names

    from .qonnx_import import from_qonnx
    from .qoperator import to_qdq
    from .resources import check_inputs

    model, source = _model(model)
    model = to_qdq(from_qonnx(model))  # QONNX Quant, QOperator / integer ops, sub-byte and blocked Q/DQ -> plain QDQ
    model = _without_initializer_inputs(model)
    infos = _weight_infos(model)
    ins, outs = _signature(model, shapes)
    check_inputs(ins, memory_limit)
    _check_ops(model)
    # one renaming for the importer: every initializer gets a safe, unique name,
    # and the weight annotations follow it (torch.onnx.export's "onnx::" names)
    widened, names = canonical_names(to_int8_initializers(model))
    infos = {names.get(k, k): v for k, v in infos.items()}
    shape_dict = {i["name"]: i["shape"] for i in ins}
    try:
        result = run_pipeline(widened, infos, to_tvm_target(tgt), shapes=shape_dict, family=family,
                              dump_dir=dump_ir, stop_after=stop_after, tuned=tuned, split=split, probes=probes,
                              lift=lift)
    except SoniqError:
        raise
    except Exception as e:  # noqa: BLE001  (importer errors are untyped)
        first = str(e).strip().splitlines()
        raise UnsupportedModelError(f"TVM could not import or lower the model: {first[-1] if first else e}",
                                    file=source) from e
    return result, tgt, model, ins, outs


class FloatLayerWarning(UserWarning):
    """A conv/matmul the file quantizes runs in float in the compiled module."""


def build_plan(result, tgt: dict, model=None) -> Plan:
    """The plan of a pipeline result. With the ONNX ``model``, every Conv / MatMul /
    Gemm of the file is listed, float ones with the reason, and a quantized op
    left float is warned about (:class:`FloatLayerWarning`) by name."""
    from soniq_tvm.passes._common import safe_name
    from soniq_tvm.passes.pipeline import _soniq_layers, act_kernels

    groups = defaultdict(list)
    for op in _soniq_layers(result.mod):
        groups[op.layer].append(op)
    folded = {}
    for whole, steps in _whole_layers(result.layers):
        safe = safe_name(whole.layer)
        gps = tuple(
            GroupPlan(index=max(op.group, 0), w_bits=op.w_bit, a_bits=op.a_bit, in_channels=op.in_channels,
                      out_channels=op.out_channels, family=op.family, macs=op.macs,
                      bytes_int8=op.weight_bytes_int8, bytes_packed=op.packed_bytes)
            for op in sorted(groups.get(whole.layer, []), key=lambda o: o.group))
        folded[whole.layer] = LayerPlan(name=whole.layer, kind=whole.kind, w_axis=whole.w_axis,
                                        w_bits=whole.w_bits, a_bits=whole.a_bits, groups=gps,
                                        gathers=result.gathers.get(safe, 0), scale_groups=steps)
    layers = _every_layer(folded, result.declined, model)
    notes = []
    whole = [l.name for l in layers if len(l.groups) == 1 and (len(set(l.w_bits)) > 1 or len(set(l.a_bits)) > 1)]
    if whole:
        notes.append(f"{len(whole)} mixed-precision layer(s) run whole at their widest width, no faster split "
                     f"on this target (split='always' forces it): {', '.join(whole[:4])}"
                     + (", ..." if len(whole) > 4 else ""))
    if result.gathers_after_split:
        total = sum(result.gathers_after_split.values())
        inside = total - result.gathers_folded - sum(result.gathers.values())
        notes.append(f"{result.gathers_folded} of {total} channel permutations folded into producers"
                     + (f", {inside} into scale-group kernels' re-layout" if inside else ""))
    if result.fused:
        notes.append(f"{result.fused} conv/matmul layer(s) run their activation scale groups in one kernel (a float "
                     "sum of the groups' exact int32 results, no int32 tensor per group)")
    acts = act_kernels(result.mod)
    if acts:
        kinds = ", ".join(sorted({a.split()[0] for a in acts}))
        notes.append(f"{len(acts)} activation x activation matmul(s) (attention) on the {kinds} dot-product kernel")
    stored = result.weights.stored_bytes if result.weights is not None else 0
    return Plan(layers=tuple(layers), target=describe(tgt), notes=tuple(notes), bytes_stored=stored)


def _whole_layers(ops) -> list:
    """``(QOp, scale groups)`` per layer, in first-seen order: a layer the fold cut
    into activation scale groups (ops with ``in_index``) gets its widths back in
    the file's channel order."""
    by_layer = {}
    for op in ops:
        by_layer.setdefault(op.layer, []).append(op)
    out = []
    for parts in by_layer.values():
        if len(parts) == 1:
            out.append((parts[0], 1))
            continue
        cin = sum(len(p.in_index) for p in parts)
        a_bits, w_in = [0] * cin, [0] * cin
        for p in parts:
            for j, c in enumerate(p.in_index):
                a_bits[c] = p.a_bits[j]
                if p.w_axis == "in":
                    w_in[c] = p.w_bits[j]
        first = parts[0]
        out.append((first.with_(a_bits=tuple(a_bits), in_index=(), group=-1,
                                w_bits=tuple(w_in) if first.w_axis == "in" else first.w_bits), len(parts)))
    return out


def _every_layer(folded: dict, declined: dict, model) -> list:
    """The folded layers and, in file order, every conv/matmul that was not."""
    if model is None:
        return list(folded.values())
    import warnings

    from .survey import survey

    layers, left_float, acts = [], [], 0
    for s in survey(model):
        if s.name in folded:
            layers.append(folded.pop(s.name))
            continue
        kind = "conv2d" if s.op_type == "Conv" else "matmul"
        if s.status == "act-act":
            acts += 1
            reason = declined.get(f"#act{acts - 1}")  # passes.fold_qdq.ACT_KEY
            if reason is not None:
                left_float.append(f"{s.name} ({reason})")
                layers.append(LayerPlan(name=s.name, kind="matmul", w_axis="", w_bits=(), a_bits=(), groups=(),
                                        reason=reason))
                continue
            layers.append(LayerPlan(name=s.name, kind="act-matmul", w_axis="", w_bits=(), a_bits=(), groups=(),
                                    reason=""))
            continue
        reason = s.reason
        if s.status == "quantized":
            reason = declined.get(s.name, "quantized in the file, but no integer pattern matched")
            left_float.append(f"{s.name} ({reason})")
        layers.append(LayerPlan(name=s.name, kind=kind, w_axis="", w_bits=(), a_bits=(), groups=(),
                                reason=reason))
    layers.extend(folded.values())  # none expected: every folded layer is a node of the file
    if left_float:
        warnings.warn(f"{len(left_float)} quantized conv/matmul layer(s) run in float: "
                      + "; ".join(left_float[:6]) + ("; ..." if len(left_float) > 6 else ""),
                      FloatLayerWarning, stacklevel=3)
    return layers


def _tuned(database, tgt: dict, strict: bool):
    """The records of a tuning database that fit the parsed target ``tgt`` (None:
    no database)."""
    if database is None:
        return None
    from .tuning.apply import TunedSchedules

    return TunedSchedules(database, tgt, strict=strict)


def inspect(model, target="llvm", *, shapes=None, family=None, database=None, strict=False,
            split="auto") -> Plan:
    """The precision plan of ``model`` on ``target`` (runs the passes, builds nothing).
    ``database``/``strict``/``split``: as for :func:`compile`."""
    tgt = parse_target(target)
    tuned = _tuned(database, tgt, strict)
    result, tgt, proto, *_ = _prepare(model, tgt, shapes=shapes, family=family, tuned=tuned, split=split, lift=True)
    plan = build_plan(result, tgt, proto)
    if tuned is not None:
        tuned.check()
        plan = dataclasses.replace(plan, notes=plan.notes + tuned.notes())
    return plan


def compile(model, target="llvm", *, shapes=None, family=None, dump_ir=None, database=None,  # noqa: A001
            strict=False, split="auto", probes=True, memory_limit=None) -> CompiledModule:
    """Compile an annotated ONNX model (path or ModelProto) for ``target``.

    ``target``: a legacy string (``"llvm -mcpu=skylake-avx512"``), a dict, or a
    ``tvm.target.Target``; ``"llvm"`` is this host. ``shapes`` fixes dynamic input
    shapes; ``family`` forces one kernel family for every group (testing);
    ``dump_ir`` writes the IR after each pass into that directory.
    ``split``: ``"auto"`` (default) splits a mixed-precision layer into channel
    groups only where the cost model says a narrow-width kernel makes it faster,
    and otherwise runs it whole at its widest width (same results, exact either
    way; weights then stay int8); ``"always"`` splits every mixed layer, e.g. to
    keep weights packed at their real width. The plan's notes count the layers
    kept whole.
    ``database``: a tuning database file (``soniq_tvm.tune``); the schedules tuned
    for this target's fingerprint are used, records for other targets are
    skipped with a :class:`~soniq_tvm.tuning.TuningWarning` saying which and why
    (``strict=True``: a :class:`TuningDatabaseError` instead). What was applied and
    skipped is in the plan's notes and ``manifest["tuning"]``.
    ``probes`` (default on): the module also gets a ``soniq_probe`` entry point
    returning every integer kernel's input codes and result, with which
    :func:`soniq_tvm.verify` checks it layer by layer; ``main`` is the same
    either way.
    ``memory_limit`` (bytes, or ``"8G"``-style): a model whose constants and tensors
    alive at once would need more is refused with a :class:`ResourceLimitError`
    before anything is built (default: ``SONIQ_MEMORY_LIMIT``, else this machine's
    memory); the figures are in ``manifest["memory"]``.
    """
    import tvm

    from .resources import check as check_memory

    t0 = time.time()
    tgt = parse_target(target)  # parsed once; everything below takes the dict
    tuned = _tuned(database, tgt, strict)
    result, tgt, model, ins, outs = _prepare(model, tgt, shapes=shapes, family=family, dump_ir=dump_ir,
                                             tuned=tuned, split=split, probes=probes, memory_limit=memory_limit,
                                             lift=True)
    if tuned is not None:
        tuned.check()
    memory = check_memory(result.mod, memory_limit)
    from soniq_tvm.passes.pipeline import build_pipeline

    tvm_target = to_tvm_target(tgt)
    try:
        executable = tvm.compile(result.mod, target=tvm_target, relax_pipeline=build_pipeline(tvm_target, tuned))
    except Exception as e:  # noqa: BLE001
        lines = str(e).strip().splitlines()
        raise UnsupportedModelError(f"building for {describe(tgt)} failed: {lines[-1] if lines else e}") from e
    plan = build_plan(result, tgt, model)
    if tuned is not None:
        tuned.check()
        plan = dataclasses.replace(plan, notes=plan.notes + tuned.notes())
    manifest = {
        "inputs": ins,
        "outputs": outs,
        "target": tgt,
        "arch": hardware.target_arch(tgt) if tgt["kind"] == "llvm" else hardware.host_arch(),
        "required_features": required_features(tgt),
        "plan": plan.to_dict(),
        "compile_seconds": round(time.time() - t0, 3),
        "memory": {"constants_bytes": memory["weights"], "workspace_bytes": memory["workspace"]},
    }
    if probes:
        manifest["probes"] = result.probes
    if tuned is not None:
        manifest["tuning"] = tuned.report()
    return CompiledModule(executable, manifest, executable=executable, weights=result.weights)
