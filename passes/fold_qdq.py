"""Phase 2: fold QDQ around conv2d/matmul into exact integer arithmetic.

Expects the module straight from the ONNX importer (``keep_params_in_input=True``,
so weights are still named parameters) after :mod:`canonicalize_minmax`. Matches

    conv2d | matmul( dequantize(X, sx, zx),  [permute_dims] dequantize(W, sw, 0) )

with ``W`` a named int parameter, and rewrites it to

    acc = call_tir(int8-ref kernel, X - zx, W)       # int32, exact; QOp in attrs
    y   = astype(acc, float32) * (sx * sw)           # the requantisation step

The kernel's QOp carries the per-channel weight bits (from the annotations,
keyed by the weight's tensor name) and activation bits (read from the
``maximum``/``minimum``/``clip`` constants clamping ``X``, or its dtype).

Also folds matmuls whose two operands are both dequantized activations (attention
scores and context) into an int32 matmul with a scalar rescale.

Leaves alone: float ops without QDQ, weights with non-zero zero points or scales
that vary along the reduction, and activation scales that are not one value per
tensor (raises, since the integer factorisation would be wrong).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from soniq_tvm import tvm_shim as tv
from soniq_tvm.errors import UnsupportedModelError
from soniq_tvm.qop import QOp
from soniq_tvm.schedules import registry

from ._common import bound_value, emit_qop, module_pass, per_channel

__all__ = ["WeightInfo", "FoldQDQ"]

_CONV, _MATMUL = tv.op("nn.conv2d"), tv.op("matmul")
_DQ, _Q = tv.op("dequantize"), tv.op("quantize")
_MAXIMUM, _MINIMUM, _CLIP = tv.op("maximum"), tv.op("minimum"), tv.op("clip")
_PERMUTE = tv.op("permute_dims")


@dataclass(frozen=True)
class WeightInfo:
    """What the annotation says about one weight tensor."""

    node: str  # the ONNX node consuming the weight (the layer's name)
    bits: tuple[int, ...]
    axis: int  # axis of the stored tensor the bits run along
    signed: bool


def _bits_of(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    span = (hi.astype(np.int64) - lo.astype(np.int64) + 1).clip(min=1)
    return np.ceil(np.log2(span)).astype(np.int64).clip(min=1)


class _Folder(tv.PyExprMutator):
    def __init__(self, mod, params: dict, weights: dict, target, declined: dict | None = None):
        super().__init__(mod)
        self.params = params
        self.weights = weights
        self.target = target
        self.ref = registry.get("int8-ref")
        self.declined = declined if declined is not None else {}

    def _decline(self, layer: str, reason: str):
        """Record why the quantized op of ``layer`` stays float; returns None."""
        self.declined.setdefault(layer, reason)
        return None

    # ---- value helpers ----------------------------------------------------
    def _bound(self, expr):
        return bound_value(self, expr)

    def _value(self, expr):
        """numpy value of a constant or a named parameter, else None."""
        if tv.is_const(expr):
            return tv.const_value(expr)
        if isinstance(expr, tv.relax.Var) and tv.var_name(expr) in self.params:
            return self.params[tv.var_name(expr)]
        return None

    def _as_call(self, expr, op):
        v = self._bound(expr)
        return v if isinstance(v, tv.relax.Call) and v.op == op else None

    # ---- activation side --------------------------------------------------
    def _activation(self, dq, channel_axis: int, layer: str):
        """(integer codes, scale, bits per channel, signed, zero point)."""
        x, sx, zx = dq.args
        s, z = self._value(sx), self._value(zx)
        if s is None or z is None:
            return self._decline(layer, "activation scale or zero point is not a constant")
        if np.unique(s).size != 1:
            raise UnsupportedModelError(
                "activation scale varies per channel; integer folding needs one scale per tensor",
                node=layer, tensor=tv.var_name(sx) if isinstance(sx, tv.relax.Var) else None,
                hint="export activations with a per-tensor scale (per-channel bits stay per channel)")
        z = int(np.unique(z)[0]) if np.unique(z).size == 1 else None
        if z is None:
            raise UnsupportedModelError("activation zero point varies per channel", node=layer)
        shape = tv.shape_of(x)
        dtype = tv.dtype_of(x)
        info = np.iinfo(dtype)
        lo = np.full(shape[channel_axis], info.min, np.int64)
        hi = np.full(shape[channel_axis], info.max, np.int64)
        cur = x
        while True:
            call = self._bound(cur)
            if not isinstance(call, tv.relax.Call):
                break
            if call.op in (_MAXIMUM, _MINIMUM):
                c = self._value(call.args[1])
                vals = per_channel(c, shape, channel_axis) if c is not None else None
                if vals is None:
                    break
                if call.op == _MAXIMUM:
                    lo = np.maximum(lo, vals)
                else:
                    hi = np.minimum(hi, vals)
                cur = call.args[0]
            elif call.op == _CLIP:
                lo = np.maximum(lo, int(call.args[1].value))
                hi = np.minimum(hi, int(call.args[2].value))
                cur = call.args[0]
            else:
                break
        signed = info.min < 0
        # the zero point goes to the kernel (QOp.a_zero), which folds it exactly:
        # the codes stay as stored (u8 x s8 for the dot-product instructions)
        lo, hi = np.minimum(lo, z), np.maximum(hi, z)
        if signed:
            bits = _bits_of(np.minimum(lo, -1 - hi), np.maximum(hi, -1 - lo))
        else:
            bits = _bits_of(np.zeros_like(lo), hi)
        return x, float(s.reshape(-1)[0]), tuple(int(b) for b in bits), signed, z

    # ---- weight side ------------------------------------------------------
    def _weight(self, expr):
        """(int weights as used by the op, WeightInfo, scale per out channel, transposed)."""
        transposed = False
        call = self._bound(expr)
        if isinstance(call, tv.relax.Call) and call.op == _PERMUTE:
            axes = [int(a) for a in call.attrs.axes] if call.attrs.axes is not None else [1, 0]
            if axes != [1, 0]:
                return None
            transposed, call = True, self._bound(call.args[0])
        if not (isinstance(call, tv.relax.Call) and call.op == _DQ):
            return None
        w, sw, zw = call.args
        if not isinstance(w, tv.relax.Var) or tv.var_name(w) not in self.weights:
            return None
        info = self.weights[tv.var_name(w)]
        wv, s, z = self._value(w), self._value(sw), self._value(zw)
        if wv is None or s is None:
            return self._decline(info.node, "weight scale is not a constant")
        if z is not None and np.any(z != 0):
            return self._decline(info.node, "weight zero point is not 0 (asymmetric weights)")
        return wv, info, s, int(call.attrs.axis), transposed

    # ---- rewrite ------------------------------------------------------------
    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op not in (_CONV, _MATMUL):
            return call
        dq_x = self._as_call(call.args[0], _DQ)
        if dq_x is None:
            return call
        if call.op == _MATMUL:
            act_act = self._fold_act_matmul(call, dq_x)
            if act_act is not None:
                return act_act
        w = self._weight(call.args[1])
        if w is None:
            return call
        wv, info, sw, dq_axis, transposed = w
        if call.op == _CONV:
            return self._fold_conv(call, dq_x, wv, info, sw)
        return self._fold_matmul(call, dq_x, wv, info, sw, dq_axis, transposed)

    def _fold_conv(self, call, dq_x, wv, info: WeightInfo, sw):
        a = call.attrs
        if str(a.data_layout) != "NCHW" or str(a.kernel_layout) != "OIHW":
            self._decline(info.node, f"conv layout {a.data_layout}/{a.kernel_layout} (NCHW/OIHW folds)")
            return call
        act = self._activation(dq_x, 1, info.node)
        if act is None:
            return call
        x, sx, a_bits, a_signed, a_zero = act
        o = wv.shape[0]
        groups = int(a.groups)
        w_axis = "in" if info.axis == 1 else "out"
        a_bits_w = a_bits
        if groups > 1 and (len(set(a_bits)) > 1 or len(set(info.bits)) > 1):
            # grouped conv: one channel group at the widest precision (exact, unsplit)
            a_bits_w = (max(a_bits),) * len(a_bits)
        op = QOp(
            kind="conv2d", layer=info.node, x_shape=tv.shape_of(x), w_shape=tuple(wv.shape),
            w_bits=tuple(info.bits) if len(info.bits) > 1 else (info.bits[0],) * (wv.shape[info.axis]),
            a_bits=a_bits_w, w_axis=w_axis, w_signed=info.signed, a_signed=a_signed, a_dtype=tv.dtype_of(x),
            a_zero=a_zero, strides=tuple(int(v) for v in a.strides), padding=tuple(int(v) for v in a.padding),
            dilation=tuple(int(v) for v in a.dilation), groups=groups,
        )
        if groups > 1:
            op = op.with_(w_bits=(max(op.w_bits),) * len(op.w_bits), group=0)
        acc = emit_qop(self.builder_, op, x, [wv.astype(np.int8)], self.ref, self.target)
        scale = (sx * np.broadcast_to(sw.astype(np.float32), (o,))).reshape(1, o, 1, 1).astype(np.float32)
        return tv.relax.op.multiply(tv.relax.op.astype(acc, "float32"), tv.const(scale))

    def _fold_matmul(self, call, dq_x, wv, info: WeightInfo, sw, dq_axis: int, transposed: bool):
        if wv.ndim != 2:
            self._decline(info.node, f"{wv.ndim}-D matmul weight (2-D folds)")
            return call
        x_shape = tv.shape_of(dq_x.args[0])
        act = self._activation(dq_x, len(x_shape) - 1, info.node)
        if act is None:
            return call
        x, sx, a_bits, a_signed, a_zero = act
        w = wv.T if transposed else wv  # [K, N]
        n = w.shape[1]
        # stored axis -> in/out: MatMul [K,N]: 0 in, 1 out; Gemm transB [N,K]: 1 in, 0 out
        in_axis = 1 if transposed else 0
        w_axis = "in" if info.axis == in_axis else "out"
        count = w.shape[0] if w_axis == "in" else n
        op = QOp(
            kind="matmul", layer=info.node, x_shape=x_shape, w_shape=tuple(w.shape),
            w_bits=tuple(info.bits) if len(info.bits) > 1 else (info.bits[0],) * count,
            a_bits=a_bits, w_axis=w_axis, w_signed=info.signed, a_signed=a_signed, a_dtype=tv.dtype_of(x),
            a_zero=a_zero,
        )
        acc = emit_qop(self.builder_, op, x, [np.ascontiguousarray(w.astype(np.int8))], self.ref, self.target)
        scale = (sx * np.broadcast_to(sw.astype(np.float32).reshape(-1), (n,))).astype(np.float32)
        return tv.relax.op.multiply(tv.relax.op.astype(acc, "float32"), tv.const(scale))

    def _fold_act_matmul(self, call, dq_a):
        dq_b = self._as_call(call.args[1], _DQ)
        if dq_b is None or tv.is_const(dq_b.args[0]):
            return None
        if isinstance(dq_b.args[0], tv.relax.Var) and tv.var_name(dq_b.args[0]) in self.params:
            return None
        parts = []
        for dq in (dq_a, dq_b):
            s, z = self._value(dq.args[1]), self._value(dq.args[2])
            if s is None or z is None or np.unique(s).size != 1 or np.unique(z).size != 1:
                return None
            xi = tv.relax.op.astype(dq.args[0], "int32")
            zi = int(np.unique(z)[0])
            if zi:
                xi = tv.relax.op.subtract(xi, tv.relax.const(zi, "int32"))
            parts.append((self.builder_.emit(xi, "soniq_int"), float(np.unique(s)[0])))
        acc = self.builder_.emit(tv.relax.op.matmul(parts[0][0], parts[1][0], out_dtype="int32"), "soniq_acc")
        scale = np.float32(parts[0][1] * parts[1][1])
        return tv.relax.op.multiply(tv.relax.op.astype(acc, "float32"), tv.relax.const(scale, "float32"))


def FoldQDQ(params: dict, weights: dict, target=None, declined: dict | None = None):
    """The pass. ``params``: importer parameter name -> numpy value; ``weights``:
    weight tensor name -> :class:`WeightInfo`; ``declined`` (filled in): layer ->
    why its quantized op was left float."""
    return module_pass(lambda mod: tv.mutator(_Folder)(mod, params, weights, target, declined), "soniq.FoldQDQ")
