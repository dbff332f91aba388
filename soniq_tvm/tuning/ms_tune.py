"""Tuning the non-integer functions (float glue, epilogues, softmax, layernorm)
with MetaSchedule's default design space, recording into our database.

Per task (a distinct PrimFunc after legalisation and fusion):

1. the default schedule our build pipeline would give it (the dlight rules of
   :mod:`soniq_tvm.schedules.cpu.generic`) is measured first, as the baseline and
   as a candidate (``{"schedule": "default"}``): compile keeps the default when
   no trace beat it;
2. MetaSchedule's task scheduler searches the generic ``llvm`` rules
   (multi-level tiling, parallel/vectorize/unroll, auto-inline, rfactor).
   MetaSchedule's own x86 VNNI/AVX-512 rule set is not used: it tensorizes with
   ``dot_16x4_vnni``, which LLVM 22 rejects (see the field guide). With
   ``cost_model="random"`` (no XGBoost needed) the search replays random traces
   of the space; with ``"xgb"`` it runs the evolutionary search.

Each measured trace is written to the database as it arrives (a callback after
MetaSchedule's own), so an interrupted run keeps everything it measured.
Only the tasks that carry most of the work are tuned: by bytes touched (or
FLOPs) times calls, largest first, while the budget gives each at least
``MIN_TRIALS`` trials, and never tasks below 1 % of the largest.
"""
from __future__ import annotations

import json
import logging
import time

from .database import Record, Workload
from .measure import no_tensor_intrin_import

__all__ = ["select_tasks", "measure_defaults", "tune_ms", "StopTuning"]

MIN_TRIALS = 3  # per task: the default + at least two traces


class StopTuning(Exception):
    """Raised from the measure callback to leave MetaSchedule's loop (Ctrl-C, or
    the budget is spent: MetaSchedule checks it only between rounds)."""


def select_tasks(tasks, budget: int):
    if budget <= 0 or not tasks:
        return []
    ranked = sorted(tasks, key=lambda t: -t.size * t.weight)
    top = ranked[0].size * ranked[0].weight
    out = []
    for t in ranked:
        if (len(out) + 1) * MIN_TRIALS > budget or t.size * t.weight < 0.01 * top:
            break
        out.append(t)
    return out or ranked[:1]


def workload_of(task) -> Workload:
    import tvm

    return Workload(task.key, "ms", task.name, {"hash": task.key[3:], "mod": tvm.ir.save_json(task.mod)})


def default_schedule(task, target):
    """The task's function as the build pipeline schedules it without tuning."""
    from .. import tvm_shim as tv
    from ..schedules.cpu.generic import default_rules

    with target:  # on a new module: module passes may update the one they are given in place
        return tv.dlight.ApplyDefaultSchedule(*default_rules())(tv.tvm.IRModule(dict(task.mod.functions)))


def measure_defaults(tasks, target, measurer, db, fp, machine, progress=None) -> list:
    """Measure the default schedule of every task not yet measured; returns the records."""
    from .database import candidate_key
    from .fingerprint import fingerprint_key

    cand = {"schedule": "default"}
    todo = [t for t in tasks if candidate_key(cand) not in db.measured(t.key, fingerprint_key(fp))]
    if not todo:
        return []
    mods = [default_schedule(t, target) for t in todo]
    results = measurer.measure(mods)
    recs = [Record(t.key, fp, cand, r.latency_us, r.error, machine, time.time()) for t, r in zip(todo, results)]
    return recs


def _quiet_logger(name: str):
    log = logging.getLogger(f"soniq_tvm.tuning.ms.{name}")
    log.propagate = False
    if not log.handlers:
        log.addHandler(logging.NullHandler())
    return log


def tune_ms(tasks, target, measurer, db, fp, machine, budget: int, *, seed: int = 0, cost_model: str = "random",
            on_measured=None, should_stop=None, trials_per_iter: int = 8) -> int:
    """Run MetaSchedule on ``tasks`` for up to ``budget`` trials; returns trials measured.

    ``on_measured(task, latencies)`` is called after every batch, ``should_stop()``
    before it is recorded (True: leave now, discarding the batch: its workers may
    have been interrupted too).
    """
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    from .. import tvm_shim as tv

    if budget <= 0 or not tasks:
        return 0
    strategy = "evolutionary" if cost_model == "xgb" else "replay-trace"
    count = [0]
    stopped = [False]  # set before raising StopTuning: the FFI hands it back as a bare RuntimeError
    target_json = json.loads(str(target))

    @derived_object
    class _Recorder(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            if should_stop is not None and should_stop():
                stopped[0] = True
                raise StopTuning()
            task = tasks[task_id]
            wl = ms.database.Workload(task.mod)
            recs, lats = [], []
            for cand, b, r in zip(measure_candidates, builder_results, runner_results):
                rec = ms.database.TuningRecord(cand.sch.trace, wl, None, target, cand.args_info).as_json()
                candidate = {"trace": _plain(rec[0]), "args_info": _plain(rec[3])}
                replay_error = _replays(candidate, wl, target_json)
                if b.error_msg or r.error_msg or not r.run_secs or replay_error:
                    err = ("build: " + str(b.error_msg) if b.error_msg else "run: " + str(r.error_msg)
                           if r.error_msg or not r.run_secs else replay_error)
                    recs.append(Record(task.key, fp, candidate, None, err.strip().splitlines()[-1][:300],
                                       machine, time.time()))
                    lats.append(None)
                else:
                    secs = sorted(float(s) for s in r.run_secs)
                    lat = secs[len(secs) // 2] * 1e6
                    recs.append(Record(task.key, fp, candidate, lat, None, machine, time.time()))
                    lats.append(lat)
            db.add(recs)
            count[0] += len(recs)
            if on_measured is not None:
                on_measured(task, lats)
            if count[0] >= budget:
                stopped[0] = True
                raise StopTuning()

    # MetaSchedule prints its statistics as a pandas table when it runs under Jupyter
    # (pandas is no dependency of ours): keep it to its text table, which the quiet
    # loggers drop
    with no_tensor_intrin_import(), tv.global_func_override("s_tir.meta_schedule.using_ipython", lambda: False):
        contexts = [
            ms.TuneContext(mod=tvm.IRModule(dict(t.mod.functions)), target=target, task_name=t.name, rand_state=seed + i, num_threads="physical",
                           space_generator=ms.space_generator.PostOrderApply(
                               sch_rules="llvm", postprocs="llvm", mutator_probs="llvm"),
                           search_strategy=strategy, logger=_quiet_logger(t.name))
            for i, t in enumerate(tasks)
        ]
        callbacks = ms.measure_callback.MeasureCallback.create("default") + [_Recorder()]
        scheduler = ms.task_scheduler.TaskScheduler.create("gradient")
        try:
            ms.tune_tasks(tasks=contexts, task_weights=[float(t.weight) for t in tasks], work_dir="",
                          max_trials_global=budget, max_trials_per_task=budget,
                          num_trials_per_iter=max(1, min(trials_per_iter, budget // len(tasks))),
                          builder=measurer.builder, runner=measurer.runner,
                          database=ms.database.MemoryDatabase(), cost_model=cost_model,
                          measure_callbacks=callbacks, task_scheduler=scheduler)
        except StopTuning:
            pass
        except Exception as e:  # noqa: BLE001  (StopTuning comes back wrapped by the FFI)
            if not stopped[0]:
                raise
    return count[0]


def _replays(candidate: dict, workload, target_json) -> str | None:
    """None if the stored trace replays on its workload (what compile will do)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        ms.database.TuningRecord.from_json([candidate["trace"], [1.0], target_json, candidate["args_info"]],
                                           workload)
    except Exception as e:  # noqa: BLE001
        return "trace does not replay on its workload: " + (str(e).strip().splitlines() or [""])[-1][:200]
    return None


def _plain(obj):
    """TVM containers -> Python lists/dicts/scalars (for JSON)."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "items"):
        return {str(k): _plain(v) for k, v in obj.items()}
    if hasattr(obj, "__iter__"):
        return [_plain(v) for v in obj]
    if hasattr(obj, "value"):
        return obj.value
    return str(obj)
