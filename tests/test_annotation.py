"""soniq-qdq/1: integer ranges, the reader's three sources and its cross-checks,
the writer, the builder against ONNX Runtime and numpy, and the example models."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from soniq_tvm.annotation import (
    FORMAT,
    TensorAnnotation,
    annotate,
    bit_range,
    bits_from_range,
    load_model,
    read_annotations,
    save_model,
    to_int8_initializers,
    write_quant_map,
)
from soniq_tvm.builder import QDQBuilder, choose_bits, quantize_weights
from soniq_tvm.errors import AnnotationError, ModelLoadError, UnsupportedModelError
from soniq_tvm.models import example_cnn, example_inputs, example_transformer, save_examples

ort = pytest.importorskip("onnxruntime")

A_BITS = [8, 2, 8]  # input activation, signed, along axis 1
W_BITS = [2, 8, 2, 8]  # conv weight, along axis 0 (per output channel)
Y_BITS = [4, 8, 1, 3]  # output activation, unsigned, along axis 1
X_SCALE, Y_SCALE = 0.05, 0.1


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def run_ort(model: onnx.ModelProto, feeds: dict, outputs: list[str] | None = None) -> list:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    return m


def node_by_name(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def init_by_name(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def set_meta(node: onnx.NodeProto, **kv: str) -> None:
    for p in node.metadata_props:
        key = p.key.replace("soniq.", "")
        if key in kv:
            p.value = kv[key]


def strip_node_metadata(model: onnx.ModelProto) -> None:
    for n in model.graph.node:
        del n.metadata_props[:]


def rename(model: onnx.ModelProto, old: str, new: str) -> None:
    """Rename a tensor everywhere, as an optimizer would."""
    for n in model.graph.node:
        for io in (n.input, n.output):
            for i, name in enumerate(io):
                if name == old:
                    io[i] = new
    for t in model.graph.initializer:
        if t.name == old:
            t.name = new
    for vi in model.graph.output:
        if vi.name == old:
            vi.name = new


def tiny_weights(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return quantize_weights(rng.standard_normal((4, 3, 3, 3)), W_BITS, axis=0)


def tiny_conv_model(seed: int = 0) -> onnx.ModelProto:
    """The spec's minimal example: x[1,3,8,8] -> act [8,2,8] -> Conv w [2,8,2,8]
    (per output channel) -> Relu -> unsigned act [4,8,1,3] -> y."""
    w_int, w_scale = tiny_weights(seed)
    b = QDQBuilder("tiny")
    x = b.input("x", [1, 3, 8, 8])
    a = b.quant_act(x, X_SCALE, A_BITS, signed=True, name="a")
    bias = np.linspace(-0.2, 0.2, 4).astype(np.float32)
    c = b.conv(a, w_int, w_scale, W_BITS, w_axis=0, bias=bias, pads=(1, 1, 1, 1), name="conv")
    r = b.node("Relu", [c], name="relu")
    y = b.quant_act(r, Y_SCALE, Y_BITS, signed=False, name="yq")
    b.output(y, "y")
    return b.build()


@pytest.fixture(scope="module")
def tiny() -> onnx.ModelProto:
    return tiny_conv_model()


def fresh(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def plain_qdq(x_dtype: int, clip: tuple[int, int] | None = None) -> onnx.ModelProto:
    """x -> QuantizeLinear -> [Clip(lo, hi)] -> DequantizeLinear -> y, no annotation."""
    np_t = helper.tensor_dtype_to_np_dtype(x_dtype)
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "s"),
        numpy_helper.from_array(np.array(0, np_t), "zp"),
    ]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q")]
    q = "q"
    if clip is not None:
        inits += [
            numpy_helper.from_array(np.array(clip[0], np_t), "lo"),
            numpy_helper.from_array(np.array(clip[1], np_t), "hi"),
        ]
        nodes.append(helper.make_node("Clip", ["q", "lo", "hi"], ["qc"], name="clip"))
        q = "qc"
    nodes.append(helper.make_node("DequantizeLinear", [q, "s", "zp"], ["y"], name="dq"))
    graph = helper.make_graph(
        nodes,
        "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.checker.check_model(m, full_check=True)
    return m


def typed_weight_model(dtype: int, values: np.ndarray, opset: int = 21) -> onnx.ModelProto:
    """x -> Conv(DQ(w: dtype)) with a sub-byte typed weight initializer
    (INT4/UINT4 need opset 21, INT2/UINT2 opset 25)."""
    o = values.shape[0]
    w = helper.make_tensor("w", dtype, list(values.shape), values.ravel().tolist())
    zp = helper.make_tensor("w_zp", dtype, [o], [0] * o)
    scale = numpy_helper.from_array(np.linspace(0.05, 0.1, o).astype(np.float32), "w_scale")
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], name="w_dq", axis=0),
        helper.make_node("Conv", ["x", "wd"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "typed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, values.shape[1], 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, o, 5, 5])],
        [w, zp, scale],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10 if opset < 25 else 11
    onnx.checker.check_model(m, full_check=True)
    return m


# ---------------------------------------------------------------------------
# integer ranges
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_range_every_width(bits):
    assert bit_range(bits, False) == (0, 2**bits - 1)
    if bits == 1:
        assert bit_range(1, True) == (-1, 1)  # bipolar {-1, +1}
    else:
        assert bit_range(bits, True) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert bits_from_range(*bit_range(bits, False)) == bits
    # signed 1-bit reads back as 2 bits: bipolar is known from annotations only
    assert bits_from_range(*bit_range(bits, True)) == (2 if bits == 1 else bits)


def test_bit_range_known_values_and_bad_input():
    assert bit_range(2, True) == (-2, 1)
    assert bit_range(8, True) == (-128, 127)
    assert bit_range(8, False) == (0, 255)
    assert bits_from_range(-7, 7) == 4  # narrow symmetric range
    assert bits_from_range(-127, 127) == 8
    assert bits_from_range(0, 2) == 2
    with pytest.raises(ValueError):
        bit_range(0, True)
    with pytest.raises(ValueError):
        bits_from_range(3, 2)


# ---------------------------------------------------------------------------
# writing and reading back
# ---------------------------------------------------------------------------
def test_round_trip_from_node_metadata(tiny):
    anns = read_annotations(tiny)
    assert set(anns) == {"a", "conv.w_deq", "yq"}
    a, w, y = anns["a"], anns["conv.w_deq"], anns["yq"]
    assert (a.kind, a.axis, a.bits, a.signed) == ("activation", 1, (8, 2, 8), True)
    assert (w.kind, w.axis, w.bits, w.signed, w.source) == ("weight", 0, (2, 8, 2, 8), True, "node")
    assert (y.kind, y.axis, y.bits, y.signed) == ("activation", 1, (4, 8, 1, 3), False)
    assert a.source == y.source == "node"
    assert (w.node, w.input, w.scale) == ("conv.w_dq", "conv.w", "conv.w_scale")
    assert a.input == "a.min" and a.scale == "a.scale"
    assert tiny.ir_version == 10
    assert [(o.domain, o.version) for o in tiny.opset_import] == [("", 21)]
    meta = {p.key: p.value for p in tiny.metadata_props}
    assert meta["soniq.format"] == FORMAT
    qmap = json.loads(meta["soniq.quant_map"])
    assert qmap["conv.w_deq"] == {
        "axis": 0, "bits": W_BITS, "signed": True, "aliases": ["conv.w", "conv.w_scale"]
    }


def test_annotation_dataclass_properties_and_dict_round_trip(tiny):
    y = read_annotations(tiny)["yq"]
    assert TensorAnnotation.from_dict(y.to_dict()) == y
    assert json.loads(json.dumps(y.to_dict()))["bits"] == [4, 8, 1, 3]
    assert (y.channels, y.uniform, y.max_bits, y.min_bits) == (4, False, 8, 1)
    assert y.range(0) == (0, 15) and y.range(2) == (0, 1)
    assert y.groups == {1: (2,), 3: (3,), 4: (0,), 8: (1,)}
    one = TensorAnnotation("t", "n", "weight", 0, (4,), True, "dtype")
    assert one.uniform and one.range(7) == (-8, 7) and one.bits_for(3) == (4, 4, 4)
    with pytest.raises(AnnotationError):
        TensorAnnotation.from_dict(
            {"name": "t", "kind": "bias", "axis": 0, "bits": [8], "signed": True}
        )


def test_annotate_then_quant_map_round_trip(tiny):
    m = fresh(tiny)
    annotate(m, "conv.w_dq", [8, 8, 4, 8], axis=0, signed=True)  # widens: values still fit
    annotate(m, "a.dq", [8, 2, 8], axis=1, signed=True)
    write_quant_map(m)
    strip_node_metadata(m)
    anns = read_annotations(m)
    assert anns["conv.w_deq"].bits == (8, 8, 4, 8) and anns["conv.w_deq"].source == "quant_map"
    # one int is spread over the channels along the axis (3 input channels)
    m2 = fresh(tiny)
    annotate(m2, "conv.w_dq", 8, axis=1, signed=True)
    assert read_annotations(m2)["conv.w_deq"].bits == (8, 8, 8)
    assert read_annotations(m2)["conv.w_deq"].axis == 1


def test_quant_map_after_metadata_stripped_and_renames(tiny):
    m = fresh(tiny)
    strip_node_metadata(m)
    anns = read_annotations(m)
    assert {k: (a.bits, a.axis, a.signed, a.source) for k, a in anns.items()} == {
        "a": ((8, 2, 8), 1, True, "quant_map"),
        "conv.w_deq": ((2, 8, 2, 8), 0, True, "quant_map"),
        "yq": ((4, 8, 1, 3), 1, False, "quant_map"),
    }
    # an optimizer renames the weight DQ output: found through the DQ input alias
    rename(m, "conv.w_deq", "opt_0")
    # and removes the Identity, giving the last DQ the graph output's name
    ident = node_by_name(m, "y")
    m.graph.node.remove(ident)
    rename(m, "yq", "y")
    # and renames a weight initializer too: only the scale alias is left
    rename(m, "conv.w", "opt_w")
    anns = read_annotations(m)
    assert anns["opt_0"].bits == (2, 8, 2, 8) and anns["opt_0"].source == "quant_map"
    assert anns["y"].bits == (4, 8, 1, 3) and not anns["y"].signed
    # the map can be rewritten for the new names and read with nothing else
    write_quant_map(m)
    assert set(json.loads({p.key: p.value for p in m.metadata_props}["soniq.quant_map"])) == {
        "a", "opt_0", "y"
    }


def test_structure_alone_gives_max_min_bits_and_int8_weights(tiny):
    m = fresh(tiny)
    strip_node_metadata(m)
    del m.metadata_props[:]
    anns = read_annotations(m)
    a, y, w = anns["a"], anns["yq"], anns["conv.w_deq"]
    assert (a.bits, a.axis, a.signed, a.source) == ((8, 2, 8), 1, True, "max_min")
    assert (y.bits, y.axis, y.signed, y.source) == ((4, 8, 1, 3), 1, False, "max_min")
    # without a statement, an int8 weight is one 8-bit group
    assert (w.kind, w.bits, w.signed, w.source) == ("weight", (8,), True, "dtype")


def test_scalar_clip_and_plain_qdq_are_one_group():
    signed = read_annotations(plain_qdq(TensorProto.INT8, clip=(-8, 7)))["y"]
    assert (signed.bits, signed.signed, signed.source) == ((4,), True, "clip")
    assert signed.kind == "activation"
    unsigned = read_annotations(plain_qdq(TensorProto.UINT8, clip=(0, 3)))["y"]
    assert (unsigned.bits, unsigned.signed, unsigned.source) == ((2,), False, "clip")
    plain = read_annotations(plain_qdq(TensorProto.INT8))["y"]
    assert (plain.bits, plain.signed, plain.source, plain.uniform) == ((8,), True, "dtype", True)
    plain_u = read_annotations(plain_qdq(TensorProto.UINT8))["y"]
    assert (plain_u.bits, plain_u.signed) == ((8,), False)


def test_sub_byte_typed_weights_and_int8_rewrite():
    rng = np.random.default_rng(1)
    vals = rng.integers(-8, 8, (4, 3, 3, 3))
    m = typed_weight_model(TensorProto.INT4, vals)
    w = read_annotations(m)["wd"]
    assert (w.kind, w.bits, w.signed, w.source, w.axis) == ("weight", (4,), True, "dtype", 0)
    u2_vals = rng.integers(0, 4, (2, 3, 3, 3))
    u2 = read_annotations(typed_weight_model(TensorProto.UINT2, u2_vals, opset=25))
    assert (u2["wd"].bits, u2["wd"].signed) == ((2,), False)

    widened = to_int8_initializers(m)
    assert {t.name: t.data_type for t in widened.graph.initializer}["w"] == TensorProto.INT8
    after = read_annotations(widened)["wd"]
    assert (after.bits, after.axis, after.signed, after.source) == ((4, 4, 4, 4), 0, True, "node")
    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(m, {"x": x})[0], run_ort(widened, {"x": x})[0])
    assert m.graph.initializer[0].data_type == TensorProto.INT4  # the input is untouched


# ---------------------------------------------------------------------------
# cross-checks
# ---------------------------------------------------------------------------
def test_length_mismatch_names_node_and_counts(tiny):
    m = fresh(tiny)
    set_meta(node_by_name(m, "conv.w_dq"), bits="[2, 8, 2]")
    with pytest.raises(AnnotationError) as e:
        read_annotations(m)
    assert e.value.node == "conv.w_dq"
    assert "3 entries" in str(e.value) and "4 channels" in str(e.value)


@pytest.mark.parametrize("bad", [0, 9])
def test_bits_outside_1_to_8(tiny, bad):
    m = fresh(tiny)
    set_meta(node_by_name(m, "conv.w_dq"), bits=json.dumps([2, 8, bad, 8]))
    with pytest.raises(AnnotationError) as e:
        read_annotations(m)
    assert (e.value.node, e.value.channel) == ("conv.w_dq", 2)
    assert f"bit width {bad}" in str(e.value)


def test_weight_outside_its_channel_range(tiny):
    m = fresh(tiny)
    t = init_by_name(m, "conv.w")
    w = numpy_helper.to_array(t).copy()
    w[2, 1, 1, 1] = 5  # channel 2 is 2-bit: [-2, 1]
    t.CopyFrom(numpy_helper.from_array(w, "conv.w"))
    with pytest.raises(AnnotationError) as e:
        read_annotations(m)
    assert (e.value.node, e.value.channel) == ("conv.w_dq", 2)
    assert "5" in str(e.value) and "[-2, 1]" in str(e.value)


def test_bipolar_weights_reject_zero():
    bits = [1, 8]
    w_float = np.random.default_rng(0).standard_normal((2, 3, 1, 1))
    w_int, scale = quantize_weights(w_float, bits, axis=0)
    assert set(np.unique(w_int[0])) <= {-1, 1}
    b = QDQBuilder("bipolar")
    x = b.input("x", [1, 3, 4, 4])
    b.output(b.conv(x, w_int, scale, bits, w_axis=0, name="conv"), "y")
    m = b.build()
    assert read_annotations(m)["conv.w_deq"].bipolar
    t = init_by_name(m, "conv.w")
    w = numpy_helper.to_array(t).copy()
    w[0, 1, 0, 0] = 0
    t.CopyFrom(numpy_helper.from_array(w, "conv.w"))
    with pytest.raises(AnnotationError) as e:
        read_annotations(m)
    assert e.value.channel == 0 and "bipolar" in str(e.value)
    with pytest.raises(AnnotationError):  # the builder refuses it up front
        QDQBuilder().conv(QDQBuilder().input("x", [1, 3, 4, 4]), w, scale, bits, w_axis=0)


def test_activation_bits_must_match_max_min(tiny):
    m = fresh(tiny)
    set_meta(node_by_name(m, "a.dq"), bits="[8, 4, 8]")
    with pytest.raises(AnnotationError) as e:
        read_annotations(m)
    assert (e.value.node, e.value.channel) == ("a.dq", 1)
    assert "4 bits" in str(e.value) and "[-2, 1]" in str(e.value)
    # an annotated low width with no clamp in the graph is not executed by ORT
    plain = plain_qdq(TensorProto.INT8)
    annotate(plain, "dq", [8, 2, 8, 8], axis=1, signed=True)
    with pytest.raises(AnnotationError) as e:
        read_annotations(plain)
    assert (e.value.node, e.value.channel) == ("dq", 1)


def test_signed_flag_must_fit_container_and_axis_in_range(tiny):
    m = fresh(tiny)
    set_meta(node_by_name(m, "yq.dq"), signed="1")  # uint8 container
    with pytest.raises(AnnotationError) as e:
        read_annotations(m)
    assert e.value.node == "yq.dq" and "uint8" in str(e.value)
    m = fresh(tiny)
    set_meta(node_by_name(m, "conv.w_dq"), axis="4")
    with pytest.raises(AnnotationError) as e:
        read_annotations(m)
    assert e.value.node == "conv.w_dq" and "out of range" in str(e.value)


def test_malformed_metadata_and_map(tiny):
    m = fresh(tiny)
    set_meta(node_by_name(m, "a.dq"), bits="[8, 2,")
    with pytest.raises(AnnotationError, match="not JSON"):
        read_annotations(m)
    m = fresh(tiny)
    strip_node_metadata(m)
    for p in m.metadata_props:
        if p.key == "soniq.quant_map":
            p.value = "{broken"
    with pytest.raises(AnnotationError, match="quant_map"):
        read_annotations(m)
    m = fresh(tiny)
    for p in m.metadata_props:
        if p.key == "soniq.format":
            p.value = "soniq-qdq/9"
    with pytest.raises(AnnotationError, match="soniq-qdq/9"):
        read_annotations(m)


# ---------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------
def test_load_errors_name_the_file(tmp_path, tiny):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(ModelLoadError) as e:
        read_annotations(missing)
    assert e.value.file == str(missing)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe this is not a protobuf \x00\x01" * 8)
    with pytest.raises(ModelLoadError) as e:
        load_model(junk)
    assert e.value.file == str(junk)
    broken = fresh(tiny)
    broken.graph.node[0].input[0] = "does_not_exist"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(broken.SerializeToString())
    with pytest.raises(ModelLoadError, match="checker") as e:
        read_annotations(str(bad))
    assert e.value.file == str(bad)


def test_atomic_save_leaves_no_temp_files(tmp_path, tiny):
    path = tmp_path / "m.onnx"
    save_model(tiny, path)
    save_model(tiny, path)  # replacing an existing file
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert read_annotations(path)["conv.w_deq"].bits == tuple(W_BITS)
    broken = fresh(tiny)
    broken.graph.node[0].input[0] = "does_not_exist"
    with pytest.raises(ModelLoadError):
        save_model(broken, path)
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert load_model(path) == tiny  # the good file is still there, unchanged


# ---------------------------------------------------------------------------
# ORT computes exactly the fake-quant the annotations describe
# ---------------------------------------------------------------------------
def np_fake_quant(x, scale, bits, signed, axis):
    """Independent numpy twin of Q -> Max/Min -> DQ (zero point 0)."""
    lo = np.array([-(2 ** (b - 1)) if signed else 0 for b in bits], np.float64)
    hi = np.array([2 ** (b - 1) - 1 if signed else 2**b - 1 for b in bits], np.float64)
    shape = [1] * x.ndim
    shape[axis] = len(bits)
    q = np.rint(x.astype(np.float64) / np.float32(scale))
    q = np.clip(q, -128 if signed else 0, 127 if signed else 255)
    return np.clip(q, lo.reshape(shape), hi.reshape(shape)) * np.float32(scale)


def np_conv(x, w, bias, pad):
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.zeros((n, o, h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i : i + out.shape[2], j : j + out.shape[3]]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out + bias.reshape(1, -1, 1, 1)


def test_ort_equals_numpy_fake_quant(tiny):
    x = np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32) * 2
    y, a_ort, conv_ort = run_ort(with_outputs(tiny, ["a", "conv"]), {"x": x})
    w_int, w_scale = tiny_weights()
    bias = np.linspace(-0.2, 0.2, 4).astype(np.float32)
    a = np_fake_quant(x, X_SCALE, A_BITS, True, 1)
    np.testing.assert_allclose(a_ort, a, rtol=1e-6, atol=0)
    assert len(np.unique(a_ort[0, 1])) <= 4 and len(np.unique(a_ort[0, 0])) > 4
    w = w_int.astype(np.float64) * w_scale.reshape(-1, 1, 1, 1).astype(np.float64)
    conv = np_conv(a, w, bias, 1)
    np.testing.assert_allclose(conv_ort, conv, rtol=1e-5, atol=1e-5 * np.abs(conv).max())
    # the output quantizer applied to ORT's own conv result: exact
    expect = np_fake_quant(np.maximum(conv_ort, 0), Y_SCALE, Y_BITS, False, 1)
    np.testing.assert_allclose(y, expect, rtol=1e-6, atol=0)
    assert set(np.unique(np.rint(y[0, 2] / np.float32(Y_SCALE)))) <= {0, 1}
    assert np.abs(y).max() > 0


def test_builder_matmul_and_gemm_match_numpy():
    rng = np.random.default_rng(4)
    k, n = 6, 5
    bits = [2, 8, 3, 8, 4, 8]
    w_mm, s_mm = quantize_weights(rng.standard_normal((k, n)), bits, axis=0, scale_axis=1)
    w_gm, s_gm = quantize_weights(rng.standard_normal((n, k)), bits, axis=1, scale_axis=0)
    b = QDQBuilder("mm")
    x = b.input("x", [2, k])
    a = b.quant_act(x, 0.05, bits, signed=True)
    b.output(b.matmul(a, w_mm, s_mm, bits, w_axis=0, bias=np.ones(n, np.float32)), "mm")
    b.output(b.gemm(a, w_gm, s_gm, bits, w_axis=1), "gm")
    m = b.build()
    assert read_annotations(m)["gemm1.w_deq"].axis == 1
    xv = rng.standard_normal((2, k)).astype(np.float32)
    mm, gm = run_ort(m, {"x": xv})
    av = np_fake_quant(xv, 0.05, bits, True, 1)
    np.testing.assert_allclose(mm, av @ (w_mm * s_mm[None, :]) + 1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gm, av @ (w_gm * s_gm[:, None]).T, rtol=1e-5, atol=1e-6)


def test_quantize_weights_and_choose_bits():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 4, 3, 3))
    bits = (2, 8, 4, 8)
    q, s = quantize_weights(w, bits, axis=1)  # tied: widths per input channel
    assert q.dtype == np.int8 and s.shape == (6,) and s.dtype == np.float32
    for c, b in enumerate(bits):
        lo, hi = bit_range(b, True)
        assert q[:, c].min() >= lo and q[:, c].max() <= hi
    # one scale per output channel serves every width: it is the grid's least-error
    # choice, no worse than the scale that suits the 8-bit channels alone
    lo = np.array([bit_range(b, True)[0] for b in bits]).reshape(1, -1, 1, 1)
    hi = np.array([bit_range(b, True)[1] for b in bits]).reshape(1, -1, 1, 1)
    amax = np.abs(w).max(axis=(1, 2, 3), keepdims=True)

    def err(scale):
        return ((np.clip(np.rint(w / scale), lo, hi) * scale - w) ** 2).sum(axis=(1, 2, 3))

    assert (err(s.reshape(-1, 1, 1, 1).astype(np.float64)) <= err(amax / 127) * 1.0001).all()
    q8, _ = quantize_weights(w, 8, axis=1)
    assert np.abs(q8).max(axis=(1, 2, 3)).min() >= 100  # uniform 8-bit uses its range
    u, _ = quantize_weights(np.abs(w), 3, axis=0, signed=False)
    assert u.dtype == np.uint8 and u.max() <= 7 and u.max() >= 4
    picked = choose_bits(12, (2, 8), 0.75, rng=0)
    assert picked == choose_bits(12, (2, 8), 0.75, rng=0)
    assert sorted(picked) == [2] * 9 + [8] * 3
    assert set(choose_bits(3, (2, 8), 0.5, rng=1)) == {2, 8}


def test_builder_rejects_what_the_format_cannot_say():
    with pytest.raises(UnsupportedModelError):
        QDQBuilder("old", opset=20)
    b = QDQBuilder()
    x = b.input("x", [1, 2, 4, 4])
    with pytest.raises(AnnotationError, match="bipolar"):
        b.quant_act(x, 0.1, [1, 8], signed=True)
    with pytest.raises(AnnotationError, match="2 channels"):
        b.quant_act(x, 0.1, [8, 8, 8], signed=True)
    with pytest.raises(AnnotationError, match="quantized activations"):
        b.matmul_act(x, b.quant_act(x, 0.1, 8, signed=True))


# ---------------------------------------------------------------------------
# example models
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def examples() -> dict[str, onnx.ModelProto]:
    return {"cnn": example_cnn(), "transformer": example_transformer()}


def test_examples_are_deterministic_and_checked(examples):
    assert example_cnn(seed=0).SerializeToString() == examples["cnn"].SerializeToString()
    assert example_cnn(seed=1).SerializeToString() != examples["cnn"].SerializeToString()
    for m in examples.values():
        onnx.checker.check_model(m, full_check=True)
        assert m.ir_version == 10


@pytest.mark.parametrize(
    "which,out,shape", [("cnn", "logits", (1, 10)), ("transformer", "y", (1, 16, 32))]
)
def test_examples_run_in_ort_with_non_trivial_outputs(examples, which, out, shape):
    m = examples[which]
    assert [o.name for o in m.graph.output] == [out]
    y0 = run_ort(m, example_inputs(m, 0))[0]
    y1 = run_ort(m, example_inputs(m, 1))[0]
    assert y0.shape == shape and np.isfinite(y0).all()
    assert y0.std() > 0.1
    assert np.abs(y0 - y1).max() > 0.1  # the output depends on the input


def test_examples_load_at_ort_default_optimization(examples):
    # ORT 1.31's MatMulAddFusion breaks on a 3-D int8 input with a [N] bias; the
    # builder's [1, N] bias avoids it. (Results at this level are not the
    # reference: ORT also requantizes Conv biases, see docs/annotation-format.md.)
    for m in examples.values():
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        assert np.isfinite(sess.run(None, example_inputs(m, 0))[0]).all()


def test_example_cnn_precision_layout(examples):
    m = examples["cnn"]
    anns = read_annotations(m)
    by_out = {n.output[0]: n for n in m.graph.node}
    tied = per_out = 0
    for n in m.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        act, wt = anns[n.input[0]], anns[n.input[1]]
        assert act.kind == "activation" and wt.kind == "weight"
        if wt.axis == 1:
            assert wt.bits == act.bits  # SONIQ's tied case
            tied += 1
        else:
            assert wt.axis == 0 and len(set(wt.bits)) == 2
            per_out += 1
        steps = numpy_helper.to_array(init_by_name(m, act.scale))
        widths = np.asarray(act.bits)
        assert steps.shape == widths.shape  # one step per channel, laid out per width:
        assert all(len(set(steps[widths == b].tolist())) == 1 for b in set(act.bits))
        assert len(set(steps.tolist())) == len(set(act.bits))  # one step per precision group
        out_channels = init_by_name(m, wt.input).dims[0]
        assert list(init_by_name(m, wt.scale).dims) == [out_channels]  # per output channel
        assert by_out[n.input[1]].op_type == "DequantizeLinear"
    assert tied >= 4 and per_out == 1
    channels = {a.channels for a in anns.values()}
    assert 3 in channels and 12 in channels
    assert all(set(a.bits) == {2, 8} for a in anns.values())
    assert {"Add", "MaxPool", "GlobalAveragePool", "Gemm"} <= {n.op_type for n in m.graph.node}


def test_example_transformer_precision_layout(examples):
    m = examples["transformer"]
    anns = read_annotations(m)
    ops = {n.op_type for n in m.graph.node}
    assert {"Softmax", "LayerNormalization", "Gelu", "MatMul", "Add"} <= ops
    both_acts = 0
    for n in m.graph.node:
        if n.op_type != "MatMul":
            continue
        a, b = anns[n.input[0]], anns[n.input[1]]
        assert a.kind == "activation" and a.axis == 2 + (a.name in ("q_q", "probs_q"))
        if b.kind == "weight":
            assert (b.axis, b.bits) == (0, a.bits)
        else:
            both_acts += 1
            assert b.axis == 2 and b.bits == a.bits  # tied along the reduction
    assert both_acts == 2
    assert all(set(a.bits) == {2, 8} for a in anns.values())


def test_save_examples(tmp_path):
    paths = save_examples(tmp_path / "ex")
    assert sorted(os.listdir(tmp_path / "ex")) == ["example_cnn.onnx", "example_transformer.onnx"]
    for p in paths.values():
        assert len(read_annotations(p)) > 5
