"""Phase 1: turn the importer's forms of Max/Min/Clip into ``maximum``/``minimum``.

TVM's ONNX importer lowers ``Max(a, b)`` to
``max(stack([broadcast_to(a, S), broadcast_to(b, S)]), axis=0)`` (likewise Min),
and ``Clip(x, lo, hi)`` with tensor bounds to ``call_tir`` of TE ``maximum`` /
``minimum`` kernels. soniq-qdq/1 clamps each activation channel with exactly such
a pair, so the later passes want the plain elementwise ``maximum(a, b)``.
Anything else is left unchanged, including n-ary Max/Min over more than two
tensors.
"""
from __future__ import annotations

from soniq_tvm import tvm_shim as tv

from ._common import bound_value, module_pass

_REDUCE = {tv.op("max"): tv.relax.op.maximum, tv.op("min"): tv.relax.op.minimum}
_STACK = tv.op("stack")
_CALL_TIR = tv.op("call_tir")
_TE_CLAMP = {"maximum": tv.relax.op.maximum, "minimum": tv.relax.op.minimum}
_BCAST = tv.op("broadcast_to")


@tv.mutator
class _Canonicalize(tv.PyExprMutator):
    def _bound(self, expr):
        return bound_value(self, expr)

    def _te_clamp(self, call):
        """``call_tir(maximum|minimum, (a, b))`` from the importer's Clip -> Relax op."""
        gv, args = call.args[0], call.args[1]
        base = gv.name_hint.rstrip("0123456789_")
        if base not in _TE_CLAMP or len(args.fields) != 2:
            return call
        out = self.builder_.normalize(_TE_CLAMP[base](*args.fields))
        return out if tv.shape_of(out) == tv.shape_of(call) else call

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op == _CALL_TIR:
            return self._te_clamp(call)
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
