"""QONNX files (``Quant`` / ``BipolarQuant``) convert to soniq-qdq/1, compile, and
agree with qonnx's own executor.

The models are built here with onnx.helper, as QONNX writes them: float weights
behind ``Quant`` nodes, activations quantized in place. qonnx's executor
(``qonnx.core.onnx_exec.execute_onnx``) is the reference. It cannot run a
``Quant`` whose bit width is a tensor (its ``int_quant`` tests ``bitwidth == 1``
as a scalar), so for per-channel widths the reference runs the same arithmetic
with each such ``Quant`` split into one ``Quant`` per channel (``_per_channel_quants``),
which qonnx executes.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import soniq_tvm
from soniq_tvm.errors import UnsupportedModelError
from soniq_tvm.qonnx_import import from_qonnx, is_qonnx

pytest.importorskip("onnxruntime")
DOMAIN = "qonnx.custom_op.general"

# per-channel widths of model A: the SONIQ layout (a weight's width is its input channel's)
A_IN_BITS = [8, 2, 8, 4]
A_MID_BITS = [2, 2, 2, 8, 2, 2, 8, 2]
A_W2_BITS = [1, 2, 2, 8, 2, 2, 8, 1]  # two bipolar input channels


class _Graph:
    """A small builder of QONNX graphs."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []

    def const(self, name, value):
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def quant(self, x, out, scale, bits, zeropt=0.0, signed=1, narrow=0, rounding="ROUND", op="Quant"):
        ins = [x, self.const(f"{out}_s", scale)]
        attrs = {}
        if op == "Quant":
            ins += [self.const(f"{out}_z", zeropt), self.const(f"{out}_b", bits)]
            attrs = {"signed": signed, "narrow": narrow, "rounding_mode": rounding}
        self.nodes.append(helper.make_node(op, ins, [out], name=out, domain=DOMAIN, **attrs))
        return out

    def weight(self, name, shape, bits, axis_bits: int, signed=1, narrow=1, op="Quant"):
        """A float weight and its Quant: a step per output channel, ``bits`` along ``axis_bits``."""
        w = self.rng.standard_normal(shape).astype(np.float32)
        self.const(name, w)
        b = np.asarray(bits, np.float32)
        if b.size > 1:
            b = b.reshape([-1 if a == axis_bits else 1 for a in range(len(shape))])
        top = 2.0 ** (np.max(bits) - 1) - 1 if np.max(bits) > 1 else 1.0
        scale = (np.abs(w).reshape(shape[0], -1).max(1) / top).reshape([-1] + [1] * (len(shape) - 1))
        return self.quant(name, f"{name}_q", scale, b, signed=signed, narrow=narrow, op=op)

    def node(self, op, ins, out, **attrs):
        self.nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def model(self, x_shape, y, y_shape):
        g = helper.make_graph(self.nodes, "qonnx_test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(DOMAIN, 1)])
        m.ir_version = 8
        return m


def model_a(w2_bits=A_W2_BITS, mid_bits=A_MID_BITS) -> onnx.ModelProto:
    """Per-channel widths: input [8,2,8,4] (signed, a step per channel), conv 4->8
    3x3, ReLU, widths [2,2,2,8,2,2,8,2] unsigned, conv 8->6 3x3/2 with two bipolar
    input channels, ReLU, flatten, 4-bit, Gemm 96->10, 8-bit output."""
    g = _Graph(0)
    bits_in = np.asarray(A_IN_BITS, np.float32).reshape(1, 4, 1, 1)
    xq = g.quant("x", "xq", (np.array([0.02, 0.5, 0.02, 0.15]) * 2).reshape(1, 4, 1, 1), bits_in)
    w1 = g.weight("w1", (8, 4, 3, 3), A_IN_BITS, 1)
    c1 = g.node("Conv", [xq, w1, g.const("b1", g.rng.standard_normal(8) * 0.1)], "c1", pads=[1, 1, 1, 1])
    r1 = g.node("Relu", [c1], "r1")
    mid = np.asarray(mid_bits, np.float32)
    steps = np.where(mid == 8, 6.0 / 255, 6.0 / 3).reshape(1, 8, 1, 1)
    r1q = g.quant(r1, "r1q", steps, mid.reshape(1, 8, 1, 1), signed=0)
    w2 = g.weight("w2", (6, 8, 3, 3), w2_bits, 1)
    c2 = g.node("Conv", [r1q, w2], "c2", pads=[1, 1, 1, 1], strides=[2, 2])
    r2 = g.node("Relu", [c2], "r2")
    f = g.node("Flatten", [r2], "f")
    fq = g.quant(f, "fq", 40.0 / 15, 4.0, signed=0)
    w3 = g.weight("w3", (10, 96), 4, 1)
    gm = g.node("Gemm", [fq, w3, g.const("b3", np.zeros(10))], "gm", transB=1)
    y = g.quant(gm, "y", 400.0 / 127, 8.0, signed=1)
    return g.model([1, 4, 8, 8], y, [1, 10])


def model_b() -> onnx.ModelProto:
    """Widths per tensor, as Brevitas exports QONNX: an unsigned 8-bit input with a
    zero point, 4-bit weights (a step per output channel), 4-bit activations, a
    MatMul head."""
    g = _Graph(1)
    xq = g.quant("x", "xq", 4.0 / 255, 8.0, zeropt=128.0, signed=0)
    w1 = g.weight("w1", (8, 4, 3, 3), 4, 1)
    c1 = g.node("Conv", [xq, w1], "c1", pads=[1, 1, 1, 1])
    r1 = g.node("Relu", [c1], "r1")
    r1q = g.quant(r1, "r1q", 8.0 / 15, 4.0, signed=0)
    gp = g.node("GlobalAveragePool", [r1q], "gp")
    fl = g.node("Flatten", [gp], "fl")
    fq = g.quant(fl, "fq", 4.0 / 127, 8.0, signed=1, narrow=1)
    wm = g.rng.standard_normal((8, 5)).astype(np.float32)
    g.const("wm", wm)
    wmq = g.quant("wm", "wm_q", (np.abs(wm).max(0) / 7).reshape(1, 5), 4.0, narrow=1)
    mm = g.node("MatMul", [fq, wmq], "mm")
    y = g.quant(mm, "y", 8.0 / 127, 8.0)
    return g.model([1, 4, 8, 8], y, [1, 5])


def model_c() -> onnx.ModelProto:
    """Constants QONNX quantizes beyond the kernels: a conv bias through a 32-bit
    Quant (Brevitas's Int32Bias), a second conv whose weight is quantized to 16 bits."""
    g = _Graph(2)
    xq = g.quant("x", "xq", 4.0 / 127, 8.0)
    w1 = g.weight("w1", (8, 4, 3, 3), 4, 1)
    g.const("b1", g.rng.standard_normal(8) * 0.5)
    b1 = g.quant("b1", "b1_q", 4.0 / 127 * 0.05, 32.0)
    c1 = g.node("Conv", [xq, w1, b1], "c1", pads=[1, 1, 1, 1])
    r1 = g.node("Relu", [c1], "r1")
    r1q = g.quant(r1, "r1q", 8.0 / 15, 4.0, signed=0)
    w2 = g.weight("w2", (6, 8, 3, 3), 16, 1)
    c2 = g.node("Conv", [r1q, w2], "c2", pads=[1, 1, 1, 1])
    y = g.quant(c2, "y", 60.0 / 127, 8.0)
    return g.model([1, 4, 8, 8], y, [1, 6, 8, 8])


def test_quantized_bias_and_wide_weight_fold_to_float_constants():
    """A 32-bit bias Quant and a 16-bit weight Quant become the float constants qonnx
    computes: the first conv still runs on integers (with its float bias), the second
    stays float with its reason in the plan; the output is within one step of qonnx."""
    model = model_c()
    qdq = from_qonnx(model)
    assert "b1_q" in {t.name for t in qdq.graph.initializer} and "w2_q" in {t.name for t in qdq.graph.initializer}
    m = soniq_tvm.compile(model)
    assert [layer.name for layer in m.plan.layers if not layer.is_float] == ["c1"], m.plan
    assert [layer.name for layer in m.plan.float_layers] == ["c2"] and m.plan.float_layers[0].reason
    xs = _inputs(32)
    worst, exact = _steps(_ours(m, xs), _qonnx_run(model, xs), 60.0 / 127)
    assert worst <= 1.0 + 1e-3 and exact >= 0.99, (worst, exact)


def _per_channel_quants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same arithmetic in a form qonnx's executor runs: each Quant whose bit
    width is a tensor becomes one Quant per channel of that axis (Slice -> Quant
    with that channel's width, scale and zero point -> Concat)."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes, inits = [], list(model.graph.initializer)
    for n in model.graph.node:
        bits = consts.get(n.input[3]) if n.op_type == "Quant" else None
        if bits is None or bits.size == 1:
            nodes.append(n)
            continue
        axis = int(np.flatnonzero(np.array(bits.shape) != 1)[0])
        parts = []
        for c in range(bits.size):
            idx = [slice(None)] * bits.ndim
            idx[axis] = slice(c, c + 1)
            pre = f"{n.output[0]}_c{c}"

            def sliced(name, pre=pre, idx=idx, axis=axis):
                v = consts[name]
                if v.ndim == bits.ndim and v.shape[axis] == bits.shape[axis]:
                    v = v[tuple(idx)]
                inits.append(numpy_helper.from_array(np.ascontiguousarray(v), f"{pre}_{name}"))
                return f"{pre}_{name}"

            for k, v in (("st", c), ("en", c + 1), ("ax", axis)):
                inits.append(numpy_helper.from_array(np.array([v], np.int64), f"{pre}_{k}"))
            nodes.append(helper.make_node("Slice", [n.input[0], f"{pre}_st", f"{pre}_en", f"{pre}_ax"], [f"{pre}_x"]))
            q = helper.make_node("Quant", [f"{pre}_x", sliced(n.input[1]), sliced(n.input[2]),
                                           f"{pre}_bw"], [f"{pre}_q"], domain=DOMAIN)
            q.attribute.extend(n.attribute)
            inits.append(numpy_helper.from_array(np.float32(bits.reshape(-1)[c]), f"{pre}_bw"))
            nodes.append(q)
            parts.append(f"{pre}_q")
        nodes.append(helper.make_node("Concat", parts, [n.output[0]], axis=axis))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:], out.graph.initializer[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    return out


def _qonnx_run(model: onnx.ModelProto, xs: np.ndarray, name: str = "x") -> np.ndarray:
    """qonnx's executor on ``model``. It runs every standard node in ONNX Runtime
    through a one-node model that onnx 1.23's ``make_model`` stamps IR 14, which ORT
    1.31 refuses; the node models are given IR 10 (nothing else changes)."""
    pytest.importorskip("qonnx")
    from qonnx.core import onnx_exec
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_shapes import InferShapes

    make = onnx_exec.qonnx_make_model

    def make_ir10(graph, **kw):
        m = make(graph, **kw)
        m.ir_version = min(m.ir_version, 10)
        return m

    mw = ModelWrapper(model).transform(InferShapes())
    out = mw.graph.output[0].name
    onnx_exec.qonnx_make_model = make_ir10
    try:
        return np.concatenate([onnx_exec.execute_onnx(mw, {name: x[None]})[out] for x in xs])
    finally:
        onnx_exec.qonnx_make_model = make


def _inputs(n: int, seed: int = 3) -> np.ndarray:
    """Digits (scikit-learn's real 8x8 images) in four channels: the image, its
    transpose, its negative and a noisy copy, scaled to about [-1, 2]."""
    from sklearn.datasets import load_digits

    img = load_digits().images[:n].astype(np.float32) / 8.0 - 0.5
    noise = np.random.default_rng(seed).standard_normal(img.shape).astype(np.float32) * 0.3
    return np.stack([img, img.transpose(0, 2, 1), -img, img + noise], 1)


def test_brevitas_qonnx_export_compiles_and_matches_qonnx():
    """``tests/data/brevitas_digits_w4a4_qonnx.onnx``: exported by Brevitas 0.13.4's
    ``export_qonnx`` (``tests/data/make_brevitas_qcdq.py --qonnx``) from a conv +
    linear model trained on the digits, 4-bit per-channel weights, 4-bit activations,
    IR 7 with the initializers listed as graph inputs."""
    from pathlib import Path

    from sklearn.datasets import load_digits

    path = Path(__file__).parent / "data" / "brevitas_digits_w4a4_qonnx.onnx"
    m = soniq_tvm.compile(str(path))
    assert not m.plan.float_layers and [sorted(set(layer.w_bits)) for layer in m.plan.layers] == [[4], [4]]
    assert [i["name"] for i in m.inputs] == ["x.103"]  # the float weights' input entries are gone
    digits = load_digits()
    xs = (digits.images[-200:] / 16.0 * 2 - 1).astype(np.float32)[:, None]  # not trained on
    ours = _ours(m, xs)
    ref = _qonnx_run(onnx.load(str(path)), xs, name="x.103")
    # logits: a float Gemm of exact integer codes, fp32 summation order only
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert (ours.argmax(1) == ref.argmax(1)).all()
    assert (ours.argmax(1) == digits.target[-200:]).mean() >= 0.9
    assert soniq_tvm.verify(str(path), m, inputs={"x.103": xs[:1]}).ok


def _ours(m, xs):
    return np.concatenate([m.run(x[None])[0] for x in xs])


def _steps(ours, ref, step):
    d = np.abs(ours - ref) / step
    return d.max(), (d < 0.5).mean()


def test_per_tensor_widths_match_qonnx_executor():
    model = model_b()
    m = soniq_tvm.compile(model)
    assert not m.plan.float_layers, m.plan
    assert {b for layer in m.plan.layers for b in layer.w_bits} == {4}
    xs = _inputs(64)
    worst, exact = _steps(_ours(m, xs), _qonnx_run(model, xs), 8.0 / 127)
    assert worst <= 1.0 + 1e-3 and exact >= 0.99, (worst, exact)


def test_per_channel_widths_convert_compile_and_match_qonnx():
    model = model_a()
    qdq = from_qonnx(model)
    assert not is_qonnx(qdq) and all(o.domain != DOMAIN for o in qdq.opset_import)
    from soniq_tvm.annotation import read_annotations

    anns = {a.name: a for a in read_annotations(qdq).values()}
    assert list(anns["w1_q"].bits) == A_IN_BITS and anns["w1_q"].axis == 1
    assert list(anns["w2_q"].bits) == A_W2_BITS and anns["w2_q"].signed
    assert list(anns["r1q"].bits) == A_MID_BITS and not anns["r1q"].signed and anns["r1q"].axis == 1
    assert list(anns["xq"].bits) == A_IN_BITS and anns["xq"].signed
    m = soniq_tvm.compile(model)  # the QONNX file itself: converted on the way in
    assert not m.plan.float_layers, m.plan
    assert [sorted(set(layer.w_bits)) for layer in m.plan.layers] == [[2, 4, 8], [1, 2, 8], [4]]
    xs = _inputs(64)
    ref = _qonnx_run(_per_channel_quants(model), xs)
    worst, exact = _steps(_ours(m, xs), ref, 400.0 / 127)
    assert worst <= 1.0 + 1e-3 and exact >= 0.99, (worst, exact)
    report = soniq_tvm.verify(model, m, inputs={"x": xs[:1]})
    assert report.ok, report


def test_the_comparison_fails_on_wrong_widths():
    """The check above can fail: a module whose second conv reads its bipolar
    channels at 2 bits disagrees with qonnx by more than one step."""
    xs = _inputs(64)
    ref = _qonnx_run(_per_channel_quants(model_a()), xs)
    wrong = soniq_tvm.compile(model_a(w2_bits=[2, 2, 2, 8, 2, 2, 8, 2]))
    worst, exact = _steps(_ours(wrong, xs), ref, 400.0 / 127)
    assert worst > 1.0 or exact < 0.99, (worst, exact)


def test_per_channel_expansion_is_the_same_arithmetic():
    """The reference's rewrite, run by qonnx, equals the converted file run by ONNX
    Runtime (graph optimizations off) within one step, and a per-tensor file is left
    to qonnx as it is."""
    import onnxruntime as ort

    model = model_a()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(from_qonnx(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    xs = _inputs(32)
    got = np.concatenate([sess.run(None, {"x": x[None]})[0] for x in xs])
    worst, exact = _steps(got, _qonnx_run(_per_channel_quants(model), xs), 400.0 / 127)
    assert worst <= 1.0 + 1e-3 and exact >= 0.99, (worst, exact)
    b = model_b()
    assert _per_channel_quants(b).graph.node == b.graph.node


def _edit(model, name, **changes):
    """``model`` with node ``name``'s op, domain or attributes changed, or a constant replaced."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        if t.name in changes:
            t.CopyFrom(numpy_helper.from_array(np.asarray(changes[t.name], np.float32), t.name))
    for n in out.graph.node:
        if n.name == name:
            if "op" in changes:
                n.op_type = changes["op"]
            for a in n.attribute:
                if a.name in changes:
                    a.CopyFrom(helper.make_attribute(a.name, changes[a.name]))
    return out


@pytest.mark.parametrize("case,expect", [
    ("wide", "outside 1..8"),
    ("fraction", "not an integer"),
    ("trunc", "Trunc is not supported"),
    ("floor_act", "rounding FLOOR"),
    ("bipolar_act", "sign function"),
    ("dynamic_scale", "must be a constant"),
    ("zero_scale", "not a positive finite"),
    ("axes", "different axes"),
])
def test_unrepresentable_quant_nodes_get_a_typed_error(case, expect):
    base = model_b()
    model = {
        "wide": lambda: _edit(base, "r1q", r1q_b=9.0),
        "fraction": lambda: _edit(base, "r1q", r1q_b=3.5),
        "trunc": lambda: _edit(base, "r1q", op="Trunc"),
        "floor_act": lambda: _edit(base, "r1q", rounding_mode="FLOOR"),
        "bipolar_act": lambda: _edit(base, "r1q", r1q_b=1.0),
        "dynamic_scale": lambda: _dynamic_scale(base),
        "zero_scale": lambda: _edit(base, "r1q", r1q_s=0.0),
        "axes": lambda: _edit(base, "r1q", r1q_s=np.full((1, 8, 1, 1), 0.5), r1q_b=np.full((1, 1, 8, 1), 4.0)),
    }[case]()
    if case == "bipolar_act":
        model = _edit(model, "r1q", signed=1)
    with pytest.raises(UnsupportedModelError) as err:
        from_qonnx(model)
    assert expect in str(err.value) and err.value.node == "r1q", str(err.value)
    with pytest.raises(UnsupportedModelError):
        soniq_tvm.compile(model)


def _dynamic_scale(model):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in out.graph.node:
        if n.name == "r1q":
            n.input[1] = "r1"  # the scale is the activation itself
    return out


def test_cli_convert_writes_an_annotated_file(tmp_path):
    src, dst = tmp_path / "a_qonnx.onnx", tmp_path / "a_soniq.onnx"
    onnx.save(model_a(), str(src))
    r = subprocess.run([sys.executable, "-m", "soniq_tvm.cli", "convert", str(src), str(dst)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Quant 7 nodes" in r.stdout, r.stdout
    out = onnx.load(str(dst))
    assert {p.key: p.value for p in out.metadata_props}["soniq.format"] == "soniq-qdq/1"
    assert not is_qonnx(out)
    r = subprocess.run([sys.executable, "-m", "soniq_tvm.cli", "convert", str(tmp_path / "none.onnx"),
                        str(tmp_path / "x.onnx")], capture_output=True, text=True)
    assert r.returncode != 0 and "no such file" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.onnx"
    onnx.save(_edit(model_b(), "r1q", op="Trunc"), str(bad))
    r = subprocess.run([sys.executable, "-m", "soniq_tvm.cli", "convert", str(bad), str(tmp_path / "y.onnx")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "r1q" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "y.onnx").exists()
