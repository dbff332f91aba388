"""Untuned vs tuned soniq-tvm, at a stated tuning budget.

For each benchmark model (``benchmarks.models``: ResNet-18 at 224x224, the
BERT-like encoder) annotated as the ``{2,8} 75% low`` SONIQ variant (the same
export as the main benchmark's soniq rows):

1. compile without tuning (the families' cost model picks kernels and default
   knobs; our dlight defaults schedule the rest);
2. ``soniq_tvm.tune`` for this machine with ``--trials`` candidates in all
   (``--ms-trials`` of them for MetaSchedule), into ``<workdir>/<model>.db``;
   an existing database is resumed, so a rerun only measures what is missing;
3. compile with ``database=`` and time both modules the same way, alternating
   untuned and tuned rounds so that load on a shared machine hits both alike.

Run::

    python -m benchmarks.tuning                        # resnet18 + bert, 96 trials each
    python -m benchmarks.tuning --models bert --trials 200 --ms-trials 60
    python -m benchmarks.tuning --tiny                 # the small models, a smoke run

Prints a Markdown table: model, variant, budget (trials, tuning seconds),
untuned and tuned median latency, speed-up, and the largest output difference
between the two (tuning changes schedules, not arithmetic: integer kernels are
bit-exact, float epilogues may differ in rounding).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import models
from .timing import measure


@dataclasses.dataclass
class TuningRow:
    model: str
    variant: str
    trials: int
    ms_trials: int | None
    tune_s: float
    measured: int
    untuned_ms: float
    tuned_ms: float
    max_diff: float
    untuned_runs: int
    tuned_runs: int

    @property
    def speedup(self) -> float:
        return self.untuned_ms / self.tuned_ms


def _annotated(name: str, tiny: bool, workdir: Path, log):
    from .soniq_rows import VARIANTS, SoniqContext, annotate

    bm = models.build(name, workdir, tiny=tiny)
    x = bm.random_input(1)
    calib = [bm.random_input(100 + i) for i in range(8)]
    variant = VARIANTS[0]  # {2,8}, 75 % of the channels low
    ctx = SoniqContext(bm, x, calib, workdir, 1, 0, None)
    t0 = time.perf_counter()
    path = annotate(variant, ctx)
    log(f"[{name}] annotated {variant.name} in {time.perf_counter() - t0:.0f} s: {path.name}")
    return path, x, variant.name


def _interleaved(fa, fb, rounds: int, per_round: int):
    """Median latencies (ms) of ``fa`` and ``fb``, timed in alternating rounds."""
    a, b = [], []
    for _ in range(rounds):
        a.append(measure(fa, repeats=per_round, warmup=1).median_ms)
        b.append(measure(fb, repeats=per_round, warmup=1).median_ms)
    return float(np.median(a)), float(np.median(b)), rounds * per_round


def bench(name: str, args, log=print) -> TuningRow:
    import soniq_tvm
    from soniq_tvm.tuning import MeasureConfig

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path, x, variant = _annotated(name, args.tiny, workdir, log)
    target = "llvm"
    t0 = time.perf_counter()
    untuned = soniq_tvm.compile(str(path), target)
    log(f"[{name}] untuned compile {time.perf_counter() - t0:.0f} s")
    db = workdir / f"{name}{'_tiny' if args.tiny else ''}.db"
    t0 = time.perf_counter()
    result = soniq_tvm.tune(str(path), target, str(db), trials=args.trials, ms_trials=args.ms_trials,
                            measure=MeasureConfig(repeat=args.tune_repeat, min_repeat_ms=args.min_repeat_ms),
                            progress=not args.quiet)
    tune_s = time.perf_counter() - t0
    log(str(result))
    t0 = time.perf_counter()
    tuned = soniq_tvm.compile(str(path), target, database=str(db))
    log(f"[{name}] tuned compile {time.perf_counter() - t0:.0f} s; "
        + "; ".join(n for n in tuned.plan.notes if "tuning" in n))
    ya = [np.asarray(o) for o in untuned.run(x)]
    yb = [np.asarray(o) for o in tuned.run(x)]
    diff = max(float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(ya, yb))
    ua, tb, runs = _interleaved(lambda: untuned.run(x), lambda: tuned.run(x), args.rounds, args.repeats)
    return TuningRow(name + (" (tiny)" if args.tiny else ""), variant, args.trials, args.ms_trials, tune_s,
                     result.measured, ua, tb, diff, runs, runs)


def format_markdown(rows: list[TuningRow]) -> str:
    head = ("| model | variant | budget (trials, of which MetaSchedule) | tuning time | untuned | tuned | "
            "speed-up | max output diff |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        ms = "auto" if r.ms_trials is None else str(r.ms_trials)
        lines.append(f"| {r.model} | {r.variant} | {r.trials} ({ms}); {r.measured} measured this run | "
                     f"{r.tune_s:.0f} s | {r.untuned_ms:.3f} ms | {r.tuned_ms:.3f} ms | {r.speedup:.2f}x | "
                     f"{r.max_diff:.3g} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.tuning", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet18,bert")
    p.add_argument("--tiny", action="store_true", help="the small versions of the models")
    p.add_argument("--trials", type=int, default=96, help="tuning budget per model (default 96)")
    p.add_argument("--ms-trials", type=int, default=None, help="of which MetaSchedule (default: auto)")
    p.add_argument("--workdir", default="/tmp/soniq_bench_tuning")
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per round")
    p.add_argument("--tune-repeat", type=int, default=3)
    p.add_argument("--min-repeat-ms", type=int, default=40)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in models.MODEL_NAMES:
            print(f"unknown model {name!r}; expected one of {models.MODEL_NAMES}", file=sys.stderr)
            return 2
        rows.append(bench(name, args))
        print(format_markdown(rows[-1:]), flush=True)
    print("\n" + format_markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) | {"speedup": r.speedup} for r in rows],
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
