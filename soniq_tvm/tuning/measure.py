"""Building and timing candidates: MetaSchedule's builder and runners.

Every candidate, knob setting or MetaSchedule trace alike, is an IRModule with
one PrimFunc ``main``. :class:`Measurer` builds a batch in worker processes
(``LocalBuilder``: a crash or hang in LLVM costs one candidate, not the run)
and times it in a worker process on this machine (``LocalRunner``) or on remote
devices registered with a TVM RPC tracker (``RPCRunner``, see :mod:`.rpc`).

Defaults suit a loaded 2-core machine: builds may take minutes there
(``build_timeout_s`` 120; MetaSchedule's 30 s loses most conv builds), and each
timing repeats until at least ``min_repeat_ms`` has passed, three times; the
latency is the median of the three.
"""
from __future__ import annotations

import os
import statistics
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass

from . import _worker

__all__ = ["MeasureConfig", "Measurer", "no_tensor_intrin_import"]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class MeasureConfig:
    number: int = 1
    repeat: int = 3
    min_repeat_ms: int = 40
    build_timeout_s: float = 120.0
    run_timeout_s: float = 60.0
    build_workers: int = 0  # 0: one per core
    enable_cpu_cache_flush: bool = False


@dataclass(frozen=True)
class Result:
    latency_us: float | None
    error: str | None = None


class Measurer:
    """Builds and times batches of single-PrimFunc modules for one target."""

    def __init__(self, target, config: MeasureConfig | None = None, rpc=None):
        from tvm.s_tir import meta_schedule as ms

        self.target = target
        self.config = config or MeasureConfig()
        self.rpc = rpc
        c = self.config
        self.builder = ms.builder.LocalBuilder(max_workers=c.build_workers or _cores(),
                                               timeout_sec=c.build_timeout_s, f_build=_worker.build)
        evaluator = ms.runner.EvaluatorConfig(number=c.number, repeat=c.repeat, min_repeat_ms=c.min_repeat_ms,
                                              enable_cpu_cache_flush=c.enable_cpu_cache_flush)
        if rpc is None:
            self.runner = ms.runner.LocalRunner(timeout_sec=c.run_timeout_s, evaluator_config=evaluator,
                                                f_alloc_argument=_worker.alloc_local,
                                                f_run_evaluator=_worker.run_local)
            self.where = "local"
        else:
            self.runner = rpc.runner(evaluator, f_alloc_argument=_worker.alloc_rpc, f_run_evaluator=_worker.run_rpc)
            self.where = f"rpc {rpc.tracker} key={rpc.key}"

    def close(self) -> None:
        """Stop the runner's worker processes (the builder starts and stops its own per batch)."""
        pool = getattr(self.runner, "pool", None)
        if pool is not None:
            try:
                pool.shutdown()
            except Exception:  # noqa: BLE001  (workers already gone, e.g. after Ctrl-C)
                pass

    @property
    def device_type(self) -> str:
        return "cuda" if self.target.kind.name == "cuda" else "cpu"

    def measure(self, mods: list) -> list[Result]:
        """Build and time each module; one :class:`Result` per module, in order."""
        from tvm.s_tir import meta_schedule as ms

        if not mods:
            return []
        built = self.builder.build([ms.builder.BuilderInput(m, self.target) for m in mods])
        results: list[Result | None] = [None] * len(mods)
        inputs, where = [], []
        for i, (m, b) in enumerate(zip(mods, built)):
            if b.error_msg:
                results[i] = Result(None, "build: " + _last_line(b.error_msg))
                continue
            inputs.append(ms.runner.RunnerInput(b.artifact_path, self.device_type,
                                                ms.arg_info.ArgInfo.from_prim_func(m["main"])))
            where.append(i)
        futures = self.runner.run(inputs) if inputs else []
        for i, fut in zip(where, futures):
            r = fut.result()
            if r.error_msg:
                results[i] = Result(None, "run: " + _last_line(r.error_msg))
            else:
                secs = [float(s) for s in r.run_secs]
                results[i] = Result(statistics.median(secs) * 1e6)
        for b in built:
            if b.artifact_path:
                _remove_artifact(str(b.artifact_path))
        return results  # type: ignore[return-value]


def _last_line(msg: str) -> str:
    lines = [ln.strip() for ln in str(msg).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else str(msg))[:300]


def _remove_artifact(path: str) -> None:
    import shutil

    d = os.path.dirname(path)
    if os.path.basename(d).startswith("tmp"):
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def no_tensor_intrin_import():
    """While creating MetaSchedule tuning contexts, stand an empty module in for
    ``tvm.s_tir.tensor_intrin`` unless it is already imported.

    ``TuneContext.__init__`` imports it unconditionally, and it parses every
    tensor intrinsic TVM ships as TVMScript (40-80 s on a 2-core machine). Our
    design spaces use the generic ``llvm`` rules, which tensorize nothing. The
    real module is importable again as soon as the block ends.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    stub = types.ModuleType(name)
    stub.__doc__ = "soniq-tvm placeholder (see soniq_tvm.tuning.measure.no_tensor_intrin_import)"
    sys.modules[name] = stub
    try:
        yield
    finally:
        if sys.modules.get(name) is stub:
            del sys.modules[name]
