"""Reference kernel families: exact, portable, simple.

* ``int8-ref`` reads the weights as plain int8 (one byte per weight). The passes
  use it between folding and packing; nothing is compiled with it unless a
  caller asks.
* ``bitplane-ref`` reads weights packed as bit-planes at their real width
  (:func:`soniq_tvm.qop.encode_bitplanes`) and decodes them inside the kernel. It
  accepts every uniform op on every target: the fallback that is always correct.

Both are TE computes; on CPU the output-channel loop runs in parallel. Faster
families live beside this file and win :func:`registry.select` by cost.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from soniq_tvm import tvm_shim as tv
from soniq_tvm.qop import QOp, check_weights, decode_bitplanes, encode_bitplanes, reference

from .registry import register

__all__ = ["Int8Reference", "BitplaneReference", "integer_compute", "finish_primfunc"]

WeightFn = Callable[..., object]  # (out_channel, k_flat or (c, r, s)) -> int32 expr


def integer_compute(x, op: QOp, weight_at: Callable, name: str = "qop"):
    """TE compute of ``op`` with weights given by ``weight_at(o, c, r, s)`` (conv)
    or ``weight_at(n, k)`` (matmul), both returning int32 expressions."""
    te = tv.te
    z = int(op.a_zero)

    def code(v):  # the activation as an int32 value, zero point removed
        return v.astype("int32") - z if z else v.astype("int32")

    if op.kind == "matmul":
        k = te.reduce_axis((0, op.reduction), name="k")
        return te.compute(
            op.out_shape,
            lambda *i: te.sum(code(x[i[:-1] + (k,)]) * weight_at(i[-1], k), axis=k),
            name=name,
        )
    pt, pl, pb, pr = op.padding
    if any(op.padding):  # a padding pixel is a real zero: the code a_zero
        x = tv.topi.nn.pad(x, [0, 0, pt, pl], [0, 0, pb, pr], pad_value=z, name="pad")
    o_all, cg, kh, kw = op.w_shape
    og = o_all // op.groups
    (sh, sw), (dh, dw) = op.strides, op.dilation
    rc = te.reduce_axis((0, cg), name="rc")
    rr = te.reduce_axis((0, kh), name="rr")
    rs = te.reduce_axis((0, kw), name="rs")
    return te.compute(
        op.out_shape,
        lambda n, o, y, xx: te.sum(
            code(x[n, (o // og) * cg + rc, y * sh + rr * dh, xx * sw + rs * dw])
            * weight_at(o, rc, rr, rs),
            axis=[rc, rr, rs],
        ),
        name=name,
    )


def finish_primfunc(args, out, op: QOp, target, schedule: bool = True):
    """PrimFunc of a TE compute, tagged with its QOp, with the outer loops of the
    main block parallel on CPU targets."""
    func = tv.te.create_prim_func(list(args) + [out]).with_attr("soniq.qop", op.to_json())
    if not schedule or target is None:
        return func
    if target.kind.name == "cuda":
        return _gpu_fallback(func, target)
    if target.kind.name != "llvm":
        return func
    sch = tv.s_tir.Schedule(func)
    for blk in ("pad",):
        try:
            sch.compute_inline(sch.get_sblock(blk))
        except Exception:  # noqa: BLE001  (no pad block: nothing to inline)
            pass
    loops = sch.get_loops(sch.get_sblock("qop"))
    spatial = len(op.out_shape)
    fused = sch.fuse(*loops[: max(1, spatial - 1)])
    sch.parallel(fused)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _gpu_fallback(func, target):
    """dlight's generic GPU schedule (threads over the output, serial reduction):
    its reduction rules do not accept the bit-plane indexing, so the kernel is
    scheduled here and marked so the default pipeline leaves it alone."""
    with target:
        mod = tv.dlight.ApplyDefaultSchedule(tv.dlight.gpu.Fallback())(tv.tvm.IRModule({"main": func}))
    return mod["main"].with_attr("tirx.is_scheduled", True)


class Int8Reference:
    """Weights as int8, one byte each: the unpacked form the passes start from."""

    name = "int8-ref"

    def cost(self, op: QOp, target) -> float | None:
        return float(op.macs) * 4.0

    def pack(self, w: np.ndarray, op: QOp) -> list[np.ndarray]:
        check_weights(w, op)
        return [np.ascontiguousarray(np.asarray(w).astype(np.int8))]

    def primfunc(self, op: QOp, target=None):
        te = tv.te
        x = te.placeholder(op.x_shape, op.a_dtype, name="x")
        w = te.placeholder(op.w_shape, "int8", name="w")
        if op.kind == "conv2d":
            out = integer_compute(x, op, lambda o, c, r, s: w[o, c, r, s].astype("int32"))
        else:
            out = integer_compute(x, op, lambda n, k: w[k, n].astype("int32"))
        return finish_primfunc([x, w], out, op.with_(family=self.name), target)

    def reference(self, x, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        return reference(x, packed[0], op)


class BitplaneReference:
    """Weights packed as ``w_bit`` bit-planes, decoded inside the kernel."""

    name = "bitplane-ref"

    def cost(self, op: QOp, target) -> float | None:
        return float(op.macs) * (8.0 + op.w_bit)

    def pack(self, w: np.ndarray, op: QOp) -> list[np.ndarray]:
        return [encode_bitplanes(w, op)]

    def primfunc(self, op: QOp, target=None):
        te = tv.te
        b = op.w_bit
        x = te.placeholder(op.x_shape, op.a_dtype, name="x")
        p = te.placeholder((op.out_channels, b, (op.reduction + 7) // 8), "uint8", name="w_planes")

        def decode(o, k):
            code = 0
            for j in range(b):
                byte = p[o, j, k // 8].astype("int32")
                code = code + (((byte >> (k % 8)) & 1) << j)
            if op.bipolar:
                return code * 2 - 1
            if op.w_signed and b > 1:
                return code - ((code >> (b - 1)) << b)
            return code

        if op.kind == "conv2d":
            _, _, kh, kw = op.w_shape
            out = integer_compute(x, op, lambda o, c, r, s: decode(o, (c * kh + r) * kw + s))
        else:
            out = integer_compute(x, op, decode)
        return finish_primfunc([x, p], out, op.with_(family=self.name), target)

    def reference(self, x, packed: Sequence[np.ndarray], op: QOp) -> np.ndarray:
        m = decode_bitplanes(packed[0], op)
        w = m.reshape(op.w_shape) if op.kind == "conv2d" else m.T
        return reference(x, w, op)


register(Int8Reference())
register(BitplaneReference())
