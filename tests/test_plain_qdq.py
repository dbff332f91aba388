"""Plain QDQ files (no soniq annotations) compile as the one-group case."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import soniq_tvm
from soniq_tvm.verify import compare, ort_reference


def _float_cnn(rng):
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((10, 8)).astype(np.float32) * 0.3
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], transB=1, name="fc"),
    ]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b2")]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_onnxruntime_quantizer_output(tmp_path, rng):
    """ORT's static QDQ quantizer: uint8 activations with non-zero zero points."""
    quant = pytest.importorskip("onnxruntime.quantization")
    fp32 = tmp_path / "fp32.onnx"
    onnx.save(_float_cnn(rng), fp32)

    class Reader(quant.CalibrationDataReader):
        def __init__(self):
            self.data = iter([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.data, None)

    q = tmp_path / "int8.onnx"
    quant.quantize_static(str(fp32), str(q), Reader(), quant_format=quant.QuantFormat.QDQ, per_channel=True,
                          activation_type=quant.QuantType.QUInt8, weight_type=quant.QuantType.QInt8)
    m = soniq_tvm.compile(str(q))
    assert all(len(l.groups) == 1 and l.groups[0].w_bits == 8 for l in m.plan.layers)
    assert {l.kind for l in m.plan.layers} == {"conv2d", "matmul"}
    model = onnx.load(str(q))
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)
        agreement = compare("y", m.run({"x": x})[0], ort_reference(model, {"x": x})[0])
        assert agreement.ok, agreement


def test_int4_typed_weights_and_scalar_clip(rng):
    """INT4 initializer + a scalar Clip on the activation: one 4x4 group."""
    w = rng.integers(-8, 8, (6, 5)).astype(np.int8)
    w4 = helper.make_tensor("w", TensorProto.INT4, [6, 5], w.reshape(-1).tolist())
    inits = [w4, numpy_helper.from_array(np.full(5, 0.05, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(5, np.int8), "wz").__class__() if False else
             helper.make_tensor("wz", TensorProto.INT4, [5], [0] * 5),
             numpy_helper.from_array(np.array(0.1, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz"),
             numpy_helper.from_array(np.array(-8, np.int8), "lo"), numpy_helper.from_array(np.array(7, np.int8), "hi")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["q"]),
             helper.make_node("Clip", ["q", "lo", "hi"], ["qc"]),
             helper.make_node("DequantizeLinear", ["qc", "xs", "xz"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1, name="dq_w"),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "int4", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    m = soniq_tvm.compile(model)
    (layer,) = m.plan.layers
    assert [(g.w_bits, g.a_bits) for g in layer.groups] == [(4, 4)]
    x = rng.standard_normal((2, 6)).astype(np.float32)
    assert compare("y", m.run({"x": x})[0], ort_reference(model, {"x": x})[0]).ok
