"""QOperator files and typed/blocked Q/DQ, rewritten into the QDQ form the compiler folds.

ONNX Runtime's quantizer also writes ``QuantFormat.QOperator`` files, and older
exporters write integer ops. Each is rewritten, node by node, into the plain QDQ
form of the same computation, so one path (annotations, folding, kernels,
verify) serves every file:

* ``QLinearConv`` -> ``QuantizeLinear(Conv(DQ(x), DQ(w), DQ(bias)))``, the int32
  bias dequantized with ``x_scale * w_scale``;
* ``QLinearMatMul`` -> ``QuantizeLinear(MatMul(DQ(a), DQ(b)))``;
* ORT's contrib ops (``com.microsoft``) of the same format: ``QGemm``,
  ``QLinearAdd``/``Mul``/``Sigmoid``/``LeakyRelu``/``Concat``,
  ``QLinearGlobalAveragePool``/``AveragePool`` (NCHW), each as DQ -> op -> Q;
* ``ConvInteger`` / ``MatMulInteger`` -> ``Cast<int32>(Conv|MatMul(DQ(x, 1, x_zp),
  DQ(w, 1, w_zp)))``: the integer result, exact while it stays below 2**24 (the
  compiled kernels accumulate in int32; the float value between them and the
  cast is exact in that range);
* sub-byte tensors (``int4``/``uint4``/``int2``/``uint2``) that are not
  constants (graph inputs and outputs, QuantizeLinear results) are carried in
  ``int8``/``uint8`` with a ``Clip`` to their range, which the annotation reader
  reads as the width (constants are widened by
  :func:`soniq_tvm.annotation.to_int8_initializers`);
* a ``Clip`` of an 8-bit integer initializer by constant bounds (Brevitas's QCDQ
  export, narrow-range weights) becomes an initializer of the clipped values;
* blocked ``QuantizeLinear`` / ``DequantizeLinear`` (``block_size``) become
  element-wise arithmetic with the scales (and zero points) repeated over their
  blocks; a blocked weight therefore runs in float, exactly as the file says.

What cannot be represented (float8 and float4 types) raises
:class:`~soniq_tvm.errors.UnsupportedModelError` naming the node. Pure onnx.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .annotation import KEY_AXIS, KEY_BITS, KEY_SIGNED, bits_from_range
from .errors import UnsupportedModelError
from .naming import node_label

__all__ = ["to_qdq", "QOPERATOR_OPS"]

QOPERATOR_OPS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")
# ORT's contrib ops in QOperator files (domain com.microsoft): op -> (float op, positions of the
# (tensor, scale, zero point) triples, position of the output scale/zero point)
_MS_ELEMENTWISE = {
    "QLinearAdd": ("Add", (0, 3), 6), "QLinearMul": ("Mul", (0, 3), 6),
    "QLinearSigmoid": ("Sigmoid", (0,), 3), "QLinearLeakyRelu": ("LeakyRelu", (0,), 3),
    "QLinearGlobalAveragePool": ("GlobalAveragePool", (0,), 3), "QLinearAveragePool": ("AveragePool", (0,), 3),
    "QLinearSoftmax": ("Softmax", (0,), 3),
}
_MS_OPS = tuple(_MS_ELEMENTWISE) + ("QGemm", "QLinearConcat")
_SUB_BYTE = {TensorProto.INT4: (TensorProto.INT8, -8, 7), TensorProto.UINT4: (TensorProto.UINT8, 0, 15),
             TensorProto.INT2: (TensorProto.INT8, -2, 1), TensorProto.UINT2: (TensorProto.UINT8, 0, 3)}
_FLOAT_SMALL = {getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
                                                  "FLOAT8E5M2FNUZ", "FLOAT4E2M1", "FLOAT8E8M0")
                if hasattr(TensorProto, n)}
_RANGES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT16: (-32768, 32767),
           TensorProto.UINT16: (0, 65535), TensorProto.INT32: (-(2 ** 31), 2 ** 31 - 1)}


class _Rewriter:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.g = g
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple | None] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            infos = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
        except Exception:  # noqa: BLE001 - best effort: declared types only
            infos = list(g.value_info) + list(g.input) + list(g.output)
        for vi in infos:
            if vi.type.HasField("tensor_type"):
                tt = vi.type.tensor_type
                self.types[vi.name] = tt.elem_type
                if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                    self.shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
        self.consts = {t.name: t for t in g.initializer}
        for t in g.initializer:
            self.types[t.name] = t.data_type
            self.shapes[t.name] = tuple(t.dims)
        self.new_inits: list[onnx.TensorProto] = []
        self.narrowed: dict[str, tuple[int, int]] = {}  # weights constant_clip folded -> clip bounds
        self.counter = 0

    def constant_clip(self, n: onnx.NodeProto) -> bool:
        """``Clip`` of an 8-bit integer initializer by constant bounds (Brevitas's QCDQ
        export clips its weights to their narrow range this way): its output becomes an
        initializer of the clipped values, so the weight DequantizeLinear reads a
        constant. False (node kept) for anything else."""
        ins = list(n.input)
        if not ins or ins[0] not in self.consts or self.consts[ins[0]].data_type not in (TensorProto.INT8,
                                                                                           TensorProto.UINT8):
            return False
        if any(i and i not in self.consts for i in ins[1:]):
            return False
        w = numpy_helper.to_array(self.consts[ins[0]])
        lo = numpy_helper.to_array(self.consts[ins[1]]) if len(ins) > 1 and ins[1] else None
        hi = numpy_helper.to_array(self.consts[ins[2]]) if len(ins) > 2 and ins[2] else None
        if (lo is not None and lo.size != 1) or (hi is not None and hi.size != 1):
            return False
        clipped = np.clip(w, None if lo is None else lo.item(), None if hi is None else hi.item()).astype(w.dtype)
        self.new_inits.append(numpy_helper.from_array(clipped, n.output[0]))
        if lo is not None and hi is not None:
            self.narrowed[n.output[0]] = (int(lo.item()), int(hi.item()))
        self.consts[n.output[0]] = self.new_inits[-1]
        self.types[n.output[0]] = self.consts[ins[0]].data_type
        return True

    def annotate_clipped(self, n: onnx.NodeProto) -> onnx.NodeProto:
        """The DequantizeLinear of a weight :meth:`constant_clip` folded, with the clip's
        width as ``soniq.bits`` metadata (the int8 type alone would say 8 bits)."""
        lo, hi = self.narrowed[n.input[0]]
        signed = lo < 0
        # the two's complement (or unsigned) width that holds [lo, hi]
        bits = max(1, bits_from_range(min(lo, -1 - hi), max(hi, -1 - lo)) if signed else bits_from_range(0, hi))
        shape = self.shapes.get(n.input[0]) or ()
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        axis = axis % len(shape) if shape else 0
        node = onnx.NodeProto()
        node.CopyFrom(n)
        count = shape[axis] if shape else 1
        for key, value in ((KEY_BITS, json.dumps([bits] * count)), (KEY_AXIS, str(axis)),
                           (KEY_SIGNED, "1" if signed else "0")):
            node.metadata_props.add(key=key, value=value)
        return node

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}__soniq{self.counter}"

    def const(self, value: np.ndarray, base: str) -> str:
        name = self.fresh(base)
        self.new_inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def value(self, name: str):
        t = self.consts.get(name)
        return None if t is None else numpy_helper.to_array(t)

    # ---- QOperator and integer ops -------------------------------------------------------
    def qlinear(self, n: onnx.NodeProto, label: str) -> list[onnx.NodeProto]:
        conv = n.op_type == "QLinearConv"
        ins = list(n.input) + [""] * (9 - len(n.input))
        x, xs, xz, w, ws, wz, ys, yz = ins[:8]
        bias = ins[8] if conv else ""
        nodes = []
        # float16 scales: compute in float32, as the integer op does (exact products, one rounding)
        xs, ws, ys = (self._float32(t, label, nodes) for t in (xs, ws, ys))
        xd, wd, yf = self.fresh(f"{label}_x"), self.fresh(f"{label}_w"), self.fresh(f"{label}_y")
        nodes.append(helper.make_node("DequantizeLinear", [x, xs, xz], [xd], name=f"{label}/dq_x",
                                      **self._axis(xs, -2 if not conv else 1)))
        nodes.append(helper.make_node("DequantizeLinear", [w, ws, wz], [wd], name=f"{label}/dq_w",
                                      **self._axis(ws, 0 if conv else -1)))
        inputs = [xd, wd]
        if bias:
            bs = self.product(xs, ws, f"{label}_bias_scale", nodes)
            bd = self.fresh(f"{label}_bias")
            nodes.append(helper.make_node("DequantizeLinear", [bias, bs], [bd], name=f"{label}/dq_b",
                                          **self._axis(ws, 0)))
            inputs.append(bd)
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        nodes.append(helper.make_node("Conv" if conv else "MatMul", inputs, [yf], name=label,
                                      **(attrs if conv else {})))
        nodes.append(helper.make_node("QuantizeLinear", [yf, ys, yz], list(n.output), name=f"{label}/q_y"))
        return nodes

    def ms_elementwise(self, n: onnx.NodeProto, label: str) -> list[onnx.NodeProto]:
        """ORT's QLinear{Add,Mul,Sigmoid,LeakyRelu,GlobalAveragePool,AveragePool}."""
        op, triples, out_at = _MS_ELEMENTWISE[n.op_type]
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if attrs.pop("channels_last", 0):
            raise UnsupportedModelError(f"{n.op_type} with channels_last=1 is not supported", node=label,
                                        hint="quantize the model in NCHW (channels_last=0)")
        if int(attrs.pop("opset", 13)) < 13:
            raise UnsupportedModelError(f"{n.op_type} with opset < 13 semantics (a flattened axis) is not "
                                        "supported", node=label, hint="quantize the model at opset 13 or later")
        ins = list(n.input) + [""] * (out_at + 2 - len(n.input))
        nodes, deq = [], []
        for k, at in enumerate(triples):
            out = self.fresh(f"{label}_in{k}")
            nodes.append(helper.make_node("DequantizeLinear", ins[at:at + 3], [out], name=f"{label}/dq{k}"))
            deq.append(out)
        yf = self.fresh(f"{label}_y")
        nodes.append(helper.make_node(op, deq, [yf], name=label, **attrs))
        nodes.append(helper.make_node("QuantizeLinear", [yf] + ins[out_at:out_at + 2], list(n.output),
                                      name=f"{label}/q_y"))
        return nodes

    def ms_concat(self, n: onnx.NodeProto, label: str) -> list[onnx.NodeProto]:
        """ORT's QLinearConcat(Y_scale, Y_zp, X0, X0_scale, X0_zp, ...)."""
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        nodes, deq = [], []
        for k in range((len(n.input) - 2) // 3):
            out = self.fresh(f"{label}_in{k}")
            nodes.append(helper.make_node("DequantizeLinear", list(n.input[2 + 3 * k: 5 + 3 * k]), [out],
                                          name=f"{label}/dq{k}"))
            deq.append(out)
        yf = self.fresh(f"{label}_y")
        nodes.append(helper.make_node("Concat", deq, [yf], name=label, **attrs))
        nodes.append(helper.make_node("QuantizeLinear", [yf, n.input[0], n.input[1]], list(n.output),
                                      name=f"{label}/q_y"))
        return nodes

    def ms_gemm(self, n: onnx.NodeProto, label: str) -> list[onnx.NodeProto]:
        """ORT's QGemm(A, a_scale, a_zp, B, b_scale, b_zp, C?, y_scale?, y_zp?)."""
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        ins = list(n.input) + [""] * (9 - len(n.input))
        a, a_s, a_z, b, b_s, b_z, c, y_s, y_z = ins[:9]
        nodes = []
        ad, bd, yf = self.fresh(f"{label}_a"), self.fresh(f"{label}_b"), self.fresh(f"{label}_y")
        nodes.append(helper.make_node("DequantizeLinear", [a, a_s, a_z], [ad], name=f"{label}/dq_a"))
        b_axis = 0 if attrs.get("transB", 0) else 1
        nodes.append(helper.make_node("DequantizeLinear", [b, b_s, b_z], [bd], name=f"{label}/dq_b",
                                      **self._axis(b_s, b_axis)))
        inputs = [ad, bd]
        if c:
            cs, cd = self.product(a_s, b_s, f"{label}_c_scale", nodes), self.fresh(f"{label}_c")
            nodes.append(helper.make_node("DequantizeLinear", [c, cs], [cd], name=f"{label}/dq_c",
                                          **self._axis(b_s, 0)))
            inputs.append(cd)
        out = yf if y_s else n.output[0]
        nodes.append(helper.make_node("Gemm", inputs, [out], name=label, **attrs))
        if y_s:
            nodes.append(helper.make_node("QuantizeLinear", [yf, y_s, y_z], list(n.output), name=f"{label}/q_y"))
        return nodes

    def integer(self, n: onnx.NodeProto, label: str) -> list[onnx.NodeProto]:
        conv = n.op_type == "ConvInteger"
        ins = list(n.input) + [""] * (4 - len(n.input))
        x, w, xz, wz = ins[:4]
        nodes, deq = [], []
        for role, t, z, axis in (("x", x, xz, 1 if conv else -2), ("w", w, wz, 0 if conv else -1)):
            out = self.fresh(f"{label}_{role}")
            if z:
                zshape = self.shapes.get(z)
                if zshape is None:
                    raise UnsupportedModelError("the zero point needs a static shape", node=label, tensor=z)
                ones = self.const(np.ones(zshape, np.float32), f"{label}_{role}_one")
                extra = {"axis": axis} if zshape not in ((), (1,)) else {}
                nodes.append(helper.make_node("DequantizeLinear", [t, ones, z], [out], name=f"{label}/dq_{role}",
                                              **extra))
            else:
                one = self.const(np.array(1.0, np.float32), f"{label}_one")
                nodes.append(helper.make_node("DequantizeLinear", [t, one], [out], name=f"{label}/dq_{role}"))
            deq.append(out)
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        yf = self.fresh(f"{label}_y")
        nodes.append(helper.make_node("Conv" if conv else "MatMul", deq, [yf], name=label,
                                      **(attrs if conv else {})))
        nodes.append(helper.make_node("Cast", [yf], list(n.output), name=f"{label}/to_int32", to=TensorProto.INT32))
        return nodes

    def product(self, a: str, b: str, base: str, nodes: list) -> str:
        """``a * b``: a constant when both are (the usual file), else a Mul node."""
        va, vb = self.value(a), self.value(b)
        if va is not None and vb is not None:
            name = self.const((va.astype(np.float32) * vb.astype(np.float32)).astype(np.float32), base)
            self.shapes[name] = tuple(np.broadcast_shapes(va.shape, vb.shape))
            return name
        name = self.fresh(base)
        nodes.append(helper.make_node("Mul", [a, b], [name], name=f"{base}/mul"))
        return name

    def _float32(self, name: str, label: str, nodes: list) -> str:
        if self.types.get(name, TensorProto.FLOAT) == TensorProto.FLOAT:
            return name
        out = self.fresh(f"{label}_{name}_f32")
        nodes.append(helper.make_node("Cast", [name], [out], name=f"{label}/{name}_f32", to=TensorProto.FLOAT))
        self.shapes[out] = self.shapes.get(name)
        return out

    def _axis(self, scale: str, axis: int) -> dict:
        shape = self.shapes.get(scale)
        return {"axis": axis} if shape not in (None, (), (1,)) else {}

    # ---- typed and blocked Q/DQ ------------------------------------------------------------
    def blocked(self, n: onnx.NodeProto, label: str) -> list[onnx.NodeProto]:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        block = int(attrs.get("block_size", 0))
        x, s = n.input[0], n.input[1]
        z = n.input[2] if len(n.input) > 2 else ""
        xshape = self.shapes.get(x)
        if xshape is None:
            raise UnsupportedModelError("blocked quantization needs the static shape of its input",
                                        node=label, tensor=x)
        axis = int(attrs.get("axis", 1)) % len(xshape)
        nodes = []
        s_full = self._repeat(s, axis, block, xshape[axis], label, nodes)
        z_full = self._repeat(z, axis, block, xshape[axis], label, nodes) if z else ""
        ftype = self.types.get(s, TensorProto.FLOAT)
        if n.op_type == "DequantizeLinear":
            xf = self.fresh(f"{label}_xf")
            nodes.append(helper.make_node("Cast", [x], [xf], name=f"{label}/cast_x", to=ftype))
            if z_full:
                zf, d = self.fresh(f"{label}_zf"), self.fresh(f"{label}_centred")
                nodes.append(helper.make_node("Cast", [z_full], [zf], name=f"{label}/cast_z", to=ftype))
                nodes.append(helper.make_node("Sub", [xf, zf], [d], name=f"{label}/sub_z"))
                xf = d
            nodes.append(helper.make_node("Mul", [xf, s_full], list(n.output), name=label))
            return nodes
        out_type = self.types.get(z) if z else int(attrs.get("output_dtype", 0)) or TensorProto.UINT8
        carrier, lo, hi = _SUB_BYTE.get(out_type, (out_type, *_RANGES.get(out_type, (0, 255))))
        q, r = self.fresh(f"{label}_q"), self.fresh(f"{label}_r")
        nodes.append(helper.make_node("Div", [x, s_full], [q], name=f"{label}/div_s"))
        nodes.append(helper.make_node("Round", [q], [r], name=f"{label}/round"))
        if z_full:
            zf, a = self.fresh(f"{label}_zf"), self.fresh(f"{label}_plus_z")
            nodes.append(helper.make_node("Cast", [z_full], [zf], name=f"{label}/cast_z",
                                          to=self.types.get(x, TensorProto.FLOAT)))
            nodes.append(helper.make_node("Add", [r, zf], [a], name=f"{label}/add_z"))
            r = a
        c = self.fresh(f"{label}_sat")
        lo_n = self.const(np.array(lo, np.float32), f"{label}_lo")
        hi_n = self.const(np.array(hi, np.float32), f"{label}_hi")
        nodes.append(helper.make_node("Clip", [r, lo_n, hi_n], [c], name=f"{label}/saturate"))
        nodes.append(helper.make_node("Cast", [c], list(n.output), name=label, to=carrier))
        self.types[n.output[0]] = carrier
        return nodes

    def _repeat(self, name: str, axis: int, block: int, length: int, label: str, nodes: list) -> str:
        """``name`` repeated ``block`` times along ``axis`` and cut to ``length``."""
        v = self.value(name)
        if v is not None:
            return self.const(np.take(np.repeat(v, block, axis=axis), np.arange(length), axis=axis),
                              f"{label}_{name}_full")
        shape = self.shapes.get(name)
        if shape is None:
            raise UnsupportedModelError("blocked quantization needs the static shape of its scale",
                                        node=label, tensor=name)
        idx = self.const(np.arange(length, dtype=np.int64) // block, f"{label}_block_index")
        out = self.fresh(f"{label}_{name}_full")
        nodes.append(helper.make_node("Gather", [name, idx], [out], name=f"{label}/repeat_{name}", axis=axis))
        return out

    def retype_sub_byte(self) -> list[onnx.NodeProto]:
        """Graph inputs/outputs and QuantizeLinear results of sub-byte types: int8/uint8
        carriers, clipped to the width's range."""
        g = self.g
        prelude = []
        for vi in g.input:
            t = vi.type.tensor_type.elem_type
            if t in _SUB_BYTE and vi.name not in self.consts:
                carrier, lo, hi = _SUB_BYTE[t]
                vi.type.tensor_type.elem_type = carrier
                raw = self.fresh(f"{vi.name}_carrier")
                self.types[raw] = t  # still a sub-byte value for the rewrites below
                prelude.append((vi.name, raw, carrier, lo, hi))
        for vi in g.output:
            t = vi.type.tensor_type.elem_type
            if t in _SUB_BYTE:
                vi.type.tensor_type.elem_type = _SUB_BYTE[t][0]
        nodes = []
        rename = {}
        for name, raw, carrier, lo, hi in prelude:
            rename[name] = raw
        for n in g.node:
            for i, inp in enumerate(n.input):
                if inp in rename:
                    n.input[i] = rename[inp]
        for name, raw, carrier, lo, hi in prelude:
            # the input keeps its name; the clipped carrier feeds the graph
            dtype = np.int8 if carrier == TensorProto.INT8 else np.uint8
            lo_n, hi_n = self.const(np.array(lo, dtype), f"{name}_lo"), self.const(np.array(hi, dtype), f"{name}_hi")
            nodes.append(helper.make_node("Clip", [name, lo_n, hi_n], [raw], name=f"{name}/width"))
        return nodes

    def quantize_sub_byte(self, n: onnx.NodeProto, label: str) -> list[onnx.NodeProto]:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        z = n.input[2] if len(n.input) > 2 else ""
        t = self.types.get(z) if z else int(attrs.get("output_dtype", 0))
        carrier, lo, hi = _SUB_BYTE[t]
        dtype = np.int8 if carrier == TensorProto.INT8 else np.uint8
        new_z = z
        if z and z in self.consts:
            new_z = self.const(self.value(z).astype(dtype), f"{label}_zero_point")
        elif z:
            new_z = self.fresh(f"{label}_zero_point")
        wide = self.fresh(f"{label}_wide")
        kept = {k: v for k, v in attrs.items() if k not in ("output_dtype",)}
        if not z:
            kept["output_dtype"] = carrier
        nodes = []
        if z and z not in self.consts:
            nodes.append(helper.make_node("Cast", [z], [new_z], name=f"{label}/zero_point", to=carrier))
        nodes.append(helper.make_node("QuantizeLinear", [n.input[0], n.input[1]] + ([new_z] if z else []), [wide],
                                      name=label, **kept))
        lo_n, hi_n = self.const(np.array(lo, dtype), f"{label}_lo"), self.const(np.array(hi, dtype), f"{label}_hi")
        nodes.append(helper.make_node("Clip", [wide, lo_n, hi_n], list(n.output), name=f"{label}/width"))
        self.types[n.output[0]] = carrier
        return nodes

    def dequantize_sub_byte_zero_point(self, n: onnx.NodeProto, label: str) -> list[onnx.NodeProto]:
        """A DQ whose (non-constant) zero point is sub-byte typed: carried in int8/uint8."""
        z = n.input[2]
        carrier = _SUB_BYTE[self.types[z]][0]
        new_z = self.fresh(f"{label}_zero_point")
        out = onnx.NodeProto()
        out.CopyFrom(n)
        out.input[2] = new_z
        return [helper.make_node("Cast", [z], [new_z], name=f"{label}/zero_point", to=carrier), out]


def _refuse_small_floats(model: onnx.ModelProto, rw: _Rewriter) -> None:
    for i, n in enumerate(model.graph.node):
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for name in list(n.input) + list(n.output):
            if name and rw.types.get(name) in _FLOAT_SMALL:
                kind = TensorProto.DataType.Name(rw.types[name]).lower()
                raise UnsupportedModelError(
                    f"{kind} quantization is not supported (integer Q/DQ only)", node=node_label(n, i),
                    tensor=name, hint="quantize to int8/uint8 (or int4/int2) instead")


def to_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in plain QDQ form (see the module docstring); the model
    itself when there is nothing to rewrite."""
    g = model.graph
    needs = any(n.op_type in QOPERATOR_OPS + _MS_OPS for n in g.node) or any(
        n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node)
    if not needs:
        return model
    out = _at_least_opset_13(model)
    rw = _Rewriter(out)
    _refuse_small_floats(out, rw)
    prelude = rw.retype_sub_byte()
    nodes = []
    changed = bool(prelude)
    for i, n in enumerate(out.graph.node):
        label = node_label(n, i)
        blocked = any(a.name == "block_size" and a.i > 0 for a in n.attribute)
        ms = n.domain == "com.microsoft"
        if ms and n.op_type in _MS_ELEMENTWISE:
            nodes.extend(rw.ms_elementwise(n, label))
        elif ms and n.op_type == "QGemm":
            nodes.extend(rw.ms_gemm(n, label))
        elif ms and n.op_type == "QLinearConcat":
            nodes.extend(rw.ms_concat(n, label))
        elif n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        elif n.op_type == "Clip" and rw.constant_clip(n):
            pass  # an integer weight clipped to its narrow range: the clipped values are the initializer
        elif n.op_type == "DequantizeLinear" and n.input[0] in rw.narrowed:
            nodes.append(rw.annotate_clipped(n))
        elif n.op_type in ("QLinearConv", "QLinearMatMul"):
            nodes.extend(rw.qlinear(n, label))
        elif n.op_type in ("ConvInteger", "MatMulInteger"):
            nodes.extend(rw.integer(n, label))
        elif n.op_type in ("QuantizeLinear", "DequantizeLinear") and blocked:
            nodes.extend(rw.blocked(n, label))
        elif n.op_type == "QuantizeLinear" and _q_type(n, rw) in _SUB_BYTE:
            nodes.extend(rw.quantize_sub_byte(n, label))
        elif n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[2] \
                and n.input[2] not in rw.consts and rw.types.get(n.input[2]) in _SUB_BYTE:
            nodes.extend(rw.dequantize_sub_byte_zero_point(n, label))
        else:
            nodes.append(n)
            continue
        changed = True
    if not changed:
        return model
    del out.graph.node[:]
    out.graph.node.extend(prelude + nodes)
    out.graph.initializer.extend(rw.new_inits)
    _drop_stale_value_info(out)
    return out


def _at_least_opset_13(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy at opset 13 or later: per-axis DequantizeLinear and Clip with inputs
    need it (older QOperator files are converted with onnx's version converter)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset >= 13:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, 13)
    except Exception as e:  # noqa: BLE001 - the converter raises plain RuntimeErrors
        raise UnsupportedModelError(f"opset {opset} QOperator file could not be converted to opset 13: {e}",
                                    hint="convert it with onnx.version_converter, or export at opset 13+") from None


def _q_type(n: onnx.NodeProto, rw: _Rewriter) -> int | None:
    if len(n.input) > 2 and n.input[2]:
        return rw.types.get(n.input[2])
    for a in n.attribute:
        if a.name == "output_dtype":
            return a.i
    return None


def _drop_stale_value_info(model: onnx.ModelProto) -> None:
    """value_info of tensors whose type the rewrite changed would contradict it."""
    keep = [vi for vi in model.graph.value_info if vi.type.tensor_type.elem_type not in _SUB_BYTE]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
