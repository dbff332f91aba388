"""Default CPU schedule for row reductions: softmax, layer norm, mean, sum, max.

Legalisation writes these as a chain of blocks over the same leading "row"
axes, each either a reduction over the trailing axes or elementwise (a plain
sum or max is a chain of one)::

    layer_norm:  sum[r] += x[r, k];  mean[r] = sum[r] / K
                 var[r] += (x[r, k] - mean[r])^2;  y[r, k] = (x[r, k] - mean[r]) * rsqrt(...) * g[k] + b[k]
    softmax:     max[r] = max(x[r, k]);  e[r, k] = exp(x[r, k] - max[r])
                 sum[r] += e[r, k];  y[r, k] = q(e[r, k] / sum[r])      (+ quantise/cast epilogue)

:class:`RowReduction` schedules the whole chain one row at a time:

* elementwise blocks with a single consumer are inlined (the quantise epilogue
  into the last block, ``x - max`` into ``exp``...); the others stay as
  per-row buffers;
* each reduction's innermost axis is split into vector-width lanes and
  ``rfactor``-ed: ``lanes`` partial results accumulate with vector
  instructions, one short scalar loop combines them;
* every block is computed at the (fused, parallel) row loop of the last block,
  so a row is read from L1 by all passes;
* elementwise loops under the row are vectorised (exp via :mod:`.fastmath`).

Partial sums change the order of float additions (not the result beyond
rounding); integer reductions are exact whatever the order.

Returns ``None`` for anything else, in particular for matmul-like reductions
(a product of two different buffer loads, left to :mod:`.matmul`) and for
reductions whose innermost axis is not contiguous in memory.
"""
from __future__ import annotations

from soniq_tvm import tvm_shim as tv

from ._glue import (
    DATA_PAR,
    REDUCE,
    access_strides,
    bindings,
    child_blocks,
    contiguous_suffix,
    dtype_bytes,
    extent,
    is_matmul_like,
    is_spatial,
    is_window_reduction,
    iter_kinds,
    loop_kinds,
    open_schedule,
    pick_lanes,
    vector_bytes,
    widest_lanes,
    worth_parallel,
)

__all__ = ["RowReduction"]

tirx = tv.tirx


def _leading_spatial(kinds) -> int | None:
    """Number of leading spatial iterators of an ``S..SR..R`` block, else None."""
    n = 0
    while n < len(kinds) and kinds[n] == DATA_PAR:
        n += 1
    if n == len(kinds) or any(k != REDUCE for k in kinds[n:]):
        return None
    return n


def _plain_loops(sch, block) -> bool:
    """One loop per block iterator, bound in order (as legalisation emits them)."""
    loops = sch.get_loops(block)
    blk, bind = bindings(sch, block)
    vals = [bind[iv.var] for iv in blk.iter_vars]
    return len(loops) == len(vals) and all(isinstance(v, tirx.Var) and v.same_as(sch.get(loop).loop_var)
                                           for loop, v in zip(loops, vals))


class RowReduction(tv.s_tir.dlight.ScheduleRule):
    """Reductions over the trailing axes and their elementwise neighbours,
    one parallel row at a time (see the module docstring)."""

    def apply(self, func, target, _tunable):
        sch = open_schedule(func, target)
        if sch is None:
            return None
        blocks = child_blocks(sch)
        reds = [b for b in blocks if not is_spatial(sch, b)]
        if not reds:
            return None
        rows = None
        for r in reds:
            n = _leading_spatial(iter_kinds(sch, r))
            if not n or not _plain_loops(sch, r) or is_matmul_like(sch.get(r)) or is_window_reduction(sch, r):
                return None
            # the innermost reduced axis must walk memory contiguously
            if any(st[-1] not in (0, 1) for _buf, st in access_strides(sch, r)[:-1]):
                return None
            rows = n if rows is None else min(rows, n)
        try:
            return self._schedule(sch, target, rows)
        except Exception:  # noqa: BLE001  (a shape the row structure does not fit: not ours)
            return None

    def _schedule(self, sch, target, rows: int):
        for b in child_blocks(sch)[:-1]:
            if is_spatial(sch, b) and len(sch.get_consumers(b)) == 1:
                try:
                    sch.compute_inline(b)
                except Exception:  # noqa: BLE001  (kept as a per-row buffer)
                    pass
        for r in [b for b in child_blocks(sch) if not is_spatial(sch, b)]:
            _rfactor(sch, r, vector_bytes(target))
        parallel = worth_parallel(sch, child_blocks(sch))
        last = child_blocks(sch)[-1]  # elementwise, or the reduction itself (a plain sum/max)
        lead = sch.get_loops(last)[:rows]
        if any(k != DATA_PAR for k in loop_kinds(sch, last, lead)):
            return None
        row = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        for b in reversed(child_blocks(sch)[:-1]):
            sch.compute_at(b, row, preserve_unit_loops=True)
        for b in list(sch.get_child_blocks(row)):
            _vectorize(sch, b, row, target)
        if parallel and (extent(sch, row) or 2) > 1:
            sch.parallel(row)
        return sch


def _rfactor(sch, block, vbytes: int) -> None:
    """Split the reduced axes into vector lanes of partial results."""
    loops = sch.get_loops(block)
    red = loops[_leading_spatial(iter_kinds(sch, block)):]
    k = sch.fuse(*red) if len(red) > 1 else red[0]
    lanes = pick_lanes(extent(sch, k), vbytes // dtype_bytes(sch.get(block).body.buffer.dtype))
    if not lanes or extent(sch, k) < 2 * lanes:
        return
    _ko, ki = sch.split(k, [None, lanes])
    sch.rfactor(ki, factor_axis=len(loops) - len(red))


def _vectorize(sch, block, row, target) -> None:
    """Under the row loop: vectorise the lane loop of an rfactor block, or the
    innermost loop of an elementwise one when its accesses are contiguous."""
    loops = list(sch.get_loops(block))
    at = [i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(row))]
    inner = [loop for loop in loops[at[0] + 1:] if extent(sch, loop) != 1] if at else []
    if not inner:
        return
    if not is_spatial(sch, block):
        kinds = loop_kinds(sch, block, inner)
        if REDUCE not in kinds or DATA_PAR not in kinds:  # a write-back over the lanes, or not split
            return
        # compute_at orders the loops as the iterators: put the lanes innermost
        sch.reorder(*[loop for loop, k in zip(inner, kinds) if k != DATA_PAR],
                    *[loop for loop, k in zip(inner, kinds) if k == DATA_PAR])
        sch.vectorize(sch.get_loops(block)[-1])  # the init (at the first k) is vectorised with it
        return
    if not contiguous_suffix(sch, block, inner[-1:]):
        return
    lanes = pick_lanes(extent(sch, inner[-1]), widest_lanes(sch, block, target))
    if not lanes:
        return
    vec = sch.split(inner[-1], [None, lanes])[1] if extent(sch, inner[-1]) > lanes else inner[-1]
    sch.vectorize(vec)
