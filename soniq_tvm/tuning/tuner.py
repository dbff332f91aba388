"""``tune()``: search the schedules of a model for one target, into a database.

    soniq_tvm.tune("model.onnx", target="llvm -mcpu=znver3", database="znver3.db", trials=200)
    m = soniq_tvm.compile("model.onnx", target="llvm -mcpu=znver3", database="znver3.db")

The model goes through the compiler's passes once (as ``compile`` would), then:

1. **integer kernels**: each distinct workload (:mod:`.workloads`) has a list of
   (family, knobs) candidates (:mod:`.knobs`); the budget is shared by the
   workloads in proportion to their work (MACs x occurrences), every workload
   getting at least the untuned choice and each family's default, and no more
   than its space. Candidates are built and timed in batches (:mod:`.measure`),
   each batch committed to the database at once. With the local runner the
   fastest candidate of each workload is then checked bit for bit against the
   numpy reference on random data; a wrong one is marked failed and the next
   fastest is checked.
2. **everything else**: MetaSchedule on the largest of the remaining functions
   (:mod:`.ms_tune`), with what is left of the budget (``ms_trials`` fixes it).

Budget: ``trials`` counts candidates in the database for this target, measured
now or by an earlier run, so a rerun after an interruption measures only what
is missing, and a rerun after completion measures nothing. Ctrl-C stops after
the batch in flight (discarded: its worker processes got the signal too) and
returns with ``interrupted=True``; a second Ctrl-C raises KeyboardInterrupt.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import SoniqError
from .database import Record, TuningDatabase, Workload, candidate_key
from .fingerprint import describe_fingerprint, fingerprint, fingerprint_key, machine_info
from .progress import Progress, fmt_us

__all__ = ["tune", "TuneResult", "TaskResult"]

BATCH = 16  # candidates per build/run round (the builder starts its worker pool once per round)


@dataclass
class TaskResult:
    key: str
    kind: str  # "qop" | "ms"
    name: str
    weight: int
    planned: int = 0  # candidates in its plan (qop) or trials given (ms)
    measured: int = 0  # measured by this run
    resumed: int = 0  # already in the database
    default_us: float | None = None
    best_us: float | None = None
    best: str = ""

    @property
    def speedup(self) -> float | None:
        if self.default_us and self.best_us:
            return self.default_us / self.best_us
        return None


@dataclass
class TuneResult:
    database: str
    target: str
    tasks: list = field(default_factory=list)
    trials: int = 0  # budget
    measured: int = 0
    resumed: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    runner: str = "local"

    def __str__(self) -> str:
        lines = [f"tuning {self.target} into {self.database} ({self.runner}): {self.measured} trials measured, "
                 f"{self.resumed} already there, {self.seconds:.0f} s" + (" [interrupted]" if self.interrupted else "")]
        lines.append(f"{'kind':4} {'x':>3} {'trials':>6} {'default':>10} {'best':>10} {'speed-up':>8}  task / best")
        for t in self.tasks:
            sp = f"{t.speedup:.2f}x" if t.speedup else "-"
            lines.append(f"{t.kind:4} {t.weight:>3} {t.measured + t.resumed:>6} {fmt_us(t.default_us):>10} "
                         f"{fmt_us(t.best_us):>10} {sp:>8}  {t.name[:60]} / {t.best}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


class _Stop:
    """First Ctrl-C: stop after the batch in flight. Second: KeyboardInterrupt."""

    def __init__(self, progress: Progress):
        self.flag = False
        self.progress = progress
        self._old = None

    def __call__(self) -> bool:
        return self.flag

    def _handler(self, _sig, _frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        self.progress.line("[tune] interrupted: saving what is measured (Ctrl-C again to abort now)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def _allocate(tasks, spaces: dict, mins: dict, budget: int) -> dict:
    """Trials per task within ``budget``: first the untuned choice of every task
    (largest first), then the other families' defaults, then the rest by work
    share; never more than a task's space."""
    alloc = {t.key: 0 for t in tasks}
    left = budget
    for floor in (lambda t: 1, lambda t: mins[t.key]):
        for t in tasks:  # largest first
            want = min(floor(t), spaces[t.key]) - alloc[t.key]
            if want > 0 and left > 0:
                give = min(want, left)
                alloc[t.key] += give
                left -= give
    while left > 0:
        open_ = [t for t in tasks if alloc[t.key] < spaces[t.key]]
        if not open_:
            break
        share = sum(t.size for t in open_) or 1.0
        given = 0
        for t in open_:
            extra = min(spaces[t.key] - alloc[t.key], max(1, math.floor(left * t.size / share)), left - given)
            if extra > 0:
                alloc[t.key] += extra
                given += extra
        if given == 0:
            break
        left -= given
    return alloc


def tune(model, target="llvm", database="tuning.db", trials: int = 200, *, ms_trials: int | None = None,
         shapes=None, rpc=None, seed: int = 0, cost_model: str = "random", verify: bool = True,
         measure=None, progress: bool = True, log=None, split: str = "auto") -> TuneResult:
    """Tune ``model`` (ONNX path or ModelProto) for ``target`` into the database file ``database``.

    ``trials``: the budget, candidates measured for this target in all (records
    already in the database count). ``ms_trials``: the part for MetaSchedule's
    tasks (default: what the integer kernels leave of the budget, at most half;
    0: integer kernels only). ``rpc``: a :class:`~soniq_tvm.tuning.rpc.RPC` to
    measure on remote devices (default: this machine). ``cost_model``:
    ``"random"`` or ``"xgb"`` (needs ``xgboost``: ``pip install soniq-tvm[tune]``).
    ``measure``: a :class:`~soniq_tvm.tuning.measure.MeasureConfig`.
    ``progress``: the progress bar on stderr. ``split``: as for
    :func:`~soniq_tvm.compile` (the kernels tuned are the ones a compile with the
    same ``split`` builds). Returns a :class:`TuneResult`.
    """
    from ..compiler import prepare
    from ..targets import describe, to_tvm_target
    from . import knobs as knobs_mod
    from . import ms_tune, workloads
    from .measure import MeasureConfig, Measurer

    t0 = time.time()
    if trials < 0:
        raise SoniqError(f"trials must be >= 0, got {trials}")
    if cost_model not in ("random", "xgb"):
        raise SoniqError(f"cost_model must be 'random' or 'xgb', got {cost_model!r}")
    if cost_model == "xgb":
        try:
            import xgboost  # noqa: F401
        except ImportError:
            raise SoniqError("cost_model='xgb' needs xgboost", hint="pip install 'soniq-tvm[tune]'") from None
    db = TuningDatabase(database)
    measurer = None
    try:
        result, tgt, *_ = prepare(model, target, shapes=shapes, split=split)
        tvm_target = to_tvm_target(tgt)
        fp = fingerprint(tgt)
        fpk = fingerprint_key(fp)
        machine = machine_info()
        if rpc is not None:
            machine = {"rpc": f"{rpc.tracker} key={rpc.key}", "built_on": machine}
        knob_tasks, ms_tasks = workloads.extract(result, tvm_target, with_ms=(ms_trials != 0))
        out = TuneResult(str(database), describe(tgt), trials=trials,
                         runner="local" if rpc is None else f"rpc {rpc.tracker} key={rpc.key}")
        # ---- plan --------------------------------------------------------------------
        cands = {t.key: knobs_mod.candidates(t.op, tvm_target, seed) for t in knob_tasks}
        spaces = {k: len(v) for k, v in cands.items()}
        mins = {k: sum(1 for c in v if c.get("knobs") == {}) for k, v in cands.items()}
        total_space = sum(spaces.values())
        if ms_trials is None:
            knob_budget = min(total_space, trials if not ms_tasks else max(trials - trials // 2, 0))
            ms_budget = trials - knob_budget if ms_tasks else 0
        else:
            ms_budget = min(max(0, ms_trials), trials)
            knob_budget = min(total_space, trials - ms_budget)
        alloc = _allocate(knob_tasks, spaces, mins, knob_budget)
        chosen_ms = ms_tune.select_tasks(ms_tasks, ms_budget)
        n_tasks = len(knob_tasks) + len(chosen_ms)
        bar = Progress(sum(alloc.values()) + (ms_budget if chosen_ms else 0), n_tasks, enabled=progress)
        bar.line(f"[tune] {describe_fingerprint(fp)}: {len(knob_tasks)} integer-kernel workloads "
                 f"({total_space} candidates), {len(ms_tasks)} other functions ({len(chosen_ms)} tuned); "
                 f"budget {trials} trials -> {sum(alloc.values())} + {ms_budget if chosen_ms else 0}; "
                 f"database {database}")
        measurer = Measurer(tvm_target, measure or MeasureConfig(), rpc=rpc)
        with _Stop(bar) as stop:
            # ---- 1. integer kernels: one queue, batches may span tasks --------------
            queue, left, results = [], {}, {}
            for i, task in enumerate(knob_tasks, start=1):
                plan = cands[task.key][: alloc[task.key]]
                tr = results[task.key] = TaskResult(task.key, "qop", task.name, task.weight, planned=len(plan))
                out.tasks.append(tr)
                db.add_workload(Workload(task.key, "qop", task.name, workloads.qop_body(task.op)))
                done = db.measured(task.key, fpk)
                todo = [c for c in plan if candidate_key(c) not in done]
                tr.resumed = len(plan) - len(todo)
                bar.resumed(tr.resumed)
                best = db.best(task.key, fpk)
                if best is not None:
                    bar.note_best(task.key, task.weight, best.latency_us)
                queue += [(i, task, c) for c in todo]
                left[task.key] = len(todo)

            def finish(i, task):
                if verify and rpc is None and not stop():
                    _verify_best(task, db, fpk, tvm_target, bar)
                _summarize(results[task.key], db.records(task.key, fpk))
                bar.start_task(i, task.key, task.name, task.weight, results[task.key].best_us)
                bar.end_task()

            for i, task in enumerate(knob_tasks, start=1):
                if left[task.key] == 0:
                    finish(i, task)
            for b in range(0, len(queue), BATCH):
                if stop():
                    break
                batch = queue[b:b + BATCH]
                i, task, _ = batch[0]
                if bar.task_name != task.name:
                    bar.start_task(i, task.key, task.name, task.weight, results[task.key].best_us)
                recs = _measure_knobs([(t, c) for _i, t, c in batch], tvm_target, measurer, fp, machine)
                if stop():
                    break
                db.add(recs)
                for (i, task, _c), r in zip(batch, recs):
                    results[task.key].measured += 1
                    bar.measured([r.latency_us], key=task.key, weight=task.weight)
                    left[task.key] -= 1
                    if left[task.key] == 0:
                        finish(i, task)
            for task in knob_tasks:
                if left[task.key] > 0:
                    _summarize(results[task.key], db.records(task.key, fpk))
            # ---- 2. MetaSchedule ------------------------------------------------------
            if chosen_ms and not stop():
                _run_ms(chosen_ms, ms_budget, tvm_target, measurer, db, fp, fpk, machine, bar, stop, out,
                        len(knob_tasks), seed, cost_model)
        bar.close()
        out.interrupted = stop()
        out.measured = sum(t.measured for t in out.tasks)
        out.resumed = sum(t.resumed for t in out.tasks)
        out.seconds = time.time() - t0
        if out.interrupted:
            bar.line(f"[tune] interrupted after {out.measured} new trials; {len(db)} records in {database}. "
                     "Run the same command again to resume.")
        return out
    finally:
        if measurer is not None:
            measurer.close()
        db.close()


def _measure_knobs(pairs, target, measurer, fp, machine) -> list[Record]:
    """Build and time (task, candidate) pairs; one record each, in order."""
    from .knobs import build_candidate

    mods, idx, recs = [], [], [None] * len(pairs)
    for j, (task, cand) in enumerate(pairs):
        try:
            mods.append(build_candidate(task.op, cand, target))
            idx.append(j)
        except Exception as e:  # noqa: BLE001  (a family that cannot build this setting: a failed trial)
            msg = f"primfunc: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            recs[j] = Record(task.key, fp, cand, None, msg[:300], machine, time.time())
    for j, r in zip(idx, measurer.measure(mods)):
        task, cand = pairs[j]
        recs[j] = Record(task.key, fp, cand, r.latency_us, r.error, machine, time.time())
    return recs


def _summarize(tr: TaskResult, recs) -> None:
    ok = [r for r in recs if r.ok]
    if not ok:
        return
    best = min(ok, key=lambda r: r.latency_us)
    tr.best_us = best.latency_us
    from .database import _short

    tr.best = _short(best.candidate)
    default = [r for r in ok if r.candidate.get("default") or r.candidate.get("schedule") == "default"]
    tr.default_us = default[0].latency_us if default else None


def _verify_best(task, db, fpk, target, bar) -> None:
    """Check the fastest candidate against the numpy reference; mark wrong ones failed."""
    for _ in range(3):
        best = db.best(task.key, fpk)
        if best is None:
            return
        err = _check_numerics(task.op, best.candidate, target)
        if err is None:
            return
        db.mark_failed(best, f"wrong result: {err}")
        bar.line(f"[tune] {task.name}: {best.candidate} gave a wrong result ({err}); marked failed")


def _check_numerics(op, candidate: dict, target) -> str | None:
    import tvm

    from ..qop import reference, weight_range
    from ..schedules import registry
    from .knobs import build_candidate

    rng = np.random.default_rng(0)
    fam = registry.get(candidate["family"])
    opk = registry.with_target_knobs(fam, op.with_(family=fam.name, knobs=dict(candidate.get("knobs", {}))), target)
    alo, ahi = ((-(1 << (op.a_bit - 1)), (1 << (op.a_bit - 1)) - 1) if op.a_signed else (0, (1 << op.a_bit) - 1))
    info = np.iinfo(np.dtype(op.a_dtype))
    x = rng.integers(max(alo, info.min), min(ahi, info.max) + 1, op.x_shape).astype(op.a_dtype)
    wlo, whi = weight_range(op.w_bit, op.w_signed)
    w = rng.integers(wlo, whi + 1, op.w_shape)
    if op.bipolar:
        w = np.where(w >= 0, 1, -1)
    try:
        packed = fam.pack(w, opk)
        lib = tvm.compile(build_candidate(op, candidate, target), target=target)
        dev = tvm.cpu()
        out = tvm.runtime.empty(tuple(op.out_shape), "int32", dev)
        lib["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in [x, *packed]], out)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
    want = reference(x, w, op)
    got = out.numpy()
    bad = int((got.astype(np.int64) != want).sum())
    return None if bad == 0 else f"{bad} of {want.size} outputs differ from the reference"


def _run_ms(tasks, budget, target, measurer, db, fp, fpk, machine, bar, stop, out, offset, seed, cost_model):
    from . import ms_tune

    results = {}
    for i, t in enumerate(tasks, start=1):
        db.add_workload(ms_tune.workload_of(t))
        tr = TaskResult(t.key, "ms", t.name, t.weight)
        results[t.key] = tr
        out.tasks.append(tr)
        tr.resumed = len(db.measured(t.key, fpk))
    already = sum(tr.resumed for tr in results.values())
    bar.resumed(min(already, budget))
    left = budget - already
    bar.start_task(offset + 1, tasks[0].key, "default schedules", 1)
    if left > 0:
        recs = ms_tune.measure_defaults(tasks, target, measurer, db, fp, machine)
        if not stop():
            db.add(recs)
            for r in recs:
                results[r.workload].measured += 1
            bar.measured([r.latency_us for r in recs])
            left -= len(recs)
    index = {t.key: i for i, t in enumerate(tasks, start=offset + 1)}

    def on_measured(task, lats):
        tr = results[task.key]
        tr.measured += len(lats)
        if bar.task_name != task.name:
            best = db.best(task.key, fpk)
            bar.start_task(index[task.key], task.key, task.name, task.weight, best.latency_us if best else None)
        bar.measured(lats)

    if left > 0 and not stop():
        ms_tune.tune_ms(tasks, target, measurer, db, fp, machine, left, seed=seed, cost_model=cost_model,
                        on_measured=on_measured, should_stop=stop)
    for t in tasks:
        _summarize(results[t.key], db.records(t.key, fpk))
    bar.end_task()

