"""Phase 1: turn the importer's n-ary Max/Min into binary ``maximum``/``minimum``.

TVM's ONNX importer lowers ``Max(a, b)`` to
``max(stack([broadcast_to(a, S), broadcast_to(b, S)]), axis=0)`` (likewise Min).
soniq-qdq/1 clamps each activation channel with exactly such a pair, so the later
passes want the plain elementwise form ``maximum(a, b)``. Anything else is left
unchanged, including n-ary Max/Min over more than two tensors.
"""
from __future__ import annotations

from soniq_tvm import tvm_shim as tv

from ._common import module_pass

_REDUCE = {tv.op("max"): tv.relax.op.maximum, tv.op("min"): tv.relax.op.minimum}
_STACK = tv.op("stack")
_BCAST = tv.op("broadcast_to")


@tv.mutator
class _Canonicalize(tv.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)

    def _bound(self, expr):
        if isinstance(expr, tv.relax.Var):
            value = self.lookup_binding(expr)
            return value if value is not None else expr
        return expr

    def visit_call_(self, call):
        call = super().visit_call_(call)
        binary = _REDUCE.get(call.op)
        if binary is None or call.attrs is None:
            return call
        axis = call.attrs.axis
        if axis is None or [int(a) for a in axis] != [0] or bool(call.attrs.keepdims):
            return call
        stacked = self._bound(call.args[0])
        if not (isinstance(stacked, tv.relax.Call) and stacked.op == _STACK and int(stacked.attrs.axis) == 0):
            return call
        items = stacked.args[0]
        items = self._bound(items) if isinstance(items, tv.relax.Var) else items
        if not isinstance(items, tv.relax.Tuple) or len(items.fields) != 2:
            return call
        operands = []
        for f in items.fields:
            v = self._bound(f)
            operands.append(v.args[0] if isinstance(v, tv.relax.Call) and v.op == _BCAST else f)
        out = self.builder_.normalize(binary(*operands))
        if tv.shape_of(out) != tv.shape_of(call):
            out = tv.relax.op.broadcast_to(out, call.ty.shape)
        return out


CanonicalizeMinMax = module_pass(_Canonicalize, "soniq.CanonicalizeMinMax")
