"""Default CPU schedules for everything that is not an integer kernel.

TVM 0.27's CPU pipeline schedules nothing, so the float glue between our kernels
(requantisation epilogues, residual adds, pooling, softmax, layernorm, GELU)
would run as single-threaded scalar loops and dominate. :func:`default_rules`
is the one list the build pipeline (and the tuner's default measurement)
applies to every PrimFunc that is not one of our kernels; the first rule that
does not answer ``None`` ("not mine") schedules it:

1. :class:`~.matmul.Matmul`: activation x activation matmuls (attention);
2. :class:`~.reduction.RowReduction`: reductions over the innermost axes with
   their elementwise prologue/epilogue (softmax, layer norm, mean, sum, max);
3. :class:`~.pool.Pool`: sliding-window max/avg pooling;
4. :class:`Injective`: every block spatial (elementwise chains fused by
   FuseOps, gathers, slices, transposes);
5. :class:`ParallelOuter`: anything else: the outermost spatial loop of each
   top-level block runs in parallel.

Every rule first makes float32 exp/erf/tanh/sigmoid vectorisable
(:mod:`.fastmath`) and vectorises only along loops in which every buffer access
is contiguous or a broadcast (:func:`._glue.vectorize_inner`). Kernels already
marked ``tirx.is_scheduled`` (ours, or tuned ones) are skipped by dlight itself.
"""
from __future__ import annotations

from soniq_tvm import tvm_shim as tv

from ._glue import (
    DATA_PAR,
    child_blocks,
    extent,
    is_spatial,
    open_schedule,
    try_inline,
    vectorize_inner,
    worth_parallel,
)
from .pool import Pool
from .reduction import RowReduction

__all__ = ["Injective", "ParallelOuter", "Pool", "RowReduction", "default_rules"]


class Injective(tv.s_tir.dlight.ScheduleRule):
    """All-spatial functions: producers inlined; then per block, the longest
    contiguous run of innermost loops fused and vectorised, the loops outside
    it fused and parallel. A gather or transpose in the innermost loop keeps
    that loop scalar (lanes would load non-contiguously) and parallelises the
    rest."""

    def apply(self, func, target, _tunable):
        sch = open_schedule(func, target)
        if sch is None:
            return None
        blocks = child_blocks(sch)
        if not all(is_spatial(sch, b) for b in blocks):
            return None
        try_inline(sch, blocks[:-1])
        for b in child_blocks(sch):
            vectorize_inner(sch, b, target)
        return sch


class ParallelOuter(tv.s_tir.dlight.ScheduleRule):
    """Anything else: parallel over the outermost spatial loops of each block."""

    def apply(self, func, target, _tunable):
        sch = open_schedule(func, target)
        if sch is None:
            return None
        blocks = child_blocks(sch)
        parallel = worth_parallel(sch, blocks)
        try_inline(sch, blocks[:-1])  # padding and other producers: computed where consumed
        for b in child_blocks(sch):
            loops = sch.get_loops(b)
            ivs = sch.get(b).iter_vars
            if len(loops) != len(ivs):
                continue
            lead = []
            for loop, iv in zip(loops, ivs):
                if int(iv.iter_type) != DATA_PAR:
                    break
                lead.append(loop)
            if not lead:
                continue
            fused = sch.fuse(*lead) if len(lead) > 1 else lead[0]
            ext = extent(sch, fused)
            if parallel and (ext is None or ext > 1):
                sch.parallel(fused)
        return sch


def default_rules():
    """The rules in the order they are tried (see the module docstring)."""
    from .matmul import Matmul  # non-weight matmuls (attention): register-blocked, see matmul.py

    return [Matmul(), RowReduction(), Pool(), Injective(), ParallelOuter()]
