"""Phase 7: activation x activation matmuls onto the dot-product instructions.

Runs after ``pack``. :mod:`fold_qdq` turns attention's score and context matmuls
(``Q.K^T``, ``P.V``: both operands dequantized activations) into the exact form

    acc = matmul(astype(a, int32), astype(b, int32), out_dtype=int32)

with ``a``, ``b`` the 8-bit codes. Where the target has a dot-product instruction
that takes those codes exactly (:func:`soniq_tvm.schedules.cpu.actdot.act_matmul`:
AVX-512 VNNI, NEON dotprod; ``b`` int8, ``a`` int8 or uint8), this pass replaces
it with

    acc = reshape(call_tir(actdot kernel, (reshape(a, [T, M, K]), reshape(b, [T, K, N]))), shape)

reading the 8-bit codes directly (the int32 copies of both operands go away with
dead-code elimination). Same batch dimensions on both operands (flattened into
``T``), static shapes only.

Leaves alone: other targets (AVX2-only, CUDA: the generic int32 matmul, which is
exact everywhere), operands with a zero point (they are re-centred in int16 or
int32 first, so the match fails), broadcast batch dimensions, and every matmul
when a kernel family is forced (``compile(..., family=...)``): reference builds
keep the reference form.
"""
from __future__ import annotations

import numpy as np

from soniq_tvm import tvm_shim as tv
from soniq_tvm.schedules.cpu.actdot import ATTR as ACT_ATTR
from soniq_tvm.schedules.cpu.actdot import ActMatmul, act_matmul

from ._common import bound_value, module_pass

__all__ = ["LowerActMatmul", "ACT_ATTR"]

_MATMUL, _ASTYPE = tv.op("matmul"), tv.op("astype")


def _static_shape(expr):
    try:
        return tv.shape_of(expr)
    except (TypeError, ValueError, AttributeError):
        return None


class _Lower(tv.PyExprMutator):
    def __init__(self, mod, target):
        super().__init__(mod)
        self.target = target
        self.count = 0

    def _codes(self, expr):
        """The 8-bit tensor ``expr`` is ``astype(codes, int32)`` of, else None."""
        v = bound_value(self, expr)
        if not (isinstance(v, tv.relax.Call) and v.op == _ASTYPE):
            return None
        src = v.args[0]
        return src if tv.dtype_of(src) in ("int8", "uint8") else None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != _MATMUL or str(call.attrs.out_dtype) != "int32":
            return call
        a, b = self._codes(call.args[0]), self._codes(call.args[1])
        if a is None or b is None:
            return call
        sa, sb, so = _static_shape(a), _static_shape(b), _static_shape(call)
        if sa is None or sb is None or so is None or len(sa) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2]:
            return call
        if sa[-1] != sb[-2]:
            return call
        batch = int(np.prod(sa[:-2])) if len(sa) > 2 else 1
        spec = ActMatmul(batch, sa[-2], sa[-1], sb[-1], tv.dtype_of(a), tv.dtype_of(b))
        func = act_matmul(spec, self.target)
        if func is None:
            return call
        self.count += 1
        gv = self.builder_.add_func(func.without_attr("global_symbol"),
                                    f"soniq_act_matmul_{spec.a_dtype}_{spec.m}x{spec.k}x{spec.n}")
        a3 = self.builder_.emit(tv.relax.op.reshape(a, (batch, spec.m, spec.k)), "soniq_a")
        b3 = self.builder_.emit(tv.relax.op.reshape(b, (batch, spec.k, spec.n)), "soniq_b")
        acc = self.builder_.emit(tv.call_tir(gv, [a3, b3], (batch, spec.m, spec.n), "int32"), "soniq_act_acc")
        return tv.relax.op.reshape(acc, so)


def LowerActMatmul(target, force: str | None = None):
    """The pass; unchanged IR when ``force`` names a kernel family or nothing matches."""
    if force is None and target is not None:
        return module_pass(lambda mod: tv.mutator(_Lower)(mod, target), "soniq.LowerActMatmul")

    @tv.tvm.ir.transform.module_pass(opt_level=0, name="soniq.LowerActMatmul")
    def _unchanged(mod, _ctx):
        return mod

    return _unchanged
