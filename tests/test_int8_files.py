"""The INT8 files users already have: ``torch.onnx.export`` + ORT's ``quantize_static``.

Such files name their initializers ``onnx::Conv_123`` (which TVM's importer
renames), carry u8 activations with zero points and s8 per-channel weights.
Every quantized conv/matmul must fold onto a non-reference integer family, the
plan must list every op (float ones with the reason), and the module must agree
with ONNX Runtime.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import soniq_tvm  # noqa: E402
from soniq_tvm.compiler import FloatLayerWarning  # noqa: E402
from soniq_tvm.naming import canonical_names, safe_name  # noqa: E402
from soniq_tvm.qoperator import to_qdq  # noqa: E402
from soniq_tvm.survey import survey  # noqa: E402
from soniq_tvm.verify import ort_reference, verify  # noqa: E402

from .helpers import exported_model, ort_quantize  # noqa: E402

REFERENCE_FAMILIES = ("int8-ref", "bitplane-ref")
# (id, model, quantize_static options): QDQ u8 activations per-channel weights (the
# common file), s8 activations, per-tensor weights
VARIANTS = [
    ("resnet-u8", "resnet18", dict(activation="QUInt8", per_channel=True)),
    ("resnet-s8-per-tensor", "resnet18", dict(activation="QInt8", per_channel=False)),
    ("bert-u8", "bert", dict(activation="QUInt8", per_channel=True)),
    ("bert-s8", "bert", dict(activation="QInt8", per_channel=True)),
    # QOperator: QLinearConv / QGemm / QLinearAdd / QLinearGlobalAveragePool; QLinearMatMul / QLinearSoftmax
    ("resnet-qoperator", "resnet18", dict(fmt="QOperator")),
    ("bert-qoperator", "bert", dict(fmt="QOperator")),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{variant id: (fp32 path, quantized path, an input)} built once."""
    root = tmp_path_factory.mktemp("int8_files")
    built, out = {}, {}
    for vid, name, opts in VARIANTS:
        if name not in built:
            built[name] = exported_model(name, root)
        bm, cal = built[name]
        q = ort_quantize(bm.onnx_path, root / f"{vid}.onnx", cal, **opts)
        out[vid] = (str(bm.onnx_path), q, bm.random_input(99))
    return out


def test_exporter_names_are_the_premise(files):
    """The files really carry the importer-renamed names this issue is about."""
    model = onnx.load(files["resnet-u8"][1])
    assert any(t.name.startswith("onnx::") for t in model.graph.initializer)


@pytest.mark.parametrize("vid", [v[0] for v in VARIANTS])
def test_every_quantized_op_folds_and_matches_ort(files, vid):
    _, path, x = files[vid]
    model = onnx.load(path)
    ops = survey(to_qdq(model))  # QOperator files: the ops as the compiler reads them
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatLayerWarning)
        m = soniq_tvm.compile(path)
    plan = m.plan
    assert [l.name for l in plan.layers] == [s.name for s in ops]  # every op of the file, in order
    quantized = [s.name for s in ops if s.status == "quantized"]
    assert quantized and not plan.float_layers, [(l.name, l.reason) for l in plan.float_layers]
    for layer in plan.layers:
        if layer.kind == "act-matmul":
            continue
        assert layer.groups, layer.name
        for g in layer.groups:
            assert g.family not in REFERENCE_FAMILIES, (layer.name, g.family)
    acts = [s.name for s in ops if s.status == "act-act"]
    if acts:  # attention (u8 codes with zero points) on the dot-product kernels, where the host has one
        import re

        noted = [int(re.match(r"(\d+) activation x activation", n).group(1)) for n in plan.notes
                 if re.match(r"\d+ activation x activation", n)]
        assert noted == [len(acts)] or not _has_dot_kernel(), plan.notes
    report = verify(model, m, inputs=x)
    assert report.ok, str(report)
    kernels = [c for c in report.layers if c.what == "kernel"]
    assert len(kernels) >= len(quantized) and all(c.differing == 0 for c in kernels)


def _has_dot_kernel() -> bool:
    from soniq_tvm.schedules.cpu import _isa

    feats = _isa.host_features()
    return "avx2" in feats or {"avx512f", "avx512bw", "avx512vnni"} <= feats


def test_fp32_file_lists_every_op_as_float(files):
    fp32, _, _ = files["resnet-u8"]
    plan = soniq_tvm.inspect(fp32)
    n_ops = sum(n.op_type in ("Conv", "MatMul", "Gemm") for n in onnx.load(fp32).graph.node)
    assert len(plan.layers) == n_ops == len(plan.float_layers) > 0
    assert all("not quantized" in l.reason for l in plan.layers)
    assert "float: 21 of 21" in str(plan) or f"float: {n_ops} of {n_ops}" in str(plan)


def _weight_zero_point_file():
    """conv whose weight has a non-zero zero point (the compiler leaves it float)."""
    rng = np.random.default_rng(0)
    w = rng.integers(-8, 8, (4, 3, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
        numpy_helper.from_array(np.array(3, np.uint8), "xz"),
        numpy_helper.from_array(w, "onnx::Conv_7"),
        numpy_helper.from_array(np.array(0.02, np.float32), "ws"),
        numpy_helper.from_array(np.array(1, np.int8), "wz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["onnx::Conv_7", "ws", "wz"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv_zp", pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(nodes, "wzp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def test_quantized_op_left_float_warns_by_name():
    model = _weight_zero_point_file()
    with pytest.warns(FloatLayerWarning, match="conv_zp"):
        m = soniq_tvm.compile(model)
    (layer,) = m.plan.layers
    assert layer.is_float and "zero point" in layer.reason
    x = {"x": np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(m.run(x)[0], ort_reference(model, x)[0], rtol=1e-5, atol=1e-5)


def test_canonical_names_are_safe_unique_and_keep_outputs():
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "onnx::w")
    w2 = numpy_helper.from_array(np.full((2, 2), 2, np.float32), "w")
    w3 = numpy_helper.from_array(np.full((2, 2), 3, np.float32), "0.bad name")
    nodes = [helper.make_node("Add", ["x", "onnx::w"], ["a"]), helper.make_node("Add", ["a", "w"], ["b"]),
             helper.make_node("Add", ["b", "0.bad name"], ["y"]),
             helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(2, np.float32)))]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "n", vi[:1], vi[1:], [w, w2, w3]),
                              opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    out, mapping = canonical_names(model)
    names = [t.name for t in out.graph.initializer]
    assert len(set(names)) == len(names) == 4  # the Constant became an initializer
    assert all(n == safe_name(n) or n.startswith(safe_name(n)) for n in names)
    assert mapping["onnx::w"] != mapping["w"] and not mapping["onnx::w"].startswith("onnx::")
    assert mapping["0.bad name"][0].isalpha() and " " not in mapping["0.bad name"]
    import onnxruntime as ort

    x = np.zeros((2, 2), np.float32)
    for mdl in (model, out):
        sess = ort.InferenceSession(mdl.SerializeToString(), providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(sess.run(None, {"x": x})[0], np.full((2, 2), 6, np.float32))


def _act_act_file(za: int, zb: int, b_type=TensorProto.UINT8):
    """Q.K^T-like matmul of two dequantized activations with zero points (as ORT writes them)."""
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "sa"),
             numpy_helper.from_array(np.array(za, np.uint8), "za"),
             numpy_helper.from_array(np.array(0.03, np.float32), "sb"),
             numpy_helper.from_array(np.array(zb, np.uint8 if b_type == TensorProto.UINT8 else np.int8), "zb")]
    nodes = [helper.make_node("QuantizeLinear", ["a", "sa", "za"], ["aq"]),
             helper.make_node("DequantizeLinear", ["aq", "sa", "za"], ["ad"]),
             helper.make_node("QuantizeLinear", ["b", "sb", "zb"], ["bq"]),
             helper.make_node("DequantizeLinear", ["bq", "sb", "zb"], ["bd"]),
             helper.make_node("MatMul", ["ad", "bd"], ["y"], name="scores")]
    g = helper.make_graph(nodes, "actact", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2, 24, 40]),
                                            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 2, 40, 20])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 24, 20])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


@pytest.mark.parametrize("za,zb,b_type", [(7, 200, TensorProto.UINT8), (0, 131, TensorProto.UINT8),
                                          (250, 0, TensorProto.UINT8), (3, -5, TensorProto.INT8)])
@pytest.mark.parametrize("target", ["llvm", "llvm -mcpu=haswell"])
def test_attention_matmul_with_zero_points(za, zb, b_type, target):
    """Both operands' zero points folded around the dot-product kernel, exactly."""
    from soniq_tvm.schedules.cpu import _isa

    if "haswell" in target and "avx2" not in _isa.host_features():
        pytest.skip("host has no AVX2 to run the haswell build")
    model = _act_act_file(za, zb, b_type)
    m = soniq_tvm.compile(model, target=target)
    assert any(n.startswith("1 activation x activation") for n in m.plan.notes), m.plan.notes
    rng = np.random.default_rng(0)
    x = {"a": (rng.standard_normal((1, 2, 24, 40)) * 4).astype(np.float32),
         "b": (rng.standard_normal((1, 2, 40, 20)) * 3).astype(np.float32)}
    report = verify(model, m, inputs=x)
    assert report.ok, str(report)
    kernel = [c for c in report.layers if c.what == "kernel"]
    assert len(kernel) == 1 and kernel[0].differing == 0 and kernel[0].count == 2 * 24 * 20
    # and the numbers: exact integer product of the codes ORT computes
    ort_codes = ort_reference(_with_outputs(model, ["aq", "bq"]), x)[1:]
    exact = np.matmul(ort_codes[0].astype(np.int64) - za, ort_codes[1].astype(np.int64) - zb)
    np.testing.assert_array_equal(np.round(m.run(x)[0] / np.float32(0.05 * 0.03)).astype(np.int64), exact)


def _with_outputs(model, names):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for n in names:
        out.graph.output.append(helper.make_empty_tensor_value_info(n))
    return out
