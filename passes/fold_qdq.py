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

from ._common import bound_value, emit_qop, gather_groups, module_pass, per_channel
from .split_groups import channel_groups

__all__ = ["WeightInfo", "FoldQDQ", "MAX_SCALE_GROUPS", "ACT_KEY"]

ACT_KEY = "#act"  # declined[f"#act{i}"]: why the i-th activation x activation matmul stayed float

# an activation whose channels carry more distinct (scale, zero point) pairs than
# this stays float: each group is one more integer kernel and one more float term
MAX_SCALE_GROUPS = 8

_CONV, _MATMUL = tv.op("nn.conv2d"), tv.op("matmul")
_DQ, _Q = tv.op("dequantize"), tv.op("quantize")
_MAXIMUM, _MINIMUM, _CLIP = tv.op("maximum"), tv.op("minimum"), tv.op("clip")
_PERMUTE = tv.op("permute_dims")
_RESHAPE = tv.op("reshape")


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
        self.act_count = 0  # activation x activation matmuls seen, in order

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
        """(integer codes, scale per channel, bits per channel, signed, zero point
        per channel), or None (recorded in ``declined``) when the scales are not
        constants or vary along another axis than the channels."""
        x, sx, zx = dq.args
        s, z = self._value(sx), self._value(zx)
        if s is None or z is None:
            return self._decline(layer, "activation scale or zero point is not a constant")
        shape = tv.shape_of(x)
        scales = _along_channels(s, dq, shape, channel_axis)
        zeros = _along_channels(z, dq, shape, channel_axis)
        if scales is None or zeros is None:
            return self._decline(layer, "activation scale varies along an axis other than the channels")
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
        zi = zeros.astype(np.int64)
        lo, hi = np.minimum(lo, zi), np.maximum(hi, zi)
        if signed:
            bits = _bits_of(np.minimum(lo, -1 - hi), np.maximum(hi, -1 - lo))
        else:
            bits = _bits_of(np.zeros_like(lo), hi)
        return x, scales.astype(np.float32), tuple(int(b) for b in bits), signed, zi

    def _scale_groups(self, layer: str, scales: np.ndarray, zeros: np.ndarray):
        """Input channels grouped by (scale, zero point), or None (declined) when
        there are more groups than integer kernels pay for."""
        groups = channel_groups(zip(scales.tolist(), zeros.tolist()))
        if len(groups) > MAX_SCALE_GROUPS:
            return self._decline(
                layer, f"activation has {len(groups)} scale groups (integer kernels up to {MAX_SCALE_GROUPS}): "
                       "float over the dequantized codes")
        return groups

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
        # a Flatten between the DQ and a Gemm (Brevitas)
        flat = self._flattened(call.args[0]) if dq_x is None and call.op == _MATMUL else None
        if flat is not None:
            dq_x = flat[0]
        if dq_x is None:
            return call
        if call.op == _MATMUL and flat is None:
            act_act = self._fold_act_matmul(call, dq_x)
            if act_act is not None:
                return act_act
        w = self._weight(call.args[1])
        if w is None:
            return call
        wv, info, sw, dq_axis, transposed = w
        if call.op == _CONV:
            return self._fold_conv(call, dq_x, wv, info, sw)
        return self._fold_matmul(call, dq_x, wv, info, sw, dq_axis, transposed, flat=flat)

    def _flattened(self, expr):
        """``(dq, shape)`` when ``expr`` is ``reshape(dequantize(x, s, z), shape)`` with one
        scale and zero point for the whole tensor: the codes can be reshaped instead."""
        r = self._as_call(expr, _RESHAPE)
        dq = self._as_call(r.args[0], _DQ) if r is not None else None
        if dq is None:
            return None
        s, z = self._value(dq.args[1]), self._value(dq.args[2])
        if s is None or z is None or np.asarray(s).size != 1 or np.asarray(z).size != 1:
            return None
        return dq, tv.shape_of(expr)

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
            a_zero=int(a_zero[0]), strides=tuple(int(v) for v in a.strides), padding=tuple(int(v) for v in a.padding),
            dilation=tuple(int(v) for v in a.dilation), groups=groups,
        )
        sw_o = np.broadcast_to(sw.astype(np.float32).reshape(-1), (o,))
        if groups > 1:
            op = op.with_(w_bits=(max(op.w_bits),) * len(op.w_bits), group=0)
            # each output reads one conv group's channels: a scale constant inside every
            # conv group (depthwise: any per-channel scale) factorises per output channel
            cg = wv.shape[1]
            per_group_s = sx.reshape(groups, cg)
            if (per_group_s != per_group_s[:, :1]).any():
                self._decline(info.node, "activation scale varies inside a conv group")
                return call
            if (a_zero != a_zero[0]).any():
                self._decline(info.node, "grouped conv with per-channel activation zero points")
                return call
            acc = emit_qop(self.builder_, op, x, [wv.astype(np.int8)], self.ref, self.target)
            s_out = np.repeat(per_group_s[:, 0], o // groups)
            scale = (s_out * sw_o).reshape(1, o, 1, 1).astype(np.float32)
            return tv.relax.op.multiply(tv.relax.op.astype(acc, "float32"), tv.const(scale))
        sgroups = self._scale_groups(info.node, sx, a_zero)
        if sgroups is None:
            return call
        return self._emit_groups(op, x, 1, sgroups, sx, a_zero, lambda idx: wv[:, idx],
                                 sw_o.reshape(1, o, 1, 1))

    def _emit_groups(self, op: QOp, x, axis: int, sgroups, sx, a_zero, weights_of, sw):
        """One exact kernel per activation scale group (its channels ``idx``, its
        weights ``weights_of(idx)``) and the float combine
        ``sum_g float(acc_g) * (s_g * sw)`` in group order."""
        parts = gather_groups(self.builder_, x, axis, sgroups, op.layer)
        out = None
        for g, (idx, xs) in enumerate(parts):
            w = np.ascontiguousarray(weights_of(idx).astype(np.int8))
            sub = op
            if len(parts) > 1:
                sub = op.with_(x_shape=tuple(tv.shape_of(xs)), w_shape=tuple(w.shape),
                               a_bits=tuple(op.a_bits[i] for i in idx), a_zero=int(a_zero[idx[0]]), group=g,
                               w_bits=tuple(op.w_bits[i] for i in idx) if op.w_axis == "in" else op.w_bits,
                               in_index=tuple(int(i) for i in idx))
            acc = emit_qop(self.builder_, sub, xs, [w], self.ref, self.target)
            out = _accumulate(self.builder_, out, acc, (sx[idx[0]] * sw).astype(np.float32),
                              last=g == len(parts) - 1)
        return out

    def _fold_matmul(self, call, dq_x, wv, info: WeightInfo, sw, dq_axis: int, transposed: bool, flat=None):
        if wv.ndim != 2:
            self._decline(info.node, f"{wv.ndim}-D matmul weight (2-D folds)")
            return call
        x_shape = tv.shape_of(dq_x.args[0])
        act = self._activation(dq_x, len(x_shape) - 1 if flat is None else 0, info.node)
        if act is None:
            return call
        x, sx, a_bits, a_signed, a_zero = act
        if flat is not None:  # one step for the tensor: reshape the codes, the widths carry over
            x_shape = tuple(flat[1])
            x = self.builder_.emit(tv.relax.op.reshape(x, list(x_shape)), "soniq_flat")
            k = x_shape[-1]
            sx, a_zero = np.full(k, sx[0], np.float32), np.full(k, a_zero[0], np.int64)
            a_bits = (max(a_bits),) * k
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
            a_zero=int(a_zero[0]),
        )
        sgroups = self._scale_groups(info.node, sx, a_zero)
        if sgroups is None:
            return call
        sw_n = np.broadcast_to(sw.astype(np.float32).reshape(-1), (n,))
        return self._emit_groups(op, x, len(x_shape) - 1, sgroups, sx, a_zero, lambda idx: w[idx], sw_n)

    def _fold_act_matmul(self, call, dq_a):
        """``A @ B`` of two dequantized activations -> int32 matmuls and a float
        rescale. A scale (or zero point) may be one per tensor or one per index of
        any axis: off the reduction it factorises onto the output (a zero point is
        subtracted in int32), along the reduction the channels are grouped by their
        (scale, zero point) pairs, one int32 matmul per group."""
        dq_b = self._as_call(call.args[1], _DQ)
        if dq_b is None or tv.is_const(dq_b.args[0]):
            return None
        if isinstance(dq_b.args[0], tv.relax.Var) and tv.var_name(dq_b.args[0]) in self.params:
            return None
        out_rank = len(tv.shape_of(call))
        sides = []
        for dq, red in ((dq_a, -1), (dq_b, -2)):
            shape = tv.shape_of(dq.args[0])
            s, z = self._value(dq.args[1]), self._value(dq.args[2])
            if s is None or z is None:
                return None
            axis = int(dq.attrs.axis) % len(shape) if max(np.size(s), np.size(z)) > 1 else None
            sides.append((dq.args[0], shape, red % len(shape), axis, np.asarray(s, np.float32).reshape(-1),
                          np.asarray(z).reshape(-1).astype(np.int64)))
        k = sides[0][1][-1]

        def at(v, axis, red, i):  # the value of channel i along the reduction (None: off it)
            if v.size == 1:
                return v[0].item()
            return v[i].item() if axis == red else None

        keys = [[(at(s, axis, red, i), at(z, axis, red, i)) for i in range(k)]
                for _x, _shape, red, axis, s, z in sides]
        groups = channel_groups(ka + kb for ka, kb in zip(keys[0], keys[1]))
        self.act_count += 1
        if len(groups) > MAX_SCALE_GROUPS:  # keyed by its place among the attention matmuls
            return self._decline(f"{ACT_KEY}{self.act_count - 1}",
                                 f"the reduction has {len(groups)} scale groups (integer matmuls up to "
                                 f"{MAX_SCALE_GROUPS}): float over the dequantized codes")
        out = None
        for g, idx in enumerate(groups):
            ints, scale = [], np.ones([1] * out_rank, np.float64)
            for x, shape, red, axis, s, z in sides:
                xs = x
                if len(groups) > 1:
                    xs = self.builder_.emit(tv.relax.op.take(x, tv.const(idx), axis=red), "soniq_xs")
                xi = tv.relax.op.astype(xs, "int32")
                zv, sv = z, s
                if axis == red:  # this group's one value
                    zv, sv = (v[idx[0]:idx[0] + 1] if v.size > 1 else v for v in (z, s))
                if zv.size == 1 and zv[0]:
                    xi = tv.relax.op.subtract(xi, tv.relax.const(int(zv[0]), "int32"))
                elif zv.size > 1:
                    zc = zv.reshape(_vector_shape(shape, axis, zv.size)).astype(np.int32)
                    xi = tv.relax.op.subtract(xi, tv.const(zc))
                ints.append(self.builder_.emit(xi, "soniq_int"))
                sv = np.asarray(sv, np.float64)
                scale = scale * sv.reshape(_vector_shape(shape, axis, sv.size, out_rank))
            acc = self.builder_.emit(tv.relax.op.matmul(ints[0], ints[1], out_dtype="int32"), "soniq_acc")
            scale = scale.astype(np.float32)
            out = _accumulate(self.builder_, out, acc, scale.reshape(()) if scale.size == 1 else scale,
                              last=g == len(groups) - 1)
        return out


def _vector_shape(shape, axis, size: int, rank: int | None = None) -> tuple[int, ...]:
    """Broadcast shape putting a vector of ``size`` on ``axis`` of ``shape``,
    right-aligned to ``rank`` dimensions (a scalar: all ones)."""
    rank = len(shape) if rank is None else rank
    out = [1] * rank
    if size > 1:
        out[axis + rank - len(shape)] = size
    return tuple(out)


def _along_channels(v: np.ndarray, dq, shape, channel_axis: int) -> np.ndarray | None:
    """One value per channel of a dequantize's scale or zero point (a scalar, or a
    vector along the DQ's ``axis``), or None when it runs along another axis."""
    v = np.asarray(v)
    if v.size == 1:
        return np.full(shape[channel_axis], v.reshape(-1)[0], v.dtype)
    if v.ndim != 1 or int(dq.attrs.axis) % len(shape) != channel_axis or v.size != shape[channel_axis]:
        return None
    return v.copy()


def _accumulate(builder, out, acc, scale: np.ndarray, last: bool):
    """``out + float(acc) * scale``: one scale group's term of the float combine,
    in group order (the numpy reference sums in the same order)."""
    term = tv.relax.op.multiply(tv.relax.op.astype(acc, "float32"), tv.const(scale))
    if out is None:
        return term if last else builder.emit(term, "soniq_term")
    total = tv.relax.op.add(out, term)
    return total if last else builder.emit(total, "soniq_terms")


def FoldQDQ(params: dict, weights: dict, target=None, declined: dict | None = None):
    """The pass. ``params``: importer parameter name -> numpy value; ``weights``:
    weight tensor name -> :class:`WeightInfo`; ``declined`` (filled in): layer ->
    why its quantized op was left float."""
    return module_pass(lambda mod: tv.mutator(_Folder)(mod, params, weights, target, declined), "soniq.FoldQDQ")
