"""Kernel families and how one is chosen for an integer op.

A *kernel family* computes :class:`~soniq_tvm.qop.QOp` groups in one style
(bit-serial, int8-dot, lookup table, plain reference). It owns four things, so
that a schedule can choose an implementation per group:

* ``cost(op, target)``: an estimate in arbitrary units, or ``None`` meaning
  "not mine" (wrong target, unsupported widths or shape);
* ``pack(w, op)``: the compile-time weight layout (a list of numpy arrays);
* ``primfunc(op)``: a PrimFunc ``(x, *packed, out)`` computing the op exactly,
  already scheduled for the target where the family has a schedule;
* ``reference(x, packed, op)``: the numpy twin, exact.

:func:`select` picks the cheapest applicable family. Families are registered in
order; later issues add faster ones in front of the reference.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from soniq_tvm.qop import QOp

__all__ = ["KernelFamily", "register", "families", "select", "get", "with_target_knobs", "kernel_primfunc",
           "cached"]


class KernelFamily(Protocol):
    name: str

    def cost(self, op: QOp, target) -> float | None: ...

    def pack(self, w: np.ndarray, op: QOp) -> list[np.ndarray]: ...

    def primfunc(self, op: QOp, target): ...

    def reference(self, x: np.ndarray, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray: ...


_FAMILIES: dict[str, KernelFamily] = {}


def register(family: KernelFamily) -> KernelFamily:
    _FAMILIES[family.name] = family
    return family


def families() -> list[KernelFamily]:
    _ensure_builtin()
    return list(_FAMILIES.values())


def get(name: str) -> KernelFamily:
    _ensure_builtin()
    return _FAMILIES[name]


def select(op: QOp, target, exclude: Sequence[str] = ("int8-ref",)) -> KernelFamily:
    """The cheapest family that accepts ``op`` on ``target`` (ties: registration order)."""
    best, best_cost = None, None
    for fam in families():
        if fam.name in exclude:
            continue
        c = fam.cost(op, target)
        if c is not None and (best_cost is None or c < best_cost):
            best, best_cost = fam, c
    assert best is not None, "the bitplane reference family accepts every uniform op"
    return best


def with_target_knobs(family: KernelFamily, op: QOp, target) -> QOp:
    """``op`` with the knobs ``family`` picks for ``target`` when it has none set
    (an untuned op; a family may have a ``target_knobs(op, target)`` method, e.g.
    the bit-serial vector width). Knobs already on the op, tuned or given, are
    kept whole. The pack phase and the tuner both go through here, so the
    default a tuner measures is the kernel the compiler builds."""
    if op.knobs or not hasattr(family, "target_knobs"):
        return op
    knobs = family.target_knobs(op, target)
    return op.with_(knobs=knobs) if knobs else op


def _ensure_builtin() -> None:
    if not _FAMILIES:
        from soniq_tvm.schedules import cpu, reference  # noqa: F401  (register themselves)


_BUILT: dict = {}  # kernels already built in this process, by what determines them
_BUILT_MAX = 512


def cached(key, make):
    """``make()``, or the PrimFunc it returned before for an equal ``key``. Parsing a
    kernel's TVMScript costs 0.1-0.5 s; a process that compiles a model twice (tests,
    tuning, a notebook re-run) builds each kernel once. PrimFuncs are immutable."""
    func = _BUILT.get(key)
    if func is None:
        if len(_BUILT) >= _BUILT_MAX:
            _BUILT.clear()
        func = _BUILT[key] = make()
    return func


def kernel_primfunc(family, op: QOp, target):
    """``family.primfunc(op, target)``, built once per (family, op, target)."""
    return cached((family.name, op.to_json(), str(target)), lambda: family.primfunc(op, target))
