"""Export a prepared SONIQ model to a ``soniq-qdq/1`` ONNX file.

The exporter runs the prepared ``GraphModule`` once on the example input with a
``torch.fx.Interpreter`` and, node by node, emits the same computation through
:class:`soniq_tvm.builder.QDQBuilder`: every QConv2d/QLinear/QMatMul becomes
QuantizeLinear -> Max -> Min -> DequantizeLinear on its inputs and an integer weight
with its DequantizeLinear, annotated with per-channel bits; the float ops in between
become their ONNX twins. Shapes are those of the example input (static). torch's
own ONNX exporter is not used.

ONNX Runtime on the file computes what the model computes in eval mode: the same
integers (quantize = divide, round half to even, clamp), the same float32 scales.
"""
from __future__ import annotations

import operator
import os

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from soniq_tvm.errors import ExportError

from .modules import QConv2d, QLinear, QMatMul
from .prepare import _owner

__all__ = ["export_onnx"]

_BINARY = {
    operator.add: "Add", torch.add: "Add", "add": "Add", "__add__": "Add",
    operator.sub: "Sub", torch.sub: "Sub", "sub": "Sub", "__sub__": "Sub",
    operator.mul: "Mul", torch.mul: "Mul", "mul": "Mul", "__mul__": "Mul",
    operator.truediv: "Div", torch.div: "Div", "div": "Div", "__truediv__": "Div",
}
_UNARY = {
    F.relu: "Relu", torch.relu: "Relu", "relu": "Relu",
    torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", "sigmoid": "Sigmoid",
    torch.tanh: "Tanh", F.tanh: "Tanh", "tanh": "Tanh",
    torch.exp: "Exp", "exp": "Exp", torch.neg: "Neg", operator.neg: "Neg", "neg": "Neg",
}
_RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
             "view", "reshape", "flatten", "squeeze", "unsqueeze"}
_IDENTITY_MODULES = (nn.Dropout, nn.Identity)
_IDENTITY_CALLS = {F.dropout, "contiguous", "clone", "detach"}


class _Exporter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, builder, input_names, output_names):
        super().__init__(gm)
        self.b = builder
        self.input_names = list(input_names) if input_names else None
        self.output_names = list(output_names) if output_names else None
        self.onnx: dict[fx.Node, object] = {}  # fx node -> ONNX name(s) of its tensor value(s)
        self.n_inputs = 0
        self.single_input = sum(1 for n in gm.graph.nodes if n.op == "placeholder") == 1

    # ---- helpers -------------------------------------------------------------
    def _name(self, arg, value):
        """ONNX name for an argument: a traced tensor, or a constant."""
        if isinstance(arg, fx.Node):
            name = self.onnx.get(arg)
            if name is None:
                raise ExportError("a tensor the exporter could not follow reaches an operation",
                                  node=_owner(arg))
            return name
        if isinstance(value, torch.Tensor):
            return self.b.const(value.detach().cpu().numpy())
        return self.b.const(np.asarray(value, np.float32))

    def _arg_value(self, arg):
        if isinstance(arg, fx.Node):
            return self.env[arg]
        return arg

    def _unsupported(self, node: fx.Node, what: str):
        raise ExportError(f"{what} is not supported by the SONIQ exporter", node=_owner(node),
                          hint="supported: QConv2d/QLinear/QMatMul, ReLU/GELU/Sigmoid/Tanh/Softmax, "
                               "pooling, LayerNorm, reshapes/transposes, + - * /")

    # ---- interpreter hooks -----------------------------------------------------
    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.op == "output":
            self._outputs(n)
            return value
        if n.op == "placeholder":
            if not isinstance(value, torch.Tensor):
                raise ExportError("only tensor inputs can be exported", node=n.name)
            if self.input_names:
                name = self.input_names[self.n_inputs]
            else:
                name = "x" if self.single_input else n.name
            self.n_inputs += 1
            self.onnx[n] = self.b.input(name, list(value.shape))
            return value
        if n.op == "get_attr":
            if isinstance(value, torch.Tensor):
                self.onnx[n] = self.b.const(value.detach().cpu().numpy().astype(np.float32),
                                            name=str(n.target))
            return value
        if not isinstance(value, torch.Tensor):
            # sizes, shapes, tuples of ints: kept as Python values (static shapes)
            if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
                self._unsupported(n, f"an operation returning several tensors ({n.target})")
            return value
        self.onnx[n] = self._emit(n, value)
        return value

    def _outputs(self, n: fx.Node) -> None:
        arg = n.args[0]
        nodes = arg if isinstance(arg, (tuple, list)) else [arg]
        for i, node in enumerate(nodes):
            if not isinstance(node, fx.Node) or node not in self.onnx:
                raise ExportError("model outputs must be tensors computed from the input", node="output")
            if self.output_names:
                name = self.output_names[i]
            else:
                name = "y" if len(nodes) == 1 else f"y{i}"
            self.b.output(self.onnx[node], name)

    def _emit(self, n: fx.Node, value: torch.Tensor):
        if n.op == "call_module":
            mod = self.module.get_submodule(n.target)
            return self._emit_module(n, mod, value)
        target = n.target
        args = list(n.args)
        kwargs = dict(n.kwargs)
        key = target if n.op == "call_function" else str(target)
        if key in _IDENTITY_CALLS:
            return self.onnx[args[0]]
        if key in _BINARY:
            a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
            if "alpha" in kwargs:
                self._unsupported(n, "add/sub with alpha")
            va, vb = self._arg_value(a), self._arg_value(b)
            dtype = np.float32
            na = self._name(a, va if isinstance(va, torch.Tensor) else np.asarray(va, dtype))
            nb = self._name(b, vb if isinstance(vb, torch.Tensor) else np.asarray(vb, dtype))
            return self.b.node(_BINARY[key], [na, nb])
        if key in _UNARY:
            return self.b.node(_UNARY[key], [self.onnx[args[0]]])
        if key in (F.gelu, "gelu"):
            approx = kwargs.get("approximate", "none")
            return self.b.node("Gelu", [self.onnx[args[0]]], approximate=approx)
        if key in (torch.softmax, F.softmax, "softmax"):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim is None:
                self._unsupported(n, "softmax without dim")
            return self.b.node("Softmax", [self.onnx[args[0]]], axis=int(dim))
        if key in _RESHAPES:
            return self._reshape(args[0], value)
        if key in (torch.transpose, "transpose"):
            rank = self._arg_value(args[0]).dim()
            d0, d1 = int(args[1]) % rank, int(args[2]) % rank
            perm = list(range(rank))
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return self.b.node("Transpose", [self.onnx[args[0]]], perm=perm)
        if key in (torch.permute, "permute"):
            rank = self._arg_value(args[0]).dim()
            dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            if not dims:
                dims = kwargs.get("dims")
            return self.b.node("Transpose", [self.onnx[args[0]]], perm=[int(d) % rank for d in dims])
        if key in (torch.mean, "mean", torch.sum, "sum"):
            op = "ReduceMean" if key in (torch.mean, "mean") else "ReduceSum"
            x = self._arg_value(args[0])
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = bool(args[2] if len(args) > 2 else kwargs.get("keepdim", False))
            dims = list(range(x.dim())) if dim is None else ([dim] if isinstance(dim, int) else list(dim))
            axes = np.asarray([int(d) % x.dim() for d in dims], np.int64)
            return self.b.node(op, [self.onnx[args[0]], axes], keepdims=int(keep))
        if key is torch.cat:
            tensors = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            rank = value.dim()
            names = [self._name(t, self._arg_value(t)) for t in tensors]
            return self.b.node("Concat", names, axis=int(dim) % rank)
        if key is operator.getitem:
            return self._getitem(n, args[0], args[1], value)
        if key is F.layer_norm:
            self._unsupported(n, "functional layer_norm")
        self._unsupported(n, f"operation {getattr(target, '__name__', target)!r}")

    def _reshape(self, src: fx.Node, value: torch.Tensor):
        shape = np.asarray(list(value.shape), np.int64)
        return self.b.node("Reshape", [self.onnx[src], shape])

    def _getitem(self, n: fx.Node, src, index, value):
        x = self._arg_value(src)
        if not isinstance(x, torch.Tensor):
            self._unsupported(n, "indexing a non-tensor")
        idx = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (fx.Node, torch.Tensor, list)) for i in idx):
            self._unsupported(n, "tensor (advanced) indexing")
        # expand Ellipsis, then take every int/slice as a slice; None adds a dim
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        full = []
        for i in idx:
            if i is Ellipsis:
                full.extend([slice(None)] * (x.dim() - n_real))
            else:
                full.append(i)
        starts, ends, axes, steps = [], [], [], []
        axis = 0
        for i in full:
            if i is None:
                continue
            size = x.shape[axis]
            if isinstance(i, int):
                start = i % size
                starts.append(start), ends.append(start + 1), axes.append(axis), steps.append(1)
            elif isinstance(i, slice):
                start, stop, step = i.indices(size)
                if (start, stop, step) != (0, size, 1):
                    if step < 0:
                        self._unsupported(n, "negative slice steps")
                    starts.append(start), ends.append(stop), axes.append(axis), steps.append(step)
            else:
                self._unsupported(n, f"index {i!r}")
            axis += 1
        name = self.onnx[src]
        if starts:
            name = self.b.node("Slice", [name, np.asarray(starts, np.int64), np.asarray(ends, np.int64),
                                         np.asarray(axes, np.int64), np.asarray(steps, np.int64)])
        return self.b.node("Reshape", [name, np.asarray(list(value.shape), np.int64)])

    # ---- modules -----------------------------------------------------------------
    def _emit_module(self, n: fx.Node, mod: nn.Module, value: torch.Tensor):
        path = str(n.target)
        src = n.args[0] if n.args else None
        if isinstance(mod, QConv2d):
            return self._qconv(path, mod, src)
        if isinstance(mod, QLinear):
            return self._qlinear(path, mod, src)
        if isinstance(mod, QMatMul):
            return self._qmatmul(path, mod, n.args[0], n.args[1])
        x = self.onnx.get(src) if isinstance(src, fx.Node) else None
        if x is None:
            self._unsupported(n, f"{type(mod).__name__} on a non-tensor input")
        if isinstance(mod, _IDENTITY_MODULES):
            return x
        if isinstance(mod, nn.ReLU):
            return self.b.node("Relu", [x], name=path)
        if isinstance(mod, nn.ReLU6):
            return self.b.node("Clip", [x, np.float32(0.0), np.float32(6.0)], name=path)
        if isinstance(mod, nn.GELU):
            return self.b.node("Gelu", [x], name=path, approximate=mod.approximate)
        if isinstance(mod, nn.Sigmoid):
            return self.b.node("Sigmoid", [x], name=path)
        if isinstance(mod, nn.Tanh):
            return self.b.node("Tanh", [x], name=path)
        if isinstance(mod, nn.SiLU):
            sig = self.b.node("Sigmoid", [x])
            return self.b.node("Mul", [x, sig], name=path)
        if isinstance(mod, nn.Softmax):
            if mod.dim is None:
                self._unsupported(n, "Softmax without dim")
            return self.b.node("Softmax", [x], name=path, axis=int(mod.dim))
        if isinstance(mod, nn.MaxPool2d):
            return self.b.node("MaxPool", [x], name=path, **self._pool_attrs(mod, n, dilation=True))
        if isinstance(mod, nn.AvgPool2d):
            if mod.divisor_override is not None:
                self._unsupported(n, "AvgPool2d with divisor_override")
            return self.b.node("AveragePool", [x], name=path,
                               count_include_pad=int(mod.count_include_pad), **self._pool_attrs(mod, n))
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            in_hw = tuple(self._arg_value(src).shape[-2:])
            out_hw = tuple(value.shape[-2:])
            if out_hw == (1, 1):
                return self.b.node("GlobalAveragePool", [x], name=path)
            if all(i % o == 0 for i, o in zip(in_hw, out_hw)):
                k = [i // o for i, o in zip(in_hw, out_hw)]
                return self.b.node("AveragePool", [x], name=path, kernel_shape=k, strides=k)
            self._unsupported(n, "AdaptiveAvgPool2d to a size that does not divide the input")
        if isinstance(mod, nn.Flatten):
            return self._reshape(src, value)
        if isinstance(mod, nn.LayerNorm):
            shape = tuple(mod.normalized_shape)
            w = (mod.weight.detach().cpu().numpy() if mod.weight is not None
                 else np.ones(shape, np.float32))
            inputs = [x, w.astype(np.float32)]
            if mod.bias is not None:
                inputs.append(mod.bias.detach().cpu().numpy().astype(np.float32))
            return self.b.node("LayerNormalization", inputs, name=path, axis=-len(shape),
                               epsilon=float(mod.eps))
        self._unsupported(n, f"module {type(mod).__name__}")

    @staticmethod
    def _pair(v):
        return list(v) if isinstance(v, (tuple, list)) else [v, v]

    def _pool_attrs(self, mod, n, dilation=False):
        k = self._pair(mod.kernel_size)
        s = self._pair(mod.stride if mod.stride is not None else mod.kernel_size)
        p = self._pair(mod.padding)
        attrs = dict(kernel_shape=k, strides=s, pads=[p[0], p[1], p[0], p[1]], ceil_mode=int(mod.ceil_mode))
        if dilation:
            d = self._pair(mod.dilation)
            if d != [1, 1]:
                attrs["dilations"] = d
            if getattr(mod, "return_indices", False):
                self._unsupported(n, "MaxPool2d with return_indices")
        return attrs

    def _quant_input(self, path: str, suffix: str, src: fx.Node, scale: float, bits, signed: bool, axis: int):
        x = self.onnx.get(src) if isinstance(src, fx.Node) else None
        if x is None:
            raise ExportError("the input of a quantized layer is not a traced tensor", node=path)
        step = np.float32(scale) if np.ndim(scale) == 0 else np.asarray(scale, np.float32)  # per tensor / channel
        return self.b.quant_act(x, step, bits, signed, axis=axis, name=f"{path}.{suffix}")

    def _qconv(self, path: str, mod: QConv2d, src: fx.Node):
        x_val = self._arg_value(src)
        scale, a_bits, a_signed = mod.export_act()
        xq = self._quant_input(path, "x", src, scale, a_bits, a_signed, axis=1)
        w_int, w_scale, w_bits, w_axis = mod.export_weight()
        bias = None if mod.bias is None else mod.bias.detach().cpu().numpy().astype(np.float32)
        return self.b.conv(xq, w_int, w_scale, w_bits, w_axis=w_axis, bias=bias,
                           strides=list(mod.stride), pads=list(mod.pads(tuple(x_val.shape[-2:]))),
                           dilations=list(mod.dilation), group=mod.groups, name=path)

    def _qlinear(self, path: str, mod: QLinear, src: fx.Node):
        rank = self._arg_value(src).dim()
        scale, a_bits, a_signed = mod.export_act()
        xq = self._quant_input(path, "x", src, scale, a_bits, a_signed, axis=rank - 1)
        w_int, w_scale, w_bits, w_axis = mod.export_weight()  # w_int [N, K]; w_axis 1 (K) or 0 (N)
        bias = None if mod.bias is None else mod.bias.detach().cpu().numpy().astype(np.float32)
        if rank == 2:
            return self.b.gemm(xq, w_int, w_scale, w_bits, w_axis=w_axis, bias=bias, name=path)
        return self.b.matmul(xq, np.ascontiguousarray(w_int.T), w_scale, w_bits, w_axis=1 - w_axis,
                             bias=bias, name=path)

    def _qmatmul(self, path: str, mod: QMatMul, a: fx.Node, b: fx.Node):
        (sa, ba, ga), (sb, bb, gb) = mod.export_operands()
        ra, rb = self._arg_value(a).dim(), self._arg_value(b).dim()
        aq = self._quant_input(path, "a", a, sa, ba, ga, axis=ra - 1)
        bq = self._quant_input(path, "b", b, sb, bb, gb, axis=rb - 2)
        return self.b.matmul_act(aq, bq, name=path)


def export_onnx(qmodel: nn.Module, example_input, path: str | os.PathLike | None = None, *,
                input_names=None, output_names=None, opset: int = 21, name: str = "soniq_model"):
    """Write ``qmodel`` (from :func:`~soniq_tvm.torch.prepare`) as a ``soniq-qdq/1``
    ONNX file and return the ``onnx.ModelProto``.

    ``example_input``: a tensor (or tuple of tensors) fixing the input shapes.
    A single input is named ``x``, several after the ``forward`` arguments
    (``input_names`` overrides),
    outputs ``y`` (or ``y0, y1, ...``; ``output_names`` overrides). Channels take
    their snapped bits, or their nearest palette level if :func:`snap` was not
    called, exactly as in eval mode. ``path=None`` only returns the model.

    Raises :class:`~soniq_tvm.ExportError` naming the module of any layer or
    operation it cannot express.
    """
    from soniq_tvm.annotation import save_model
    from soniq_tvm.builder import QDQBuilder

    if not isinstance(qmodel, fx.GraphModule) or not hasattr(qmodel, "soniq_config"):
        raise ExportError("export_onnx needs a model returned by soniq_tvm.torch.prepare",
                          node=type(qmodel).__name__, hint="qmodel = prepare(model, palette, target_bits)")
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    builder = QDQBuilder(name, opset=opset)
    exporter = _Exporter(qmodel, builder, input_names, output_names)
    was_training = qmodel.training
    qmodel.eval()
    try:
        with torch.no_grad():
            exporter.run(*inputs)
    finally:
        qmodel.train(was_training)
    model = builder.build()
    if path is not None:
        save_model(model, path)
    return model
