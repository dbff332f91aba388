"""Every kind of bad input raises a typed SoniqError naming the culprit."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import soniq_tvm
from soniq_tvm import (AnnotationError, ArtifactError, InputError, ModelLoadError, SoniqError, TargetError,
                       UnsupportedModelError)

from .helpers import conv_case


@pytest.fixture
def conv(rng):
    return conv_case(rng, 4, 5, [2, 8, 2, 8], [2, 8, 2, 8], w_axis=1)


def _dq(model, kind):
    """The weight ('w') or activation ('a') DequantizeLinear node."""
    inits = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and ((n.input[0] in inits) == (kind == "w")):
            return n
    raise AssertionError(kind)


def _set_meta(node, key, value):
    for p in node.metadata_props:
        if p.key == key:
            p.value = value
            return
    raise AssertionError(key)


def _strip_model_map(model):
    keep = [p for p in model.metadata_props if not p.key.startswith("soniq.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        soniq_tvm.compile(tmp_path / "nope.onnx")
    assert "nope.onnx" in str(e.value)


def test_not_onnx(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 certainly not protobuf \xff" * 10)
    with pytest.raises(ModelLoadError) as e:
        soniq_tvm.compile(bad)
    assert "bad.onnx" in str(e.value)


def test_annotation_length_mismatch(conv):
    m = conv.model
    node = _dq(m, "w")
    _set_meta(node, "soniq.bits", "[2, 8, 2]")
    _strip_model_map(m)
    with pytest.raises(AnnotationError) as e:
        soniq_tvm.compile(m)
    assert node.name in str(e.value) and "3" in str(e.value) and "4" in str(e.value)


@pytest.mark.parametrize("bits", [0, 9])
def test_bits_out_of_range(conv, bits):
    m = conv.model
    node = _dq(m, "w")
    _set_meta(node, "soniq.bits", json.dumps([bits, 8, 2, 8]))
    _strip_model_map(m)
    with pytest.raises(AnnotationError) as e:
        soniq_tvm.compile(m)
    assert str(bits) in str(e.value) and node.name in str(e.value)


def test_weights_outside_declared_range(conv):
    m = conv.model
    node = _dq(m, "w")
    init = next(i for i in m.graph.initializer if i.name == node.input[0])
    w = onnx.numpy_helper.to_array(init).copy()
    w[0, 0, 0, 0] = 7  # channel 0 is declared 2-bit: [-2, 1]
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    with pytest.raises(AnnotationError) as e:
        soniq_tvm.compile(m)
    assert "channel 0" in str(e.value) and "7" in str(e.value)


def test_annotation_contradicts_max_min(conv):
    m = conv.model
    node = _dq(m, "a")
    _set_meta(node, "soniq.bits", "[8, 8, 2, 8]")  # channel 0 is clamped to 2 bits by Max/Min
    _strip_model_map(m)
    with pytest.raises(AnnotationError) as e:
        soniq_tvm.compile(m)
    assert "channel 0" in str(e.value)


def test_unsupported_operator_names_node_and_opset():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    node = helper.make_node("Det", ["x"], ["y"], name="my_det")
    m = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    with pytest.raises(UnsupportedModelError) as e:
        soniq_tvm.compile(m)
    assert "my_det" in str(e.value) and "Det" in str(e.value) and "21" in str(e.value)


def test_conv_integer_compiles_exactly():
    """ConvInteger (once refused) runs as the exact integer convolution."""
    x = helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1, 3, 3])
    w = helper.make_tensor("w", TensorProto.UINT8, [1, 1, 2, 2], [1, 2, 3, 4])
    z = helper.make_tensor("z", TensorProto.UINT8, [], [7])
    node = helper.make_node("ConvInteger", ["x", "w", "z"], ["y"], name="my_conv_integer")
    m = helper.make_model(helper.make_graph([node], "g", [x], [y], [w, z]),
                          opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    xv = np.arange(16, dtype=np.uint8).reshape(1, 1, 4, 4) * 13
    out = soniq_tvm.compile(m).run({"x": xv})[0]
    xi = xv.astype(np.int64)[0, 0] - 7
    expect = np.array([[(xi[i:i + 2, j:j + 2] * [[1, 2], [3, 4]]).sum() for j in range(3)] for i in range(3)])
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out[0, 0], expect)


def test_dynamic_shape_needs_shapes(rng):
    case = conv_case(rng, 4, 5, [8] * 4, [8] * 4)
    m = case.model
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(UnsupportedModelError) as e:
        soniq_tvm.compile(m)
    assert "'x'" in str(e.value) and "shapes=" in str(e.value)
    fixed = soniq_tvm.compile(m, shapes={"x": list(case.x.shape)})
    assert fixed.run({"x": case.x})[0].shape == (1, 5, 6, 7)


def test_bad_target_via_compile(conv):
    with pytest.raises(TargetError, match="mcpux"):
        soniq_tvm.compile(conv.model, "llvm -mcpux=znver3")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    case = conv_case(np.random.default_rng(1), 4, 5, [2, 8, 2, 8], [2, 8, 2, 8])
    m = soniq_tvm.compile(case.model)
    return case, m, m.save(tmp_path_factory.mktemp("art") / "m.soniq")


@pytest.mark.parametrize("inputs, word", [
    ({"y": None}, "'y'"),
    ({}, "missing"),
    ({"x": np.zeros((1, 4, 6, 6), np.float32)}, "shape"),
    ({"x": np.zeros((1, 4, 6, 7), np.float64)}, "dtype"),
])
def test_wrong_run_inputs(compiled, inputs, word):
    case, m, _ = compiled
    with pytest.raises(InputError, match=word):
        m.run(inputs)


def test_positional_and_keyword_inputs(compiled):
    case, m, _ = compiled
    a = m(case.x)[0]
    b = m.run(x=case.x)[0]
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError):
        m(case.x, case.x)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_library(compiled, tmp_path):
    path = _copy(compiled[2], tmp_path / "t.soniq")
    lib = path / "module.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="hash"):
        soniq_tvm.load(path)


def test_tampered_manifest(compiled, tmp_path):
    path = _copy(compiled[2], tmp_path / "t.soniq")
    man = json.loads((path / "manifest.json").read_text())
    man["inputs"][0]["shape"] = [1, 4, 6, 8]
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="hash"):
        soniq_tvm.load(path)


def test_truncated_manifest_and_missing_parts(compiled, tmp_path):
    path = _copy(compiled[2], tmp_path / "t.soniq")
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="manifest"):
        soniq_tvm.load(path)
    path2 = _copy(compiled[2], tmp_path / "u.soniq")
    (path2 / "module.so").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        soniq_tvm.load(path2)
    with pytest.raises(ArtifactError):
        soniq_tvm.load(tmp_path / "does-not-exist.soniq")


def test_version_mismatch(compiled, tmp_path):
    from soniq_tvm.artifact import _signature

    path = _copy(compiled[2], tmp_path / "v.soniq")
    man = json.loads((path / "manifest.json").read_text())
    man["versions"]["tvm"] = "0.1.0"
    man["sha256"] = _signature(path, man)
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="0.1.0"):
        soniq_tvm.load(path)


def test_every_error_is_a_soniq_error():
    for cls in (ModelLoadError, AnnotationError, UnsupportedModelError, TargetError, InputError, ArtifactError):
        assert issubclass(cls, SoniqError)
    e = AnnotationError("bits 9 outside 1..8", node="dq", channel=3, hint="fix it")
    assert str(e) == "node 'dq', channel 3: bits 9 outside 1..8 (fix it)" and e.channel == 3
