"""Auto-tuning: search the schedules of a model per target, keep them in a
database keyed by hardware, reuse them on any machine with the same target.

::

    import soniq_tvm
    soniq_tvm.tune("model.onnx", target="llvm -mcpu=znver3", database="znver3.db", trials=200)
    m = soniq_tvm.compile("model.onnx", target="llvm -mcpu=znver3", database="znver3.db")

* :func:`tune` (:mod:`.tuner`): integer kernels by a search over their families'
  knobs, everything else by MetaSchedule; measured locally or through an RPC
  tracker (:class:`RPC`); interruptible and resumable.
* :class:`TuningDatabase` (:mod:`.database`): one SQLite file; every record carries
  the fingerprint of its target (:mod:`.fingerprint`).
* :class:`TunedSchedules` (:mod:`.apply`): what ``compile(database=...)`` uses;
  applies only records whose fingerprint is the target's.

Importing this package does not import TVM (the database and fingerprint
comparison are plain Python); tuning and compiling do.
"""
from __future__ import annotations

from .database import Record, TuningDatabase, Workload
from .fingerprint import describe_fingerprint, differences, fingerprint, fingerprint_key

__all__ = ["tune", "TuneResult", "TuningDatabase", "Record", "Workload", "TunedSchedules", "TuningWarning",
           "RPC", "LocalCluster", "RPCError", "MeasureConfig", "fingerprint", "fingerprint_key", "differences",
           "describe_fingerprint"]

_LAZY = {
    "tune": (".tuner", "tune"),
    "TuneResult": (".tuner", "TuneResult"),
    "TunedSchedules": (".apply", "TunedSchedules"),
    "TuningWarning": (".apply", "TuningWarning"),
    "RPC": (".rpc", "RPC"),
    "LocalCluster": (".rpc", "LocalCluster"),
    "RPCError": (".rpc", "RPCError"),
    "MeasureConfig": (".measure", "MeasureConfig"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'soniq_tvm.tuning' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
