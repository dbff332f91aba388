"""Default CPU schedules for everything that is not an integer kernel.

TVM 0.27's CPU pipeline schedules nothing, so the float glue between our kernels
(requantisation epilogues, residual adds, pooling, softmax, layernorm, GELU)
would run as single-threaded scalar loops and dominate. These dlight rules give
every such PrimFunc a schedule; each returns ``None`` when it does not apply:

* :class:`Injective`: every block spatial (elementwise chains fused by FuseOps):
  producers inlined, the output loops fused, split into a parallel outer loop and
  a vectorised inner one;
* :class:`ParallelOuter`: anything else (reductions, pooling, softmax): the
  outermost spatial loop of each top-level block runs in parallel.

Kernels already marked ``tirx.is_scheduled`` (ours, or tuned ones) are skipped by
dlight itself.
"""
from __future__ import annotations

from soniq_tvm import tvm_shim as tv

__all__ = ["Injective", "ParallelOuter", "default_rules"]

_VECTOR_BYTES = 32  # one AVX2 register; LLVM splits wider on AVX-512 targets itself
_MIN_PARALLEL = 8192  # elements: below this, waking the thread pool costs more than it saves


def _is_llvm(target) -> bool:
    return target is not None and target.kind.name == "llvm"


def _blocks(sch):
    return sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []


def _schedule(func, target):
    """(schedule, top-level blocks) of an llvm PrimFunc, or None: not ours."""
    if not _is_llvm(target) or not isinstance(func, tv.PrimFunc):
        return None
    sch = tv.s_tir.Schedule(func)
    blocks = _blocks(sch)
    return (sch, blocks) if blocks else None


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


class Injective(tv.s_tir.dlight.ScheduleRule):
    """All-spatial functions: inline, fuse, parallel + vectorise."""

    def apply(self, func, target, _tunable):
        found = _schedule(func, target)
        if found is None:
            return None
        sch, blocks = found
        for b in blocks:
            if any(iv.iter_type != 0 for iv in sch.get(b).iter_vars):  # 0: data parallel
                return None
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001  (not inlinable: keep it, parallel below)
                pass
        remaining = _blocks(sch)
        for b in remaining:
            loops = sch.get_loops(b)
            if not loops:
                continue
            fused = sch.fuse(*loops)
            extent = _extent(sch, fused)
            dtype_bytes = _out_bytes(sch, b)
            lanes = max(1, _VECTOR_BYTES // dtype_bytes)
            big = extent is None or extent >= _MIN_PARALLEL
            if extent is not None and extent % lanes == 0 and extent >= 4 * lanes:
                outer, inner = sch.split(fused, [None, lanes])
                if big:
                    sch.parallel(outer)
                sch.vectorize(inner)
            elif big:
                sch.parallel(fused)
        return sch


class ParallelOuter(tv.s_tir.dlight.ScheduleRule):
    """Anything else: parallel over the outermost spatial loop of each block."""

    def apply(self, func, target, _tunable):
        found = _schedule(func, target)
        if found is None:
            return None
        sch, blocks = found
        for b in blocks[:-1]:  # padding and other producers: computed where consumed
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001  (not inlinable: it gets its own parallel loop)
                pass
        for b in _blocks(sch):
            loops = sch.get_loops(b)
            ivs = sch.get(b).iter_vars
            spatial = [l for l, iv in zip(loops, ivs) if iv.iter_type == 0]
            if len(loops) != len(ivs) or not spatial:
                continue
            lead = [l for l in loops[: loops.index(spatial[-1]) + 1]]
            lead = lead[: next((i for i, iv in enumerate(ivs) if iv.iter_type != 0), len(lead))]
            if not lead:
                continue
            fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
            extent = _extent(sch, fused)
            if extent is None or extent > 1 and _work(sch, b) >= _MIN_PARALLEL:
                sch.parallel(fused)
        return sch


def _work(sch, block) -> int:
    """Iterations of all loops around ``block`` (a size estimate)."""
    n = 1
    for loop in sch.get_loops(block):
        e = _extent(sch, loop)
        n *= e if e is not None else _MIN_PARALLEL
    return n


def _extent(sch, loop):
    ext = sch.get(loop).extent
    return int(ext) if hasattr(ext, "value") or isinstance(ext, int) else None


def _out_bytes(sch, block) -> int:
    """Bytes per element the block stores (4 when it cannot tell)."""
    value = getattr(sch.get(block).body, "value", None)
    if value is None or not hasattr(value, "dtype"):
        return 4
    return max(1, tv.tvm.DataType(str(value.dtype)).bits // 8)


def default_rules():
    return [Injective(), ParallelOuter()]
