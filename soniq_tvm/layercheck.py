"""Layer-by-layer check of a built module against the file it claims to compute.

A module built with probes (the default) returns, from its ``soniq_probe`` entry
point, the input codes and the int32 result of every integer kernel call. Two
checks follow, each naming the layer at fault:

* **kernels, exact.** Each kernel result must equal the exact integer
  reference computed in numpy from the module's own input codes and the *file's*
  weights and activation zero point (``sum (x - z) * w``, a split group with the
  file's channels of the group). Any difference is a wrong weight, channel or
  zero point; no tolerance.
* **glue, teacher-forced.** ONNX Runtime (graph optimisations off) runs the
  file with every folded conv/matmul replaced by the module's own kernel result
  (rescaled as the file says, bias added); everything between kernels (requantize,
  activations, residual adds, pools, attention, float layers) is ORT's. Its codes
  for each kernel's input tensor, and its outputs, are compared with the
  module's: a correct module differs only where fp32 rounding meets a tie (at
  most one code, in at most 1 in 10^4 codes), so depth cannot amplify anything.

Needs numpy, onnx and (for the glue) onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .naming import node_label
from .qop import QOp, reference
from .survey import survey

__all__ = ["FileLayer", "LayerCheck", "Forced", "file_layers", "kernel_checks", "act_checks", "forced_layers",
           "glue_checks", "MAX_FLIP_RATE"]

MAX_FLIP_RATE = 1e-4  # codes that may differ by one step at fp32 near-ties


@dataclass(frozen=True)
class LayerCheck:
    layer: str
    what: str  # "kernel", "glue" (a kernel's input codes) or "output"
    tensor: str
    count: int  # values compared
    differing: int
    max_diff: float  # in codes (kernel: in int32 units)
    detail: str = ""

    @property
    def ok(self) -> bool:
        if self.what == "kernel":
            return self.differing == 0
        return self.max_diff <= 1 and self.differing <= max(1, int(MAX_FLIP_RATE * self.count))

    def __str__(self) -> str:
        share = 100.0 * (1 - self.differing / self.count) if self.count else 100.0
        unit = "exact" if self.what == "kernel" and self.ok else f"{share:.3f}% identical, max {self.max_diff:g}"
        text = f"{self.what:6s} {self.layer} [{self.tensor}]: {unit}"
        if self.detail:
            text += f" ({self.detail})"
        return text + ("" if self.ok else "  <- FAIL")


@dataclass
class FileLayer:
    """What the file says about one quantized conv/matmul."""

    name: str
    op_type: str
    x_codes: str  # the tensor of activation codes the layer's DequantizeLinear reads
    x_scale: np.ndarray  # float32, one step per input channel
    x_zero: np.ndarray  # int64, one zero point per input channel
    w: np.ndarray  # int64, conv OIHW / matmul [K, N]
    w_scale: np.ndarray  # per output channel, float32
    bias: np.ndarray | None  # float32 per output channel
    alpha: float
    beta: float
    output: str
    groups: int = 1  # a grouped conv's group count

    @property
    def axis(self) -> int:
        return 1 if self.op_type == "Conv" else -1

    def scale_key(self, iidx: np.ndarray):
        """The (step, zero point) a kernel over input channels ``iidx`` reads them
        with: the module runs one integer kernel per such group and adds the terms
        in float. A grouped conv rescales per output channel: one key."""
        if self.groups > 1:
            return ("grouped",)
        return float(self.x_scale[iidx[0]]), int(self.x_zero[iidx[0]])


class _Constants:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.init = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                a = next((a for a in n.attribute if a.name == "value"), None)
                if a is not None:
                    self.init[n.output[0]] = numpy_helper.to_array(a.t)
        self.producer = {o: n for n in g.node for o in n.output if o}

    def raw(self, name: str):
        return self.init.get(name)

    def dq(self, name: str, through=("Identity",)):
        """The DequantizeLinear producing ``name`` through ``through`` ops, else None
        (an activation also through Flatten / Reshape: with one step for the tensor the
        compiler reshapes the codes instead)."""
        n = self.producer.get(name)
        while n is not None and n.op_type in through:
            n = self.producer.get(n.input[0])
        return n if n is not None and n.op_type == "DequantizeLinear" else None

    def value(self, name: str) -> np.ndarray | None:
        """A constant, or a DequantizeLinear / Transpose / Identity of one, in float32."""
        if name in self.init:
            return self.init[name].astype(np.float32) if self.init[name].dtype.kind == "f" else self.init[name]
        n = self.producer.get(name)
        if n is None:
            return None
        if n.op_type == "Identity":
            return self.value(n.input[0])
        if n.op_type == "Transpose":
            v = self.value(n.input[0])
            perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
            return None if v is None else np.transpose(v, perm)
        if n.op_type == "DequantizeLinear":
            q, s = self.raw(n.input[0]), self.raw(n.input[1])
            if q is None or s is None:
                return None
            z = self.raw(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if s.size > 1:
                shape[axis % q.ndim] = -1
            qi = q.astype(np.int64) - (0 if z is None else z.astype(np.int64).reshape(shape if z.size > 1 else ()))
            return (qi.astype(np.float32) * s.astype(np.float32).reshape(shape if s.size > 1 else ())).astype(
                np.float32)
        return None

    def int_weight(self, name: str):
        """(int64 weights as the op reads them, scale per stored axis, DQ axis) of a
        weight input: DequantizeLinear of an int constant, possibly transposed."""
        perm = None
        n = self.producer.get(name)
        while n is not None and n.op_type in ("Identity", "Transpose"):
            if n.op_type == "Transpose":
                p = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
                perm = p if perm is None else [p[i] for i in perm]
            n = self.producer.get(n.input[0])
        if n is None or n.op_type != "DequantizeLinear":
            return None
        q = self.raw(n.input[0])
        s = self.raw(n.input[1])
        if q is None or s is None:
            return None
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1) % max(q.ndim, 1)
        w = q.astype(np.int64)
        if perm is not None:
            w = np.transpose(w, perm)
            axis = perm.index(axis)
        return w, s.astype(np.float32).reshape(-1), axis


def file_layers(model: onnx.ModelProto) -> dict[str, FileLayer]:
    """Every quantized Conv / MatMul / Gemm of the file, by the compiler's layer name."""
    c = _Constants(model)
    quantized = {s.name for s in survey(model) if s.status == "quantized"}
    out = {}
    for i, n in enumerate(model.graph.node):
        label = node_label(n, i)
        if label not in quantized:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        xi, wi = 0, 1
        if n.op_type == "Gemm" and c.dq(n.input[0]) is not None and c.raw(c.dq(n.input[0]).input[0]) is not None:
            xi, wi = 1, 0  # the weight comes first
        dq = c.dq(n.input[xi], through=("Identity", "Flatten", "Reshape"))
        weight = c.int_weight(n.input[wi])
        if dq is None or weight is None:
            continue
        w, ws, waxis = weight
        if n.op_type == "Gemm":
            if attrs.get("transB" if wi == 1 else "transA", 0):
                w, waxis = w.T, 1 - waxis
            if attrs.get("transA" if wi == 1 else "transB", 0):
                continue  # a transposed activation: not what the compiler folds
        out_axis = 0 if n.op_type == "Conv" else 1
        n_out = w.shape[out_axis]
        if ws.size > 1 and waxis != out_axis:
            continue  # scale along the reduction: not folded
        xs, xz = c.raw(dq.input[1]), c.raw(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        cin = w.shape[1] * int(attrs.get("group", 1)) if n.op_type == "Conv" else w.shape[0]
        xs = np.broadcast_to(np.asarray(xs, np.float32).reshape(-1), (cin,)).copy()
        xz = np.zeros(cin, np.int64) if xz is None else np.broadcast_to(
            np.asarray(xz).astype(np.int64).reshape(-1), (cin,)).copy()
        bias_name = n.input[2] if len(n.input) > 2 and n.input[2] else None
        bias = c.value(bias_name) if bias_name else None
        out[label] = FileLayer(
            name=label, op_type=n.op_type, x_codes=dq.input[0], x_scale=xs, x_zero=xz, w=w,
            groups=int(attrs.get("group", 1)) if n.op_type == "Conv" else 1,
            w_scale=np.broadcast_to(ws, (n_out,)).astype(np.float32),
            bias=None if bias is None else np.asarray(bias, np.float32),
            alpha=float(attrs.get("alpha", 1.0)), beta=float(attrs.get("beta", 1.0)), output=n.output[0])
    return out


def _group_weights(layer: FileLayer, op: QOp, iidx: np.ndarray, oidx: np.ndarray) -> np.ndarray:
    if layer.op_type == "Conv":
        w = layer.w[oidx]
        return w if op.groups > 1 else w[:, iidx]
    return layer.w[np.ix_(iidx, oidx)]


def kernel_checks(layers: dict[str, FileLayer], probes) -> tuple[list[LayerCheck], dict, dict]:
    """Exact check of every probed kernel call; returns the checks and, per layer,
    the module's input codes and int32 results in the file's channel order (one
    total per activation scale group, :meth:`FileLayer.scale_key`)."""
    checks, inputs, totals = [], {}, {}
    for entry in probes:
        kind = entry[0].get("kind")
        if kind == "act-matmul":
            continue  # act_checks
        if kind == "scale-groups":  # passes.fuse_scale_groups.GROUPS_PROBE
            checks.append(_groups_check(layers, entry, inputs, totals))
            continue
        qd, x, acc = entry
        op = QOp.from_dict(qd)
        found = _expected(layers, op, x, acc.shape)
        if isinstance(found, LayerCheck):
            checks.append(found)
            continue
        layer, expect, iidx, oidx, tag = found
        diff = acc.astype(np.int64) != expect
        detail = ""
        if diff.any():
            axis = 1 if layer.op_type == "Conv" else acc.ndim - 1
            bad = np.unique(np.nonzero(diff)[axis])
            detail = (f"{len(bad)} of {len(oidx)} output channels differ, file channels "
                      + ", ".join(str(int(oidx[b])) for b in bad[:6]) + (" ..." if len(bad) > 6 else ""))
        checks.append(LayerCheck(tag, "kernel", layer.output, int(acc.size), int(diff.sum()),
                                 float(np.abs(acc.astype(np.int64) - expect).max()) if acc.size else 0.0, detail))
        _record(layer, op, x, acc, iidx, oidx, inputs, totals)
    return checks, inputs, totals


def _expected(layers: dict[str, FileLayer], op: QOp, x: np.ndarray, shape):
    """``(file layer, exact result, input channels, output channels, tag)`` of one
    kernel from the file's weights and zero points, or a failed LayerCheck saying
    why the kernel does not fit the file."""
    size = int(np.prod(shape))
    layer = layers.get(op.layer)
    if layer is None:
        return LayerCheck(op.layer, "kernel", "-", size, size, float("inf"),
                          "the file has no quantized conv/matmul of this name")
    cin, cout = _channels(layer, op)
    iidx = np.asarray(op.in_index or range(cin), np.int64)
    oidx = np.asarray(op.out_index or range(cout), np.int64)
    tag = op.layer if op.group < 0 else f"{op.layer}[g{op.group}]"
    zeros = np.unique(layer.x_zero[iidx]) if op.groups == 1 else np.unique(layer.x_zero)
    if zeros.size != 1:
        return LayerCheck(tag, "kernel", layer.output, size, size, float("inf"),
                          f"one kernel reads channels with {zeros.size} zero points of the file")
    try:
        w = _group_weights(layer, op, iidx, oidx)
        expect = reference(x, w, op.with_(a_zero=int(zeros[0])))
    except (ValueError, IndexError) as e:
        return LayerCheck(tag, "kernel", layer.output, size, size, float("inf"),
                          f"the module's kernel does not fit the file's weights: {e}")
    if tuple(expect.shape) != tuple(shape):
        return LayerCheck(tag, "kernel", layer.output, size, size, float("inf"),
                          f"shape {list(shape)} vs the file's {list(expect.shape)}")
    return layer, expect, iidx, oidx, tag


def _channels(layer: FileLayer, op: QOp) -> tuple[int, int]:
    """The layer's input and output channel counts in the file."""
    if layer.op_type == "Conv":
        return layer.w.shape[1] * op.groups, layer.w.shape[0]
    return layer.w.shape[0], layer.w.shape[1]


def _record(layer: FileLayer, op: QOp, x, acc, iidx, oidx, inputs: dict, totals: dict) -> None:
    """Keep a kernel's input codes and int32 result, in the file's channel order."""
    cin, cout = _channels(layer, op)
    axis = layer.axis
    if op.layer not in totals:
        shape_x = list(x.shape)
        shape_x[axis] = cin
        inputs[op.layer] = np.zeros(shape_x, x.dtype)
        totals[op.layer] = {}
    key = layer.scale_key(iidx)
    if key not in totals[op.layer]:
        shape_o = list(acc.shape)
        shape_o[axis] = cout
        totals[op.layer][key] = np.zeros(shape_o, np.int64)
    _put(inputs[op.layer], x, iidx, axis)
    _add(totals[op.layer][key], acc, oidx, axis)


def _groups_check(layers: dict[str, FileLayer], entry, inputs: dict, totals: dict) -> LayerCheck:
    """A scale-group kernel (``entry``: probe dict with the channels each group reads
    of the input, input codes, float result): bit for bit against each group's exact
    result from the file, ``float(acc_g) * (x_scale_g * w_scale)`` added in order."""
    qd, x, out = entry
    ops = [QOp.from_dict(d) for d in qd["groups"]]
    columns = np.asarray(qd["columns"], np.int64)
    tag = f"{ops[0].layer}[groups]"
    conv = ops[0].kind == "conv2d"
    y, col = None, 0
    for op in ops:
        k = op.w_shape[1] if conv else op.w_shape[0]
        xg = np.take(x, columns[col:col + k], axis=1 if conv else -1)
        col += k
        found = _expected(layers, op, xg, out.shape)
        if isinstance(found, LayerCheck):
            return found
        layer, expect, iidx, oidx, _ = found
        _record(layer, op, xg, expect, iidx, oidx, inputs, totals)
        scale = (np.float32(layer.scale_key(iidx)[0]) * layer.w_scale.astype(np.float32)).astype(np.float32)
        scale = np.broadcast_to(scale.reshape(-1), (_channels(layer, op)[1],))[oidx]
        term = expect.astype(np.float32) * (scale.reshape(-1, 1, 1) if conv else scale)
        y = term if y is None else (y + term).astype(np.float32)
    ours = np.asarray(out, np.float32)
    diff = ours.view(np.int32) != y.view(np.int32)
    return LayerCheck(tag, "kernel", ops[0].layer, int(ours.size), int(diff.sum()),
                      float(np.abs(ours - y).max()) if ours.size else 0.0,
                      f"float sum of {len(ops)} scale groups' exact results")


def _put(dst, src, idx, axis):
    d = np.moveaxis(dst, axis, 0)
    d[idx] = np.moveaxis(src, axis, 0)


def _add(dst, src, idx, axis):
    d = np.moveaxis(dst, axis, 0)
    d[idx] += np.moveaxis(src, axis, 0).astype(np.int64)


def layer_output(layer: FileLayer, totals: dict) -> np.ndarray:
    """The float output of ``layer`` from its exact int32 results, as the module
    forms it: for each activation scale group in order, acc x (x_scale x w_scale)
    added up, then the bias."""
    y = None
    for key in sorted(totals):
        acc = totals[key]
        if key == ("grouped",):
            per_out = np.repeat(layer.x_scale.reshape(layer.groups, -1)[:, 0], acc.shape[1] // layer.groups)
            x_scale = per_out.astype(np.float32)
        else:
            x_scale = np.float32(key[0])
        scale = (x_scale * layer.w_scale.astype(np.float32)).astype(np.float32)
        shape = [1] * acc.ndim
        shape[layer.axis] = -1
        term = acc.astype(np.float32) * scale.reshape(shape)
        y = term if y is None else (y + term).astype(np.float32)
    if layer.alpha != 1.0:
        y = y * np.float32(layer.alpha)
    if layer.bias is not None:
        b = layer.bias.reshape(shape) if layer.bias.ndim == 1 else layer.bias
        y = y + (b * np.float32(layer.beta) if layer.beta != 1.0 else b)
    return y.astype(np.float32)


def glue_model(model: onnx.ModelProto, replaced: set[str], watch: list[str]) -> onnx.ModelProto:
    """The file with the nodes producing ``replaced`` removed (those tensors become
    graph inputs) and the ``watch`` tensors added as outputs."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    graph_outputs = {o.name for o in g.output}
    keep = [n for n in g.node if not (n.output and n.output[0] in replaced)]
    del g.node[:]
    g.node.extend(keep)
    outs = [o for o in g.output if o.name not in replaced]  # a replaced tensor: compared directly
    del g.output[:]
    g.output.extend(outs)
    for name in sorted(replaced):
        if name not in graph_outputs:
            g.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    for name in watch:
        if name not in graph_outputs:
            g.output.append(helper.make_empty_tensor_value_info(name))
    return out


@dataclass
class Forced:
    """What the glue check forces and compares: ``values`` (tensor -> the module's
    float result of a kernel, replacing the file's node) and ``codes`` (tensor ->
    (layer, the module's codes of that tensor))."""

    values: dict
    codes: dict


def forced_layers(layers: dict[str, FileLayer], inputs: dict, totals: dict) -> Forced:
    values = {layers[n].output: layer_output(layers[n], totals[n]) for n in totals}
    codes = {}
    for n in totals:
        codes.setdefault(layers[n].x_codes, (n, inputs[n]))
    return Forced(values, codes)


def act_checks(model: onnx.ModelProto, acts: list) -> tuple[list[LayerCheck], Forced]:
    """Attention matmuls: each probed ``(a codes, b codes, int32 result)``, matched
    to the file's activation x activation MatMuls in order, checked exactly
    against ``(a - za) @ (b - zb)`` with the file's zero points; their results and
    operand codes join the glue check."""
    c = _Constants(model)
    nodes = {node_label(n, i): n for i, n in enumerate(model.graph.node)}
    names = [s.name for s in survey(model) if s.status == "act-act"]
    forced = Forced({}, {})
    if len(names) != len(acts):
        return [LayerCheck("act-matmul", "kernel", "-", 0, 0, 0.0,
                           f"{len(acts)} probed, {len(names)} in the file: not matched, left to the glue check")], forced
    checks = []
    shapes = _inferred_shapes(model)
    for name, (_, a, b, acc) in zip(names, acts):
        node = nodes[name]
        dqa, dqb = c.dq(node.input[0]), c.dq(node.input[1])
        # the module may batch the heads: operands and result in the file's shapes
        a, b = (_file_shape(v, shapes.get(d.input[0])) for v, d in ((a, dqa), (b, dqb)))
        (za, sa), (zb, sb) = (_dq_params(c, d, v.ndim) for d, v in ((dqa, a), (dqb, b)))
        expect = np.matmul(a.astype(np.int64) - za, b.astype(np.int64) - zb)
        got = acc.astype(np.int64).reshape(expect.shape) if acc.size == expect.size else acc.astype(np.int64)
        if got.shape != expect.shape:
            checks.append(LayerCheck(name, "kernel", node.output[0], acc.size, acc.size, float("inf"),
                                     f"shape {list(acc.shape)} vs the file's {list(expect.shape)}"))
            continue
        diff = got != expect
        checks.append(LayerCheck(name, "kernel", node.output[0], int(got.size), int(diff.sum()),
                                 float(np.abs(got - expect).max()) if got.size else 0.0))
        # steps off the reduction (per tensor, per row of a, per column of b) factorise
        scale = (np.asarray(sa, np.float64) * np.asarray(sb, np.float64)).astype(np.float32)
        value = (got.astype(np.float32) * scale).astype(np.float32)
        shape = shapes.get(node.output[0])
        forced.values[node.output[0]] = value.reshape(shape) if shape and np.prod(shape) == value.size else value
        forced.codes.setdefault(dqa.input[0], (name, a))
        forced.codes.setdefault(dqb.input[0], (name, b))
    return checks, forced


def _file_shape(v: np.ndarray, shape) -> np.ndarray:
    return v.reshape(shape) if shape and int(np.prod(shape)) == v.size else v


def _dq_params(c: _Constants, dq, rank: int):
    """(zero point, step) of a DequantizeLinear, broadcastable against its rank-
    ``rank`` input: scalars, or vectors along the node's axis."""
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    out = []
    for name, kind in ((dq.input[2] if len(dq.input) > 2 else "", np.int64), (dq.input[1], np.float32)):
        v = np.asarray(c.raw(name) if name else 0).astype(kind)
        if v.size > 1:
            shape = [1] * rank
            shape[axis % rank] = -1
            v = v.reshape(shape)
        else:
            v = v.reshape(())
        out.append(v)
    return tuple(out)


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - best effort
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            out[vi.name] = tuple(d.dim_value for d in dims)
    return out


def glue_checks(model: onnx.ModelProto, forced: Forced, feeds: dict, outputs: list[np.ndarray],
                steps: dict[str, float]) -> list[LayerCheck]:
    """Teacher-forced comparison with ORT: the file runs with the ``forced``
    values in place of their nodes; its codes of every forced tensor and its
    outputs are compared with the module's."""
    import onnxruntime as ort

    out_names = [o.name for o in model.graph.output]
    gm = glue_model(model, set(forced.values), list(forced.codes))
    run_feeds = dict(feeds)
    run_feeds.update({k: v for k, v in forced.values.items() if k not in out_names})
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(gm.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    result = dict(zip(names, sess.run(None, run_feeds)))
    for k in out_names:
        if k in forced.values:
            result[k] = forced.values[k]
    checks = []
    for tensor, (layer, ours) in forced.codes.items():
        ref = np.asarray(result[tensor]).astype(np.int64)
        checks.append(_code_check(layer, "glue", tensor, ours.astype(np.int64).reshape(ref.shape)
                                  if ours.size == ref.size else ours.astype(np.int64), ref))
    for k, ours in zip(out_names, outputs):
        ref = np.asarray(result[k])
        step = steps.get(k)
        if step is None:
            peak = float(np.abs(ref).max()) if ref.size else 0.0
            step = peak / 127 if peak > 0 else 1.0
        checks.append(_code_check("output", "output", k, np.round(np.asarray(ours, np.float64) / step),
                                  np.round(ref.astype(np.float64) / step), f"step {step:.3g}"))
    return checks


def _code_check(layer, what, tensor, ours, ref, detail="") -> LayerCheck:
    if ours.shape != ref.shape:
        return LayerCheck(layer, what, tensor, int(ref.size), int(ref.size), float("inf"),
                          f"shape {list(ours.shape)} vs {list(ref.shape)}")
    diff = np.abs(ours - ref)
    return LayerCheck(layer, what, tensor, int(diff.size), int((diff != 0).sum()),
                      float(diff.max()) if diff.size else 0.0, detail)
