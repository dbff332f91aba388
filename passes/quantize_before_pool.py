"""Phase 8: max-pool the 8-bit codes, not the floats they came from.

A QDQ model quantizes after a max-pool: ResNet's stem is
``relu(rescale(conv)) -> max_pool2d -> quantize -> clamp -> next conv``, so the
pool reads and writes float32 (64 x 112 x 112 of them) only for the quantize to
turn its result into 8-bit codes. Quantizing is monotone non-decreasing in ``x``
when the scale is positive (divide by ``s > 0``, round, add a zero point,
saturate), and a monotone non-decreasing ``q`` commutes with ``max`` exactly:
``q(max(a, b)) == max(q(a), q(b))``, float rounding included. So

    quantize(max_pool(x), s, z)  ==  max_pool(quantize(x, s, z))

bit for bit, provided that every pooling window holds at least one real element
(padding pixels are -inf for floats but the dtype's minimum code for integers,
and a window of padding only would read differently): dilation 1, no
``ceil_mode``, and each padding smaller than the window. The quantize then fuses
into the elementwise chain before it (the conv's rescale), and the pool moves a
quarter of the bytes.

Rewrites ``quantize(max_pool{1,2,3}d(x), s, z)`` where the pool's result has no
other use, ``s`` is a constant with every value > 0, and a per-channel scale or
zero point lies along an axis the pool does not reduce. Leaves everything else
alone: average pools (not monotone in this sense), pools whose float result is
used elsewhere (both would then run), non-constant or non-positive scales.
Runs after the kernels are placed (phase 7), before dead-code elimination, which
drops the float pool.
"""
from __future__ import annotations

import numpy as np

from soniq_tvm import tvm_shim as tv

from ._common import bound_value, module_pass

__all__ = ["QuantizeBeforePool"]

_Q = tv.op("quantize")
_MAX_POOLS = {tv.op(f"nn.max_pool{d}d") for d in (1, 2, 3)}


def _use_counts(func) -> dict:
    """How many times each Relax var is read in ``func`` (call arguments, tuple
    fields, the function's result)."""
    counts: dict = {}

    def read(e):
        if isinstance(e, tv.relax.Var):
            counts[e] = counts.get(e, 0) + 1

    def visit(e):
        if isinstance(e, tv.relax.Call):
            for a in e.args:
                read(a)
        elif isinstance(e, tv.relax.Tuple):
            for f in e.fields:
                read(f)
        elif isinstance(e, tv.relax.TupleGetItem):
            read(e.tuple_value)
        elif isinstance(e, tv.relax.SeqExpr):
            read(e.body)

    tv.relax.analysis.post_order_visit(func.body, visit)
    return counts


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def _windows_all_real(attrs) -> bool:
    """Every window overlaps the input: no window reads padding only."""
    size = _ints(attrs.pool_size)
    pads = _ints(attrs.padding)
    if any(d != 1 for d in _ints(attrs.dilation)) or bool(attrs.ceil_mode):
        return False
    begin, end = pads[: len(size)], pads[len(size):]
    return all(b < k and e < k for b, e, k in zip(begin, end, size))


def _pooled_axes(attrs, ndim: int) -> set[int]:
    layout = str(attrs.layout)
    if len(layout) != ndim:
        return set(range(ndim))  # sub-divided layouts (NCHW16c): assume any axis
    return {i for i, c in enumerate(layout) if c in "DHW"}


def _per_axis_ok(expr, axis: int, ndim: int, pooled: set[int]) -> bool:
    """A scalar, or a vector along an axis the pool does not reduce."""
    if not tv.is_const(expr):
        return False
    if tv.const_value(expr).size == 1:
        return True
    return (axis % ndim) not in pooled


@tv.mutator
class _QuantizeBeforePool(tv.PyExprMutator):
    def __init__(self, mod=None):
        super().__init__(mod)
        self._uses: dict = {}

    def visit_function_(self, func):
        self._uses = _use_counts(func)
        return super().visit_function_(func)

    def visit_call_(self, call):
        single_use = call.op == _Q and self._uses.get(call.args[0], 0) == 1  # counted on the input function
        call = super().visit_call_(call)
        if not single_use:
            return call
        data, scale, zero = call.args
        pool = bound_value(self, data)
        if not (isinstance(pool, tv.relax.Call) and pool.op in _MAX_POOLS):
            return call
        if not str(tv.dtype_of(pool)).startswith("float") or not _windows_all_real(pool.attrs):
            return call
        ndim = len(tv.shape_of(pool))
        axis = int(call.attrs.axis)
        pooled = _pooled_axes(pool.attrs, ndim)
        if not (_per_axis_ok(scale, axis, ndim, pooled) and _per_axis_ok(zero, axis, ndim, pooled)):
            return call
        if not np.all(tv.const_value(scale) > 0):
            return call
        codes = self.builder_.emit(tv.relax.Call(_Q, [pool.args[0], scale, zero], call.attrs))
        return self.builder_.normalize(tv.relax.Call(pool.op, [codes], pool.attrs))


QuantizeBeforePool = module_pass(_QuantizeBeforePool, "soniq.QuantizeBeforePool")
