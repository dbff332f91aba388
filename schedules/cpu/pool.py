"""Default CPU schedule for sliding-window pooling (max/avg pool 1d/2d/3d, any layout).

Legalisation writes ``max_pool2d`` as a padding block and a window reduction::

    pad[n, c, y, x] = if_then_else(1 <= y < H + 1 and 1 <= x < W + 1, X[n, c, y - 1, x - 1], -inf)
    out[n, c, h, w] = max over (r, s) of pad[n, c, h * 2 + r, w * 2 + s]

(``avg_pool2d`` adds, then divides in a spatial block after it). :class:`Pool`:

* inlines the padding into the reduction, then splits ("loop_partition") the
  two innermost output loops into border and interior ranges: in the interior
  every window is inside the input, so the padding condition simplifies away
  and no branch is left in the inner loop;
* fully unrolls the window inside the innermost output loop, which stays a
  plain scalar loop. LLVM's loop vectoriser turns its stride-``s`` loads into
  wide loads and shuffles (``vpermt2ps``), which TVM's own ``vectorize`` cannot
  do (it scalarises a strided ramp or emits gathers);
* runs the loops outside the window rows (batch x channels) in parallel;
* schedules epilogue blocks (the average's division, a quantisation) like any
  elementwise block (:func:`._glue.vectorize_inner`).

Returns ``None`` ("not mine") unless the function has exactly one reduction,
whose update is ``max(acc, x)``/``acc + x`` of a single load indexed by
``output * stride + window`` terms.
"""
from __future__ import annotations

from soniq_tvm import tvm_shim as tv

from ._glue import (
    REDUCE,
    Load,
    arith,
    bindings,
    child_blocks,
    extent,
    is_matmul_like,
    is_spatial,
    is_window_reduction,
    iter_kinds,
    loaded_buffer,
    open_schedule,
    subst_vars,
    uses,
    vectorize_inner,
    work,
    worth_parallel,
)

__all__ = ["Pool"]

tirx = tv.tirx
_MAX_UNROLL = 64  # window positions unrolled into the innermost loop
_MAX_SCAN = 4096  # longest output axis whose border/interior split is searched point by point


def _loads(expr) -> list:
    found = []
    tv.structural_walk(expr, lambda n: found.append(n) if isinstance(n, Load) else None)
    return found


def _is_pool_update(block) -> bool:
    """``acc = max(acc, f(x))`` or ``acc = acc + f(x)``, ``f(x)`` reading without products."""
    store = block.body
    value = getattr(store, "value", None)
    if not isinstance(value, (tirx.Max, tirx.Add)):
        return False
    acc = [t for t in (value.a, value.b) if isinstance(t, Load) and loaded_buffer(t).same_as(store.buffer)]
    if len(acc) != 1:
        return False
    other = value.b if acc[0].same_as(value.a) else value.a
    products = []
    tv.structural_walk(other, lambda n: products.append(n) if isinstance(n, tirx.Mul) and _loads(n) else None)
    return bool(_loads(other)) and not products


def _condition_atoms(expr) -> list:
    """The conjuncts of every ``if_then_else`` condition in ``expr`` (the padding)."""
    atoms = []

    def split(c):
        if isinstance(c, tirx.And):
            split(c.a)
            split(c.b)
        else:
            atoms.append(c)

    def visit(n):
        if isinstance(n, tv.tvm.ir.expr.Call) and str(getattr(n.op, "name", "")).endswith("if_then_else"):
            split(n.args[0])  # ``prim.if_then_else`` in 0.27, ``tir.if_then_else`` before

    tv.structural_walk(expr, visit)
    return atoms


def _interior(sch, block, loop, window_loops) -> tuple[int, int] | None:
    """[lo, hi) (offsets from the loop start) over which every padding
    condition on ``loop`` holds for the whole window; None when none depends on it."""
    blk, bind = bindings(sch, block)
    var = sch.get(loop).loop_var
    atoms = [a for a in (subst_vars(a, bind) for a in _condition_atoms(blk.body)) if uses(a, var)]
    ext = extent(sch, loop)
    if not atoms or ext is None or ext > _MAX_SCAN:
        return None
    ana = arith.Analyzer()
    for w in window_loops:
        f = sch.get(w)
        ana.bind(f.loop_var, tv.tvm.ir.Range.from_min_extent(f.min, f.extent))
    start, dtype = int(sch.get(loop).min), str(var.ty)
    good = [all(ana.can_prove(subst_vars(a, {var: tirx.const(start + p, dtype)})) for a in atoms)
            for p in range(ext)]
    if True not in good:
        return 0, 0
    lo = good.index(True)
    hi = lo
    while hi < ext and good[hi]:
        hi += 1
    return lo, hi


def _partition(sch, loop, span) -> list:
    """Split ``loop`` at the ends of ``span``; returns the loops (one if no split)."""
    ext = extent(sch, loop)
    if span is None or span == (0, ext):
        return [loop]
    lo, hi = span
    cuts = [c for c in (lo, hi - lo) if c > 0]
    if sum(cuts) >= ext:
        cuts = cuts[:-1]
    if not cuts:
        return [loop]
    return list(sch.loop_partition(loop, [*cuts, None]))


class Pool(tv.s_tir.dlight.ScheduleRule):
    """Window reductions (see the module docstring)."""

    def apply(self, func, target, _tunable):
        sch = open_schedule(func, target)
        if sch is None:
            return None
        reds = [b for b in child_blocks(sch) if not is_spatial(sch, b)]
        if len(reds) != 1:
            return None
        red = reds[0]
        kinds = iter_kinds(sch, red)
        n_s = kinds.index(REDUCE) if REDUCE in kinds else len(kinds)
        if (n_s < 1 or n_s == len(kinds) or any(k != REDUCE for k in kinds[n_s:])
                or is_matmul_like(sch.get(red)) or not _is_pool_update(sch.get(red))
                or not is_window_reduction(sch, red)):
            return None
        try:
            return self._schedule(sch, target, red, n_s)
        except Exception:  # noqa: BLE001  (a structure the steps below do not fit: not ours)
            return None

    def _schedule(self, sch, target, red, n_s: int):
        for b in child_blocks(sch):  # padding (and any elementwise prologue) into the window loads
            if is_spatial(sch, b) and any(c.same_as(sch.get(red)) for c in map(sch.get, sch.get_consumers(b))):
                sch.compute_inline(b)
        epilogue = [b for b in child_blocks(sch) if is_spatial(sch, b)]  # the average's division, a requantisation
        loops = sch.get_loops(red)
        if len(loops) != len(iter_kinds(sch, red)):
            return None
        parallel = worth_parallel(sch, child_blocks(sch))
        spatial, window = list(loops[:n_s]), list(loops[n_s:])
        inner = spatial[-2:]
        outer = spatial[: len(spatial) - len(inner)]
        par = sch.fuse(*outer) if len(outer) > 1 else (outer[0] if outer else None)
        if par is not None and parallel and (extent(sch, par) or 2) > 1:
            sch.parallel(par)  # before decompose_reduction: parallel needs a complete/reduction subtree
        unroll = work(sch, window) <= _MAX_UNROLL
        leaves = [red]  # border / interior ranges of the innermost output axes
        for k in range(len(inner)):
            nxt = []
            for blk in leaves:
                blk_loops = sch.get_loops(blk)
                axis = blk_loops[len(blk_loops) - len(window) - len(inner) + k]
                span = _interior(sch, blk, axis, blk_loops[-len(window):])
                for part in _partition(sch, axis, span):
                    nxt.extend(sch.get_child_blocks(part))
            leaves = nxt
        for blk in leaves:
            win = sch.get_loops(blk)[-len(window):]
            sch.decompose_reduction(blk, win[0])
            if unroll:  # the whole window inside the innermost output loop, which LLVM vectorises
                for w in win:
                    sch.unroll(w)
        for b in epilogue[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001  (kept as its own loop nest)
                pass
        for b in epilogue:
            try:
                vectorize_inner(sch, b, target)
            except Exception:  # noqa: BLE001  (inlined above)
                pass
        return sch
