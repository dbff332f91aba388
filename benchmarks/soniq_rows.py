"""The soniq-tvm rows of the benchmark table: one per mixed-precision variant.

``soniq_variants(model_name, ctx)`` returns one :class:`~benchmarks.table.Row` per
entry of :data:`VARIANTS`. It never raises: when ``soniq_tvm.compile`` is missing,
or annotating, compiling or running a variant fails, that row is ``n/a`` and its
note gives the reason.

Each variant goes through three steps:

1. :func:`annotate` writes a ``soniq-qdq/1`` file (shared/ANNOTATION_FORMAT.md)
   from the benchmark's PyTorch module through ``soniq_tvm.torch`` (prepare, fix
   the per-channel bits, calibrate, export): in every layer the variant's
   fraction of channels at the palette's low width, the rest at its high width.
   **This is the only code that depends on the soniq-tvm PyTorch API.**
2. ``soniq_tvm.compile(path, target=<host llvm target>)``, timed by the same
   harness as the peers through ``CompiledModule.run``.
3. Agreement against ONNX Runtime with graph optimizations off on the same
   annotated file, which is the format's reference semantics.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import peers
from .table import Row, failure
from .timing import measure, settle


@dataclasses.dataclass(frozen=True)
class SoniqVariant:
    """A precision mix: in every layer, ``low_fraction`` of the channels at ``palette[0]``,
    the rest at ``palette[1]``; activation steps laid out per ``steps`` ("group": one per
    width, the QAT's default; "tensor"; "channel": calibrated per channel). ``models``:
    the benchmark models the variant runs on (empty: all)."""

    name: str
    palette: tuple[int, int]
    low_fraction: float
    steps: str = "group"
    models: tuple[str, ...] = ()


VARIANTS = (
    SoniqVariant("soniq {2,8} 75% low", (2, 8), 0.75),
    SoniqVariant("soniq {2,8} 75% low, steps/tensor", (2, 8), 0.75, "tensor", ("resnet18", "bert")),
    SoniqVariant("soniq {2,8} 75% low, steps/channel", (2, 8), 0.75, "channel", ("resnet18", "bert")),
    SoniqVariant("soniq {1,4} 75% low", (1, 4), 0.75),
    SoniqVariant("soniq uniform 8", (2, 8), 0.0),  # no channel low: every channel at 8 bits
)


def variants_for(model_name: str, only: tuple[str, ...] | None = None) -> list[SoniqVariant]:
    """The variants run on ``model_name`` (``"resnet18 (tiny)"`` counts as resnet18);
    ``only``: just those whose name contains one of these strings (``"=name"``: that
    name exactly)."""
    base = model_name.split()[0]

    def wanted(name: str) -> bool:
        return any(name == o[1:] if o.startswith("=") else o in name for o in only)

    return [v for v in VARIANTS if (not v.models or base in v.models) and (only is None or wanted(v.name))]


@dataclasses.dataclass
class SoniqContext:
    """What the soniq rows need from the run: the model, its inputs and timing settings."""

    model: object  # benchmarks.models.BenchModel
    inputs: dict[str, np.ndarray]
    calibration: list[dict[str, np.ndarray]]
    workdir: Path
    repeats: int
    warmup: int
    budget_s: float | None
    cache_dir: Path | None = None  # annotated files kept across runs (exporting is slow)
    build_budget: "BuildBudget | None" = None
    only: tuple[str, ...] | None = None  # variant name parts to run (None: all)


@dataclasses.dataclass
class BuildBudget:
    """Seconds the soniq rows of one run may spend exporting and compiling, all models together."""

    limit_s: float
    spent_s: float = 0.0

    @property
    def exhausted(self) -> bool:
        return self.spent_s >= self.limit_s


def _compiler() -> Callable:
    """``soniq_tvm.compile``, or raise with the reason it cannot be had."""
    import soniq_tvm

    return soniq_tvm.compile  # resolved lazily: raises if soniq_tvm.compiler is missing


def annotate(variant: SoniqVariant, ctx: SoniqContext) -> Path:
    """Write the ``soniq-qdq/1`` file of ``variant`` for the benchmark model; return its path.

    Goes through the project's PyTorch side, as a user would: ``prepare`` the float
    module, fix every layer's per-channel bits to a random ``variant`` mix
    (``builder.choose_bits``, seeded: no training, this is a speed benchmark),
    re-fit the weight scales, calibrate the activation scales on the calibration
    batch, ``export_onnx``. With ``ctx.cache_dir`` the file is reused while the
    fp32 model, the variant, the calibration data and the exporter's source are
    unchanged.
    """
    stem = Path(ctx.model.onnx_path).stem
    name = f"{stem}_soniq_{'-'.join(map(str, variant.palette))}_{round(100 * variant.low_fraction)}_{variant.steps}"
    if ctx.cache_dir is None:
        return _export(variant, ctx, ctx.workdir / f"{name}.onnx")
    cached = Path(ctx.cache_dir) / f"{name}_{_cache_key(variant, ctx)}.onnx"
    if not cached.exists():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        _export(variant, ctx, tmp)
        tmp.replace(cached)
        for stale in cached.parent.glob(f"{name}_*.onnx"):  # older keys of the same export
            if stale != cached and len(stale.stem) == len(cached.stem):
                stale.unlink()
    return cached


def _export(variant: SoniqVariant, ctx: SoniqContext, out: Path) -> Path:
    import torch
    from soniq_tvm.builder import choose_bits
    from soniq_tvm.torch import export_onnx, prepare, quant_layers

    palette = variant.palette
    qmodel = prepare(ctx.model.module, palette=palette, low_fraction=variant.low_fraction, act_scales=variant.steps)
    rng = np.random.default_rng(0)
    for _, layer in quant_layers(qmodel):
        for precision in layer.precisions():
            precision.snap(torch.tensor(choose_bits(precision.channels, palette, variant.low_fraction, rng)))
        layer.init_weight_scale()
    qmodel.eval()
    calibration = np.concatenate([next(iter(c.values())) for c in ctx.calibration])
    with torch.no_grad():
        qmodel(torch.from_numpy(calibration))  # activation scales are set on the first batch
    export_onnx(qmodel, torch.from_numpy(next(iter(ctx.inputs.values()))), out)
    return out


def _cache_key(variant: SoniqVariant, ctx: SoniqContext) -> str:
    import soniq_tvm.annotation
    import soniq_tvm.torch

    h = hashlib.sha256(repr(variant).encode())
    h.update(Path(ctx.model.onnx_path).read_bytes())
    for c in ctx.calibration:
        for v in c.values():
            h.update(np.ascontiguousarray(v).tobytes())
    h.update(inspect.getsource(_export).encode())
    exporter = sorted(Path(soniq_tvm.torch.__file__).parent.glob("*.py"))
    for f in [*exporter, Path(soniq_tvm.annotation.__file__)]:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _one_variant(model_name: str, variant: SoniqVariant, ctx: SoniqContext, compile_fn) -> Row:
    budget = ctx.build_budget
    if budget is not None and budget.exhausted:
        return Row(model_name, variant.name, note=(
            f"n/a: skipped, the soniq export+compile budget ({budget.limit_s:.0f} s) is spent; "
            "a rerun reuses the cached exports"))
    t0 = time.perf_counter()
    try:
        path = annotate(variant, ctx)
        t1 = time.perf_counter()
        compiled = compile_fn(str(path), target=peers.host_target())
    finally:
        if budget is not None:
            budget.spent_s += time.perf_counter() - t0
    build_s = time.perf_counter() - t1
    outputs = [np.asarray(o) for o in compiled.run(ctx.inputs)]
    reference = peers.ort_reference(path, ctx.inputs).outputs
    agree = peers.agreement(outputs, reference, "ORT_DISABLE_ALL, same file", peers.output_step(path))
    settle()  # the reference session's ORT threads stop spinning before soniq is timed
    call = lambda: compiled.run(ctx.inputs)  # noqa: E731
    timing = measure(call, ctx.repeats, ctx.warmup, ctx.budget_s)
    return Row(model_name, variant.name, timing, agree, build_s, fn=call)


def soniq_variants(model_name: str, ctx: SoniqContext | None = None) -> list[Row]:
    """One row per :func:`variants_for` entry of ``model_name``; ``n/a`` rows say why."""
    try:
        compile_fn = _compiler()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available yet"
        note = f"n/a: soniq_tvm.compile unavailable ({failure(exc)})"
        return [Row(model_name, v.name, note=note) for v in variants_for(model_name, ctx and ctx.only)]
    if ctx is None:
        return [Row(model_name, v.name, note="n/a: no model context given") for v in variants_for(model_name)]
    rows = []
    for variant in variants_for(model_name, ctx.only):
        try:
            rows.append(_one_variant(model_name, variant, ctx, compile_fn))
        except Exception as exc:  # noqa: BLE001 - a failing variant must not stop the run
            rows.append(Row(model_name, variant.name, note=f"n/a: {failure(exc)}"))
    return rows
