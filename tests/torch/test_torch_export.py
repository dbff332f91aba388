"""export_onnx -> ONNX Runtime -> soniq_tvm.compile agree with the PyTorch model.

Tolerances are in quantization steps: a float difference in a layer's accumulation
order can flip one activation code at a rounding boundary, which moves an output by
at most (activation step) x (largest dequantized weight) of the last layer.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

import soniq_tvm  # noqa: E402
from soniq_tvm.annotation import FORMAT, read_annotations  # noqa: E402
from soniq_tvm.torch import QLinear, export_onnx, prepare, quant_layers, snap  # noqa: E402

from ._models import fit, load_example, settled_cnn  # noqa: E402

pytestmark = pytest.mark.torch


def ort_run(model, x: np.ndarray) -> np.ndarray:
    """The reference semantics: ORT with graph optimisations off (its QDQ fusions
    replace the fake-quant graph by integer kernels with their own rounding)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def one_step(layer) -> float:
    """Output change from one activation code flip at ``layer`` (the last layer)."""
    w_int, w_scale, _, _ = layer.export_weight()
    w = np.abs(w_int.astype(np.float32)) * w_scale.reshape([-1] + [1] * (w_int.ndim - 1))
    return float(layer.act.scale().detach().max()) * float(w.max())  # the widest step (per group)


def check_agreement(q, x: torch.Tensor, model=None):
    """ORT == eval-mode PyTorch: same predictions, outputs within one step."""
    model = model if model is not None else export_onnx(q, x)
    q.eval()
    with torch.no_grad():
        y_pt = q(x).numpy()
    y_ort = ort_run(model, x.numpy())
    assert y_ort.shape == y_pt.shape
    last = quant_layers(q)[-1][1]
    assert np.abs(y_ort - y_pt).max() <= one_step(last) + 1e-5
    np.testing.assert_array_equal(y_ort.argmax(-1), y_pt.argmax(-1))
    return model, y_pt, y_ort


def trained_cnn(palette=(2, 8), target=3.5, weight_axis="in", seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(256, 1, 8, 8, generator=g), torch.randint(0, 10, (256,), generator=g)
    q = prepare(settled_cnn(seed), palette=palette, target_bits=target, weight_axis=weight_axis)
    fit(q, x, y, steps=15, penalty=True)
    snap(q)
    fit(q, x, y, steps=15, seed=1)
    return q


@pytest.mark.parametrize("palette,weight_axis", [((2, 8), "in"), ((1, 4), "in"), ((1, 4), "out")])
def test_export_ort_matches_pytorch(tmp_path, palette, weight_axis):
    q = trained_cnn(palette, 3.0, weight_axis)
    x = torch.rand(32, 1, 8, 8)
    path = tmp_path / "cnn.onnx"
    model = export_onnx(q, x, path)
    assert path.exists()
    assert {p.key: p.value for p in model.metadata_props}["soniq.format"] == FORMAT
    check_agreement(q, x, model)


def test_annotations_read_back_the_module_bits():
    q = trained_cnn((1, 4), 2.5, "in")
    model = export_onnx(q, torch.rand(4, 1, 8, 8))
    anns = read_annotations(model)
    layer_nodes = {n.name: n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    weights = {name: anns[layer_nodes[name].input[1]] for name, _ in quant_layers(q)}  # nodes named by path
    acts = [a for a in anns.values() if a.kind == "activation"]
    for name, layer in quant_layers(q):
        ann = weights[name]
        assert list(ann.bits) == [int(b) for b in layer.w_prec.bits]
        assert ann.axis == 1  # tied: bits run along the input channels
        assert ann.signed
    assert 1 in weights["conv2"].bits or 1 in weights["fc"].bits  # bipolar weights exported
    by_bits = {tuple(a.bits): a for a in acts}
    fc_act = by_bits[tuple(int(b) for b in q.fc.w_prec.bits)]  # tied: same bits as the weight
    assert fc_act.signed is False  # after ReLU


def test_bits_after_relu_are_unsigned_and_first_input_follows_data():
    q = trained_cnn()
    model = export_onnx(q, torch.rand(2, 1, 8, 8))
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    zps = {i.name: i.data_type for i in model.graph.initializer}
    from onnx import TensorProto

    assert all(zps[n.input[2]] == TensorProto.UINT8 for n in qs)  # input in [0,1], rest after ReLU
    x_signed = torch.randn(2, 1, 8, 8)
    q2 = prepare(settled_cnn(), palette=(2, 8), target_bits=3.0)
    q2(x_signed)  # first batch has negatives: the input quantizer is signed
    model2 = export_onnx(q2, x_signed)
    first = [n for n in model2.graph.node if n.op_type == "QuantizeLinear"][0]
    assert {i.name: i.data_type for i in model2.graph.initializer}[first.input[2]] == TensorProto.INT8
    check_agreement(q2, x_signed, model2)


def test_unsnapped_export_uses_nearest_levels():
    q = prepare(settled_cnn(), palette=(2, 8), target_bits=6.0)
    x = torch.rand(8, 1, 8, 8)
    q(x)  # calibrate
    check_agreement(q, x)


def test_transformer_attention_path_exports():
    """Linear projections, two QMatMuls (scores, context), softmax, LayerNorm, GELU,
    residuals, reshapes/transposes and token indexing, through ORT."""
    ex = load_example()
    torch.manual_seed(0)
    model = ex.TinyTransformer().eval()
    x, y = ex.pointer_data(256, 0)
    q = prepare(model, palette=(2, 8), target_bits=4.0)
    names = [n for n, _ in q.named_modules()]
    assert "attn.soniq_matmul0" in names and "attn.soniq_matmul1" in names
    fit(q, x, y, steps=10, penalty=True)
    snap(q)
    fit(q, x, y, steps=10)
    onnx_model, _, _ = check_agreement(q, x[:16])
    ops = {n.op_type for n in onnx_model.graph.node}
    assert {"Softmax", "LayerNormalization", "Gelu", "Transpose", "Slice"} <= ops
    acts = [a for a in read_annotations(onnx_model).values() if a.kind == "activation"]
    assert any(a.signed is False and set(a.bits) == {8} for a in acts)  # softmax output


def test_linear_on_3d_input_is_a_matmul_and_2d_a_gemm():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 5)
            self.b = torch.nn.Linear(5, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)).mean(1))

    q = prepare(Net(), palette=(2, 8), target_bits=4.0)
    x = torch.randn(4, 7, 6)
    model = export_onnx(q, x)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMul" in ops and "Gemm" in ops
    assert isinstance(q.a, QLinear)
    check_agreement(q, x, model)


def _compiler_or_skip():
    """soniq_tvm.compile, or a skip when the compiler is not part of this checkout."""
    if importlib.util.find_spec("soniq_tvm.compiler") is None or not hasattr(soniq_tvm, "compile"):
        pytest.skip("soniq_tvm.compile is not available in this checkout")
    return soniq_tvm.compile


def test_compile_agrees_with_ort_and_pytorch(tmp_path):
    compile_ = _compiler_or_skip()
    q = trained_cnn((2, 8), 3.5)
    x = torch.rand(16, 1, 8, 8)
    path = tmp_path / "cnn.onnx"
    model = export_onnx(q, x, path)
    _, y_pt, y_ort = check_agreement(q, x, model)
    y_tvm = compile_(str(path), target="llvm").run({"x": x.numpy()})[0]
    assert np.abs(y_tvm - y_ort).max() <= one_step(q.fc) + 1e-5
    np.testing.assert_array_equal(y_tvm.argmax(-1), y_pt.argmax(-1))


@pytest.mark.slow
def test_compile_transformer_agrees(tmp_path):
    compile_ = _compiler_or_skip()
    ex = load_example()
    torch.manual_seed(0)
    x, y = ex.pointer_data(128, 0)
    q = prepare(ex.TinyTransformer().eval(), palette=(1, 4), target_bits=2.5)
    fit(q, x, y, steps=5, penalty=True)
    snap(q)
    path = tmp_path / "tf.onnx"
    _, y_pt, y_ort = check_agreement(q, x[:8], export_onnx(q, x[:8], path))
    y_tvm = compile_(str(path), target="llvm").run({"x": x[:8].numpy()})[0]
    assert np.abs(y_tvm - y_ort).max() <= one_step(q.head) + 1e-5
    np.testing.assert_array_equal(y_tvm.argmax(-1), y_pt.argmax(-1))


@pytest.mark.parametrize("act_scales", ["group", "tensor", "channel"])
def test_activation_steps_per_group_are_learned_exported_and_compiled(act_scales):
    """By default each quantized input learns one step per palette level; the file
    carries one step per channel taking one value per width, the compiler runs
    one integer kernel per step group, and everything agrees with PyTorch."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(128, 1, 8, 8, generator=g), torch.randint(0, 10, (128,), generator=g)
    q = prepare(settled_cnn(3), palette=(2, 8), target_bits=3.5, act_scales=act_scales)
    fit(q, x, y, steps=10, penalty=True)
    snap(q)
    fit(q, x, y, steps=5, seed=1)
    layers = quant_layers(q)
    for _path, layer in layers:
        steps = layer.act.channel_scale(layer.act_precision.nearest().float()).detach()
        widths = layer.act_precision.nearest()
        if act_scales == "tensor":
            assert steps.dim() == 0
            continue
        if act_scales == "channel":
            assert layer.act.log_scale.shape == widths.shape
            continue
        assert layer.act.log_scale.shape == (2,) and layer.act.log_scale.requires_grad
        for b in widths.unique():  # one step per width, different across widths
            assert len(set(steps[widths == b].tolist())) == 1
    xs = x[:16]
    model, _y_pt, _y_ort = check_agreement(q, xs)
    anns = read_annotations(model)
    init = {t.name: t for t in model.graph.initializer}
    from onnx import numpy_helper

    per_channel = [numpy_helper.to_array(init[a.scale]) for a in anns.values() if a.kind == "activation"]
    if act_scales == "group":
        assert any(s.size > 1 and len(set(s.reshape(-1).tolist())) == 2 for s in per_channel)
    elif act_scales == "channel":
        assert any(len(set(s.reshape(-1).tolist())) > 8 for s in per_channel)
    else:
        assert all(s.size == 1 for s in per_channel)
    if act_scales == "channel":  # more steps than integer kernels pay for: float, said in the plan
        with pytest.warns(UserWarning, match="scale groups"):
            m = soniq_tvm.compile(model, "llvm")
        assert any("scale groups" in l.reason for l in m.plan.float_layers)
    else:
        m = soniq_tvm.compile(model, "llvm")
        assert not m.plan.float_layers
    if act_scales == "group":
        assert max(l.scale_groups for l in m.plan.layers) == 2
    out = m.run({"x": xs.numpy()})[0]
    np.testing.assert_array_equal(out.argmax(-1), ort_run(model, xs.numpy()).argmax(-1))
