"""Default CPU schedule for matmuls that are not weight kernels.

Attention scores and context (``Q.K^T``, ``P.V``) multiply two activations, so
:mod:`passes.fold_qdq` leaves them as plain Relax matmuls of integer codes (an
exact int32 matmul plus one float rescale), and legalisation turns them into
PrimFuncs such as ``fused_matmul_cast3_multiply1_multiply2``::

    C[b.., i, j] += A[b.., i, k] * B[b.., k, j]      (or B[b.., j, k])
    E[b.., i, j]  = f(C[b.., i, j])                  (cast, rescale, ... : optional)

:class:`Matmul` recognises that shape (int32, int8/uint8/int16 codes cast to
int32, or float32; batch dims on either operand, broadcast ones included) and
gives it a register-blocked schedule:

* an ``MR x (NV * VL)`` output tile, ``VL`` = 32-bit lanes of the target's widest
  vector unit (16 with AVX-512, 8 with AVX2, 4 with NEON/SSE), the k loop outside
  the tile and the tile fully unrolled and vectorised along j;
* the accumulator tile in a small ``global`` buffer (< 1 KiB: TVM allocates it on
  the stack and LLVM keeps it in registers), written back once per tile;
* the elementwise epilogue (cast, scale, add, quantise...) computed from the tile
  right after its k loop, instead of as a second pass over memory;
* a transposed ``B[b.., j, k]`` is first repacked to ``[b.., k, j]`` (one pass over
  B, ``1/M`` of the matmul's work) so the tile still loads contiguous j vectors;
* one parallel loop over all (batch, row tile, column tile) tasks;
* shapes that do not fill whole tiles are computed on zero-padded copies of the
  operands (``pad_einsum``), so the hot loop never tests bounds.

Integer products and sums stay in int32 exactly as written: nothing is
reassociated into a narrower type, so the result is bit-exact. (With int32
operands the tile is bound by ``vpmulld``: ~40 us for the 4.2 M MACs of a BERT
score matmul on one znver5 core. Narrow operands cast in the kernel are slower,
not faster, because every load is widened first: keep int32 codes unless a
VNNI/dot-product kernel is written for them.)

Returns ``None`` ("not mine") for anything else: other reductions, matmuls with
symbolic shapes, non-llvm targets.
"""
from __future__ import annotations

from dataclasses import dataclass

from soniq_tvm import tvm_shim as tv

from . import _isa
from ._glue import child_blocks, extent, vector_bytes

__all__ = ["Matmul", "MatmulInfo", "match_matmul", "vector_lanes"]

tirx = tv.tirx

_ACC_BYTES = 1024  # tvm allocates buffers below this on the stack (kMaxStackAlloca)
_MIN_PARALLEL_MACS = _isa.MIN_PARALLEL_MACS
_INT_CODES = ("int8", "uint8", "int16", "uint16", "int32")
_realize = tv.sblock_realize
# the class of a buffer load (``tirx.BufferLoad`` is only a constructor in 0.27)
_Load = tv.BufferLoad


def _dtype(expr) -> str:
    return str(expr.ty if hasattr(expr, "ty") else expr.dtype)


def _loaded(load):
    """The buffer a load or region reads (``source`` in 0.27, ``buffer`` before)."""
    return load.source if hasattr(load, "source") else load.buffer


@dataclass(frozen=True)
class MatmulInfo:
    """What :func:`match_matmul` found. Axes are block iter-var indices."""

    batch: tuple          # iter-var indices of the batch axes
    i: int
    j: int
    k: int
    extents: tuple        # every iter var's extent
    b_index: int          # which read buffer is B (the one indexed by j)
    b_transposed: bool    # B is [.., j, k]
    dtype: str            # accumulator dtype


def vector_lanes(target) -> int:
    """32-bit lanes of the widest vector unit ``target`` has (16 AVX-512, 8 AVX2, 4 NEON/SSE)."""
    return vector_bytes(target) // 4


# ---- matching -----------------------------------------------------------------

def _const_int(e):
    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _operand(expr, acc_dtype):
    """(BufferLoad, source dtype) of one factor, or None: a load, maybe cast."""
    if isinstance(expr, tirx.Cast):
        if _dtype(expr) != acc_dtype:
            return None
        inner = expr.value
        if not isinstance(inner, _Load):
            return None
        src = _dtype(inner)
        ok = src in _INT_CODES if acc_dtype == "int32" else src in ("float16", "float32")
        return (inner, src) if ok else None
    if isinstance(expr, _Load) and _dtype(expr) == acc_dtype:
        return expr, acc_dtype
    return None


def _var_positions(indices, var_index):
    """Iter-var index of each buffer index (None for a constant 0), or False."""
    out = []
    for e in indices:
        if isinstance(e, tirx.Var) and e in var_index:
            out.append(var_index[e])
        elif _const_int(e) == 0:
            out.append(None)
        else:
            return False
    return out


def match_matmul(sch, block) -> MatmulInfo | None:
    """``block`` as a matmul, or None. See the module docstring for the shape."""
    stmt = sch.get(block)
    ivs = list(stmt.iter_vars)
    red = [n for n, iv in enumerate(ivs) if iv.iter_type != 0]
    if len(red) != 1 or any(iv.iter_type not in (0, 2) for iv in ivs):  # 2: CommReduce
        return None
    extents = tuple(_const_int(iv.dom.extent) for iv in ivs)
    if any(e is None for e in extents) or any(_const_int(iv.dom.min) != 0 for iv in ivs):
        return None
    # loops must be the iter vars one to one (no fused or split bindings yet)
    loops = sch.get_loops(block)
    values = list(_realize(sch, block).iter_values)
    if len(loops) != len(ivs) or [sch.get(lp).loop_var for lp in loops] != values:
        return None
    store = stmt.body
    init = stmt.init
    if not isinstance(store, tirx.BufferStore) or not isinstance(init, tirx.BufferStore):
        return None
    acc_dtype = str(store.buffer.dtype)
    if acc_dtype not in ("int32", "float32") or not init.buffer.same_as(store.buffer):
        return None
    zero = init.value
    if not (isinstance(zero, (tirx.IntImm, tirx.FloatImm)) and zero.value == 0):
        return None
    var_index = {iv.var: n for n, iv in enumerate(ivs)}
    c_pos = _var_positions(store.indices, var_index)
    if c_pos is False or None in c_pos or len(set(c_pos)) != len(c_pos) or red[0] in c_pos:
        return None
    if len(c_pos) != len(ivs) - 1 or len(c_pos) < 2:
        return None
    add = store.value
    if not isinstance(add, tirx.Add):
        return None
    self_load = tirx.BufferLoad(store.buffer, store.indices)
    prod = None
    for acc_side, other in ((add.a, add.b), (add.b, add.a)):
        if tv.structural_equal(acc_side, self_load):
            prod = other
    if not isinstance(prod, tirx.Mul):
        return None
    ops = [_operand(prod.a, acc_dtype), _operand(prod.b, acc_dtype)]
    if None in ops:
        return None
    k = red[0]
    *batch, i, j = c_pos
    pos = []
    for load, _src in ops:
        p = _var_positions(load.indices, var_index)
        if p is False or len(p) < 2:
            return None
        pos.append(p)
    # which factor is A (indexed by i, k) and which is B (by k, j)
    if pos[0][-2:] == [i, k] and pos[1][-2:] in ([k, j], [j, k]):
        a_n, b_n = 0, 1
    elif pos[1][-2:] == [i, k] and pos[0][-2:] in ([k, j], [j, k]):
        a_n, b_n = 1, 0
    else:
        return None
    for p in pos:  # leading dims: batch axes (in order) or broadcast zeros
        lead = [q for q in p[:-2] if q is not None]
        if any(q not in batch for q in lead) or lead != sorted(lead, key=batch.index):
            return None
    if _loaded(ops[0][0]).same_as(store.buffer) or _loaded(ops[1][0]).same_as(store.buffer):
        return None
    b_load = ops[b_n][0]
    reads = [_loaded(r) for r in stmt.reads]
    b_index = next((n for n, buf in enumerate(reads) if buf.same_as(_loaded(b_load))), None)
    a_load = ops[a_n][0]
    if b_index is None or _loaded(a_load).same_as(_loaded(b_load)):
        return None
    return MatmulInfo(batch=tuple(batch), i=i, j=j, k=k, extents=extents, b_index=b_index,
                      b_transposed=pos[b_n][-2:] == [j, k], dtype=acc_dtype)


# ---- scheduling -------------------------------------------------------------

def _tile(m: int, n: int, lanes: int, rows=None, vectors=None):
    """(MR, NV, VL): a tile of MR rows x NV vectors of VL 32-bit lanes whose
    accumulators fit one stack buffer (and the register file)."""
    vl = lanes
    while vl > 4 and n % vl and n < 2 * vl:  # narrow outputs: narrower vectors
        vl //= 2
    nv = vectors or (2 if n % (2 * vl) == 0 else 1)
    if rows is None:
        cap = min((_ACC_BYTES - 1) // (4 * nv * vl), 8 if nv == 1 else 6)
        # the fewest padded rows, then the most rows per tile
        rows = min(range(max(1, cap // 2), cap + 1), key=lambda r: (-(-m // r) * r, -r))
    return max(1, min(rows, m)), nv, vl


class Matmul(tv.s_tir.dlight.ScheduleRule):
    """(Batched) matmul + elementwise epilogue: register-blocked, vectorised, fused.

    ``rows`` / ``vectors`` force the tile (rows x vectors of the target's lanes);
    by default they are derived from the shape and the target."""

    def __init__(self, rows: int | None = None, vectors: int | None = None):
        self.rows, self.vectors = rows, vectors

    def apply(self, func, target, _tunable):
        if target is None or target.kind.name != "llvm" or not isinstance(func, tv.PrimFunc):
            return None
        for fuse in (True, False):  # an epilogue that cannot join the tile runs after it
            try:
                return self._schedule(func, target, fuse)
            except (ValueError, RuntimeError):  # a primitive refused (ScheduleError is a RuntimeError)
                continue
        return None

    def _schedule(self, func, target, fuse_epilogue: bool):
        sch = tv.s_tir.Schedule(func)
        blocks = child_blocks(sch)
        reductions = [b for b in blocks if _is_reduction(sch, b)]
        if len(reductions) != 1:
            return None
        mm = reductions[0]
        for b in blocks[:blocks.index(mm)]:  # producers (casts) read straight from the inputs
            sch.compute_inline(b)
        info = match_matmul(sch, mm)
        if info is None:
            return None
        if any(_is_reduction(sch, b) for b in _blocks_after(sch, mm)):
            return None
        ext = info.extents
        mr, nv, vl = _tile(ext[info.i], ext[info.j], vector_lanes(target), self.rows, self.vectors)
        pad = [1] * len(ext)
        pad[info.i] = mr if ext[info.i] % mr else 1
        pad[info.j] = nv * vl if ext[info.j] % (nv * vl) else 1
        parallel = _macs(ext) >= _MIN_PARALLEL_MACS
        if pad != [1] * len(ext):  # ragged tiles: compute on zero-padded copies instead
            info = _pad(sch, mm, pad, parallel)
            if info is None:
                return None
            ext = info.extents
        rest = _blocks_after(sch, mm)  # the un-padding copy (if any), then the epilogue
        if info.b_transposed:
            _pack_b(sch, mm, info.b_index, parallel)

        loops = sch.get_loops(mm)
        b_loops = [loops[q] for q in info.batch]
        io, ii = sch.split(loops[info.i], [None, mr])
        jo, jv, jl = sch.split(loops[info.j], [None, nv, vl])
        lk = loops[info.k]
        sch.reorder(*b_loops, io, jo, lk, ii, jv, jl)
        tile = sch.fuse(*b_loops, io, jo)  # one task per output tile
        if parallel and _extent(sch, tile) > 1:
            sch.parallel(tile)
        sch.unroll(ii)
        sch.unroll(jv)
        sch.vectorize(jl)  # before decompose_reduction: vectorize needs the init

        # accumulators: a tile-sized buffer (compacted to MR x NV*VL after compute-at)
        acc = sch.cache_write(mm, 0, "global")
        for b in rest[:-1]:
            sch.compute_inline(b)
        if rest and fuse_epilogue:
            sch.compute_inline(acc)  # the epilogue reads the accumulator tile directly
            out = child_blocks(sch)[-1]
        else:
            out = acc
        sch.reverse_compute_at(out, tile, preserve_unit_loops=True)
        init = sch.decompose_reduction(mm, lk)
        *_, r, v, lanes = sch.get_loops(init)
        sch.unroll(r)
        sch.unroll(v)
        sch.vectorize(lanes)
        tile_loop = sch.get(tile)
        inner = sch.get_loops(out)
        inner = inner[next(n for n, lp in enumerate(inner) if sch.get(lp).same_as(tile_loop)) + 1:]
        j_o, j_l = sch.split(inner[-1], [None, vl])
        for lp in (*inner[:-1], j_o):
            sch.unroll(lp)
        sch.vectorize(j_l)
        if rest and not fuse_epilogue:
            _parallel_vectorized(sch, child_blocks(sch)[-1], vl, parallel)
        return sch


def _pad(sch, mm, pad, parallel: bool):
    """Pad the matmul's i/j domain to whole tiles (``pad_einsum``): the operands
    are copied into zero-padded buffers (parallel loops), the tile loops carry no
    bounds checks, and only the epilogue tests which outputs are real."""
    sch.pad_einsum(mm, pad)
    for b in child_blocks(sch):
        if sch.get(b).name_hint == sch.get(mm).name_hint:
            break
        loops = sch.get_loops(b)
        if parallel and len(loops) > 1:
            outer = sch.fuse(*loops[:-1])
            if _extent(sch, outer) > 1:
                sch.parallel(outer)
    return match_matmul(sch, mm)


def _pack_b(sch, mm, b_index: int, parallel: bool):
    """Copy B[.., j, k] into a [.., k, j] buffer the tile loads contiguously
    (one pass over B: 1/M of the matmul). Transposed in 16 x 16 blocks so both
    the strided reads and the vector writes stay in L1."""
    packed = sch.cache_read(mm, b_index, "global")
    for producer in sch.get_producers(packed):  # a zero-padded copy of B: pad while packing
        sch.compute_inline(producer)
    sch.transform_layout(packed, ("write", 0), lambda *ax: (*ax[:-2], ax[-1], ax[-2]))
    *lead, lj, lk = sch.get_loops(packed)
    jo, ji = sch.split(lj, [None, 16])
    ko, ki = sch.split(lk, [None, 16])
    sch.reorder(*lead, jo, ko, ki, ji)
    sch.vectorize(ji)
    outer = sch.fuse(*lead, jo)
    if parallel and _extent(sch, outer) > 1:
        sch.parallel(outer)


def _parallel_vectorized(sch, block, vl: int, parallel: bool):
    """An epilogue left as its own pass: parallel rows, vectorised along j."""
    *lead, j = sch.get_loops(block)
    if lead and parallel:
        outer = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        if _extent(sch, outer) > 1:
            sch.parallel(outer)
    if _extent(sch, j) % vl == 0:
        sch.vectorize(sch.split(j, [None, vl])[1])


def _macs(extents) -> int:
    n = 1
    for e in extents:
        n *= e
    return n


def _extent(sch, loop) -> int:
    return extent(sch, loop) or 0  # a symbolic extent: 0


def _is_reduction(sch, block) -> bool:
    return any(iv.iter_type != 0 for iv in sch.get(block).iter_vars)


def _blocks_after(sch, block):
    """Root blocks after ``block``, in order."""
    blocks = child_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    return blocks[names.index(sch.get(block).name_hint) + 1:]
