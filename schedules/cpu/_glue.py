"""Helpers shared by the default CPU rules (:mod:`.generic`, :mod:`.reduction`, :mod:`.pool`).

The central one is :func:`access_strides`: for each buffer a block reads or
writes, the step of its flattened address per iteration of each loop around
the block (``None`` where the address is not affine in that loop: a gather, a
``//`` or ``%`` of the loop). The rules vectorise only loops along which every
access steps by 0 (a broadcast) or 1 (contiguous), and fuse a loop into the
vector loop only where that keeps every access contiguous.
"""
from __future__ import annotations

from soniq_tvm import tvm_shim as tv

from . import _isa
from .fastmath import substitute

tirx = tv.tirx
arith = getattr(tv.tvm, "sym", None) or getattr(tv.tvm, "arith")  # ``tvm.arith`` before 0.27
Load = tv.BufferLoad  # the class of a buffer load (TensorLoad in 0.27)
_realize = tv.sblock_realize

# Below these a loop nest runs on one thread: waking the pool costs about what it saves on 2
# cores, and a busy second core makes a parallel loop wait for it (measured on the BERT and
# ResNet glue). Reductions and pools: bytes read and written; elementwise blocks: expression
# nodes per iteration x iterations / vector lanes (a pure int8 copy stays serial, a gather or a
# quantising epilogue of the same size does not).
MIN_PARALLEL_BYTES = 256 << 10
MIN_PARALLEL_OPS = 8192
_SYMBOLIC = 1 << 16  # iterations assumed for a loop of symbolic extent
DATA_PAR, REDUCE = 0, 2  # IterVar.iter_type of a spatial / a commutative-reduction iterator


def is_llvm(target) -> bool:
    return target is not None and target.kind.name == "llvm"


def open_schedule(func, target):
    """A schedule of ``func`` (exp/erf/tanh/sigmoid made vectorisable), or None
    when it is not an llvm PrimFunc with a root block."""
    if not is_llvm(target) or not isinstance(func, tv.PrimFunc):
        return None
    sch = tv.s_tir.Schedule(substitute(func))
    return sch if child_blocks(sch) else None


def child_blocks(sch) -> list:
    try:
        return list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # noqa: BLE001  (no root block: a lowered or hand-written function)
        return []


def extent(sch, loop):
    ext = sch.get(loop).extent
    return int(ext) if hasattr(ext, "value") or isinstance(ext, int) else None


def work(sch, loops) -> int:
    """Iterations of ``loops`` (a symbolic extent counts as large)."""
    n = 1
    for loop in loops:
        e = extent(sch, loop)
        n *= e if e is not None else _SYMBOLIC
    return n


def traffic(sch, blocks) -> int:
    """Bytes the ``blocks`` load and store, counting every access once per
    iteration (an upper bound: loads that hit the same element repeat)."""
    total = 0
    for b in blocks:
        per_iter = sum(dtype_bytes(buf.dtype) for buf, _ in _accesses(sch.get(b)))
        total += work(sch, sch.get_loops(b)) * per_iter
    return total


def worth_parallel(sch, blocks) -> bool:
    return traffic(sch, blocks) >= MIN_PARALLEL_BYTES


def _ops(block) -> int:
    """Expression nodes computing ``block``'s stored value (a cost per iteration)."""
    n = [0]

    def visit(node):
        if isinstance(node, tv.tvm.ir.expr.Expr) and not isinstance(node, (tirx.Var, tirx.IntImm, tirx.FloatImm)):
            n[0] += 1

    tv.structural_walk(getattr(block.body, "value", block.body), visit)
    return max(1, n[0])


def iter_kinds(sch, block) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def is_spatial(sch, block) -> bool:
    return all(k == DATA_PAR for k in iter_kinds(sch, block))


def vector_bytes(target) -> int:
    """Bytes of the widest vector register of an llvm target."""
    feats = _isa.features(target)
    if "avx512f" in feats:
        return 64
    if "avx" in feats or "avx2" in feats:
        return 32
    return 16  # SSE, NEON, or unknown


def dtype_bytes(dtype) -> int:
    bits = tv.tvm.DataType(str(dtype).split("x")[0]).bits
    return max(1, bits // 8)


def try_inline(sch, blocks) -> list:
    """compute_inline each of ``blocks`` that can be; returns those left."""
    left = []
    for b in blocks:
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001  (not inlinable: it stays a block)
            left.append(b)
    return left


# ---- access analysis -------------------------------------------------------

def loaded_buffer(load):
    """The buffer a load reads (``source`` in 0.27, ``buffer`` before)."""
    return load.source if hasattr(load, "source") else load.buffer


def bindings(sch, block) -> tuple[object, dict]:
    """(the block, {block iterator: the loop expression it is bound to})."""
    realize = _realize(sch, block)
    return realize.block, {iv.var: val for iv, val in zip(realize.block.iter_vars, realize.iter_values)}


def subst_vars(expr, mapping: dict):
    """``expr`` with the variables in ``mapping`` replaced."""
    return tv.structural_map(expr, [(tirx.Var, lambda v: mapping.get(v, v))])


def loop_kinds(sch, block, loops) -> list:
    """The iterator kind each of ``loops`` drives in ``block`` (None: several or none)."""
    blk, bind = bindings(sch, block)
    kinds = []
    for loop in loops:
        var = sch.get(loop).loop_var
        found = [int(iv.iter_type) for iv in blk.iter_vars
                 if isinstance(bind[iv.var], tirx.Var) and bind[iv.var].same_as(var)]
        kinds.append(found[0] if len(found) == 1 else None)
    return kinds


def _strip_casts(expr):
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr


def is_matmul_like(block) -> bool:
    """``acc + A[..] * B[..]`` (casts allowed) with A and B two different loads:
    a contraction for :mod:`.matmul`, not a row reduction (``x * x`` is one)."""
    value = getattr(block.body, "value", None)
    if not isinstance(value, tirx.Add):
        return False
    for term in (value.a, value.b):
        term = _strip_casts(term)
        if isinstance(term, tirx.Mul):
            a, b = _strip_casts(term.a), _strip_casts(term.b)
            if isinstance(a, Load) and isinstance(b, Load) and not (
                    loaded_buffer(a).same_as(loaded_buffer(b))
                    and [str(i) for i in a.indices] == [str(i) for i in b.indices]):
                return True
    return False


def _accesses(block) -> list[tuple[object, list]]:
    """(buffer, indices) of every load in ``block``'s body and of its store."""
    found = []

    def visit(node):
        if isinstance(node, Load):
            found.append((loaded_buffer(node), list(node.indices)))
        elif isinstance(node, tirx.BufferStore):
            found.append((node.buffer, list(node.indices)))

    tv.structural_walk(block.body, visit)
    return found


def _flat(buffer, indices):
    shape = [s for s in buffer.shape]
    flat, stride = None, None
    for idx, dim in zip(reversed(indices), reversed(shape)):
        term = idx if stride is None else idx * stride
        flat = term if flat is None else flat + term
        stride = dim if stride is None else stride * dim
    return flat if flat is not None else tirx.const(0, "int64")


def access_strides(sch, block, loops=None) -> list[tuple[object, list]]:
    """For each access of ``block`` (loads, then the store): (buffer, per-loop
    address step), the step an int or None where not affine in that loop.
    ``loops``: the loops around ``block`` (all of them by default)."""
    loops = list(sch.get_loops(block)) if loops is None else loops
    blk, bind = bindings(sch, block)
    ana = arith.Analyzer()
    loop_vars = []
    for loop in loops:
        f = sch.get(loop)
        ana.bind(f.loop_var, tv.tvm.ir.Range.from_min_extent(f.min, f.extent))
        loop_vars.append(f.loop_var)

    out = []
    for buf, idx in _accesses(blk):
        flat = ana.simplify(subst_vars(_flat(buf, idx), bind))
        steps = []
        for var in loop_vars:
            coef = arith.detect_linear_equation(flat, [var])
            c = coef[0] if len(coef) == 2 else None
            steps.append(int(c.value) if c is not None and hasattr(c, "value") else None)
        out.append((buf, steps))
    return out


def uses(expr, var) -> bool:
    """Whether ``expr`` mentions ``var``."""
    hit = []
    tv.structural_walk(expr, lambda n: hit.append(1) if isinstance(n, tirx.Var) and n.same_as(var) else None)
    return bool(hit)


def is_window_reduction(sch, block) -> bool:
    """Whether a load of ``block`` indexes one axis by a spatial and a reduction
    iterator together (``h * stride + r``: pooling, convolution)."""
    blk = sch.get(block)
    spatial = [iv.var for iv in blk.iter_vars if int(iv.iter_type) == DATA_PAR]
    reduced = [iv.var for iv in blk.iter_vars if int(iv.iter_type) != DATA_PAR]
    for _buf, idx in _accesses(blk)[:-1]:
        for i in idx:
            if any(uses(i, v) for v in spatial) and any(uses(i, v) for v in reduced):
                return True
    return False


def index_divisors(sch, block, loop) -> list[int]:
    """Constant divisors ``d`` of ``x // d`` / ``x % d`` terms in ``block``'s
    access indices that involve ``loop``'s variable (reshapes, transposes)."""
    blk, bind = bindings(sch, block)
    var = sch.get(loop).loop_var
    found = set()

    def visit(node):
        if isinstance(node, (tirx.FloorDiv, tirx.FloorMod)) and hasattr(node.b, "value") and uses(node.a, var):
            found.add(int(node.b.value))

    for _buf, idx in _accesses(blk):
        for i in idx:
            tv.structural_walk(subst_vars(i, bind), visit)
    return sorted(found)


def contiguous_suffix(sch, block, loops) -> int:
    """How many innermost ``loops`` can be fused into one vector loop: along
    them every access steps by 0 or 1 and the store by 1, and each outer loop
    of the group continues the inner ones densely (or is a broadcast for
    accesses that broadcast in the inner ones). Unit loops always qualify."""
    strides = [steps for _buf, steps in access_strides(sch, block, loops)]
    if not loops or not strides:
        return 0
    count, span, first = 0, 1, None
    for k in range(len(loops) - 1, -1, -1):
        e = extent(sch, loops[k])
        if e == 1:
            count += 1
            continue
        if first is None:  # the innermost loop that steps
            ok = strides[-1][k] == 1 and all(st[k] in (0, 1) for st in strides)
            first = k
        else:
            ok = all(st[k] is not None and st[k] == (0 if st[first] == 0 else span * st[first]) for st in strides)
        if not ok:
            break
        count += 1
        if e is None:
            break
        span *= e
    return count


def _load_contiguous_loop(sch, block, loops) -> int | None:
    """The innermost of ``loops`` along which every load steps by 0 or 1 and
    one by 1 while the store does not (a transpose), or None."""
    strides = [steps for _buf, steps in access_strides(sch, block, loops)]
    loads, store = strides[:-1], strides[-1]
    for k in range(len(loops) - 1, -1, -1):
        if (extent(sch, loops[k]) or 1) > 1 and store[k] != 1 and all(st[k] in (0, 1) for st in loads) \
                and any(st[k] == 1 for st in loads):
            return k
    return None


def pick_lanes(total, widest: int) -> int:
    """Lanes for a vector loop of ``total`` iterations: ``widest`` when it
    divides, else the largest power of two >= 4 that does, else 0."""
    if total is None or total < 4:
        return 0
    lanes = widest
    while lanes >= 4:
        if total % lanes == 0:
            return lanes
        lanes //= 2
    return 0


def widest_lanes(sch, block, target) -> int:
    """Vector lanes for ``block``: the register width over its widest element."""
    widest = max([dtype_bytes(buf.dtype) for buf, _ in _accesses(sch.get(block))] or [4])
    return max(1, vector_bytes(target) // widest)


def vectorize_inner(sch, block, target, *, parallel: bool | None = None):
    """The generic loop nest for one block:

    * along the longest run of innermost loops in which every access is
      contiguous (or a broadcast), at most the two innermost ones that step are
      fused, split to the register width and vectorised (TVM folds the index
      of two fused loops back to a ramp, not of three: the lanes would gather);
    * when that leaves no whole vector of at least half the register, the run
      is fused into one scalar loop instead, which LLVM's loop vectoriser
      handles (remainders included);
    * when the store is not contiguous in the innermost loop but the loads are in
      another one (a transpose), that loop is moved innermost and vectorised:
      vector loads and arithmetic, the stores scattered lane by lane;
    * when nothing is contiguous (a gather) the innermost loop stays scalar;
    * the loops outside run fused, and in parallel when ``parallel`` (default:
      when the estimated cost reaches :data:`MIN_PARALLEL_OPS`).

    Returns the outer loop, or None."""
    loops = list(sch.get_loops(block))
    if not loops:
        return None
    n_vec = contiguous_suffix(sch, block, loops)
    if n_vec == 0:
        ext = extent(sch, loops[-1])
        divs = [d for d in index_divisors(sch, block, loops[-1]) if ext and 1 < d < ext and ext % d == 0]
        if divs:  # x // d, x % d of the innermost loop: split it there and look again
            loops = loops[:-1] + list(sch.split(loops[-1], [None, divs[0]]))
            n_vec = contiguous_suffix(sch, block, loops)
    cost = work(sch, loops) * _ops(sch.get(block))
    if n_vec == 0:  # a transposing store: vectorise where the loads are contiguous, scatter the stores
        k = _load_contiguous_loop(sch, block, loops)
        lanes = pick_lanes(extent(sch, loops[k]), widest_lanes(sch, block, target)) if k is not None else 0
        if lanes:
            rest = loops[:k] + loops[k + 1:]
            if rest:
                sch.reorder(*rest, loops[k])
            vo, vi = sch.split(loops[k], [None, lanes])
            sch.vectorize(vi)
            par = sch.fuse(*rest, vo) if rest else vo
            if parallel or parallel is None and cost // lanes >= MIN_PARALLEL_OPS:
                sch.parallel(par)
            return par
    first = len(loops) - n_vec  # index of the outermost loop of the contiguous run
    stepping = [k for k in range(first, len(loops)) if extent(sch, loops[k]) != 1]
    start = stepping[-2] if len(stepping) >= 2 else (stepping[0] if stepping else len(loops))
    static = all(extent(sch, loop) is not None for loop in loops[start:])
    widest = widest_lanes(sch, block, target)
    lanes = pick_lanes(work(sch, loops[start:]), widest) if stepping and static else 0
    if lanes < widest // 2:  # e.g. 4 of 16 lanes (14 x 14 planes): LLVM does better with remainders
        lanes = 0
    if lanes:
        fused = sch.fuse(*loops[start:]) if len(loops) - start > 1 else loops[start]
        if extent(sch, fused) > lanes:
            vo, vi = sch.split(fused, [None, lanes])
            outer = loops[:start] + [vo]
        else:
            vi, outer = fused, loops[:start]
        sch.vectorize(vi)
        cost //= lanes
    elif stepping:  # contiguous but no whole vector: one scalar loop for LLVM to vectorise
        cut = first
        if work(sch, loops[:first]) == 1 and len(stepping) > 1:
            cut = stepping[0] + 1  # keep the outermost stepping loop outside, to run in parallel
        if len(loops) - cut > 1:
            sch.fuse(*loops[cut:])
        outer = loops[:cut]
    else:  # the innermost loop gathers: it stays serial, the ones outside it run in parallel
        outer = loops[:-1] if len(loops) > 1 else loops
    if not outer:
        return None
    par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if parallel is None:
        parallel = cost >= MIN_PARALLEL_OPS
    if parallel and (extent(sch, par) or 2) > 1:
        sch.parallel(par)
    return par
