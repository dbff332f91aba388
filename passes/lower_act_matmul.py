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

Operands with zero points (ORT's quantizer writes u8 codes with one per tensor),
``acc = matmul(astype(a) - za, astype(b) - zb)``, run on the same kernel over the
raw codes, with the exact correction

    acc = a.b - zb * rowsum(a) - za * colsum(b) + K * za * zb

in int32 (row and column sums are O(MK + KN) against the O(MKN) product).

Leaves alone: targets without such an instruction (CUDA: the generic int32
matmul, which is exact everywhere), broadcast batch dimensions, and every matmul
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

_MATMUL, _ASTYPE, _SUBTRACT = tv.op("matmul"), tv.op("astype"), tv.op("subtract")


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
        """``(codes, zero point)`` when ``expr`` is ``astype(codes, int32)`` or
        ``astype(codes, int32) - z`` of 8-bit codes and a scalar constant ``z``,
        else None."""
        v = bound_value(self, expr)
        zero = 0
        if isinstance(v, tv.relax.Call) and v.op == _SUBTRACT and tv.is_const(v.args[1]):
            z = tv.const_value(v.args[1])
            if z.size != 1:
                return None
            zero = int(z.reshape(-1)[0])
            v = bound_value(self, v.args[0])
        if not (isinstance(v, tv.relax.Call) and v.op == _ASTYPE):
            return None
        src = v.args[0]
        return (src, zero) if tv.dtype_of(src) in ("int8", "uint8") else None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != _MATMUL or str(call.attrs.out_dtype) != "int32":
            return call
        ca, cb = self._codes(call.args[0]), self._codes(call.args[1])
        if ca is None or cb is None:
            return call
        (a, za), (b, zb) = ca, cb
        sa, sb, so = _static_shape(a), _static_shape(b), _static_shape(call)
        if sa is None or sb is None or so is None or len(sa) < 2 or len(sa) != len(sb) or sa[:-2] != sb[:-2]:
            return call
        if sa[-1] != sb[-2]:
            return call
        batch = int(np.prod(sa[:-2])) if len(sa) > 2 else 1
        spec = ActMatmul(batch, sa[-2], sa[-1], sb[-1], tv.dtype_of(a), tv.dtype_of(b))
        func = act_matmul(spec, self.target)
        if func is None and spec.b_dtype == "uint8":  # u8 b as s8 codes b - 128, zero point zb - 128
            wide = tv.relax.op.subtract(tv.relax.op.astype(b, "int16"), tv.relax.const(128, "int16"))
            b, zb = self.builder_.emit(tv.relax.op.astype(wide, "int8"), "soniq_b_s8"), zb - 128
            spec = ActMatmul(batch, sa[-2], sa[-1], sb[-1], spec.a_dtype, "int8")
            func = act_matmul(spec, self.target)
        if func is None:
            return call
        self.count += 1
        gv = self.builder_.add_func(func.without_attr("global_symbol"),
                                    f"soniq_act_matmul_{spec.a_dtype}_{spec.m}x{spec.k}x{spec.n}")
        a3 = self.builder_.emit(tv.relax.op.reshape(a, (batch, spec.m, spec.k)), "soniq_a")
        b3 = self.builder_.emit(tv.relax.op.reshape(b, (batch, spec.k, spec.n)), "soniq_b")
        acc = self.builder_.emit(tv.call_tir(gv, [a3, b3], (batch, spec.m, spec.n), "int32"), "soniq_act_acc")
        out = tv.relax.op.reshape(acc, so)
        if za == 0 and zb == 0:
            return out
        return self._zero_points(out, a, b, za, zb, spec.k)

    def _zero_points(self, acc, a, b, za: int, zb: int, k: int):
        """``acc - zb * rowsum(a) - za * colsum(b) + k * za * zb``, exact in int32."""
        op = tv.relax.op
        out = self.builder_.emit(acc, "soniq_act_raw")
        if zb:
            rows = op.sum(op.astype(a, "int32"), axis=[-1], keepdims=True)
            out = self.builder_.emit(op.subtract(out, op.multiply(rows, tv.relax.const(zb, "int32"))),
                                     "soniq_act_zb")
        if za:
            cols = op.sum(op.astype(b, "int32"), axis=[-2], keepdims=True)
            out = self.builder_.emit(op.subtract(out, op.multiply(cols, tv.relax.const(za, "int32"))),
                                     "soniq_act_za")
        if za and zb:
            out = op.add(out, tv.relax.const(k * za * zb, "int32"))
        return out


def LowerActMatmul(target, force: str | None = None):
    """The pass; unchanged IR when ``force`` names a kernel family or nothing matches."""
    if force is None and target is not None:
        return module_pass(lambda mod: tv.mutator(_Lower)(mod, target), "soniq.LowerActMatmul")

    @tv.tvm.ir.transform.module_pass(opt_level=0, name="soniq.LowerActMatmul")
    def _unchanged(mod, _ctx):
        return mod

    return _unchanged
