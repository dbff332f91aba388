"""``verify`` tells right from wrong, layer by layer, and names the layer.

A correct module of an ORT-quantized ResNet passes; modules built from the same
file with one mutation each fail, and the first failure names the mutated
layer: one output channel's weight codes moved by one, two output channels
swapped, a zero point off by one (shared by the QuantizeLinear and the
DequantizeLinear, as ORT writes it, or only the DequantizeLinear's).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

import soniq_tvm  # noqa: E402
from soniq_tvm.naming import node_label  # noqa: E402
from soniq_tvm.verify import verify  # noqa: E402

from .helpers import exported_model, ort_quantize  # noqa: E402

LAYER = "/layers/layers.2/conv1/Conv"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_layers")
    bm, cal = exported_model("resnet18", root)
    path = ort_quantize(bm.onnx_path, root / "resnet_u8.onnx", cal)
    return onnx.load(path), bm.random_input(7)


def _node(model, label):
    return next(n for i, n in enumerate(model.graph.node) if node_label(n, i) == label)


def _producer(model, name):
    return next(n for n in model.graph.node if name in n.output)


def _init(model, name):
    return next(t for t in model.graph.initializer if t.name == name)


def _set(model, name, value):
    _init(model, name).CopyFrom(numpy_helper.from_array(value, name))


def _weight_name(model, label):
    return _producer(model, _node(model, label).input[1]).input[0]


def shift_channel(model, label, channel):
    name = _weight_name(model, label)
    w = numpy_helper.to_array(_init(model, name)).copy()
    w[channel] = np.where(w[channel] < 127, w[channel] + 1, w[channel] - 1)
    _set(model, name, w)


def swap_channels(model, label, a, b):
    name = _weight_name(model, label)
    w = numpy_helper.to_array(_init(model, name)).copy()
    assert not np.array_equal(w[a], w[b])
    w[[a, b]] = w[[b, a]]
    _set(model, name, w)


def zero_point(model, label, shared: bool):
    dq = _producer(model, _node(model, label).input[0])
    z = numpy_helper.to_array(_init(model, dq.input[2]))
    moved = (z.astype(np.int64) + (1 if z.reshape(-1)[0] < 255 else -1)).astype(z.dtype)
    if shared:  # the file's QuantizeLinear and DequantizeLinear read one initializer
        _set(model, dq.input[2], moved)
    else:
        model.graph.initializer.append(numpy_helper.from_array(moved, "dq_only_zero_point"))
        dq.input[2] = "dq_only_zero_point"


MUTATIONS = [
    ("weight-channel-plus-one", lambda m: shift_channel(m, LAYER, 3)),
    ("channels-swapped", lambda m: swap_channels(m, LAYER, 0, 5)),
    ("zero-point-shared", lambda m: zero_point(m, LAYER, shared=True)),
    ("zero-point-dq-only", lambda m: zero_point(m, LAYER, shared=False)),
]


def test_correct_module_passes(quantized):
    model, x = quantized
    report = verify(model, soniq_tvm.compile(model), inputs=x)
    assert report.ok and report.layered, str(report)
    assert report.first_failure is None and "PASS" in str(report)


@pytest.mark.parametrize("name,mutate", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_mutated_module_fails_naming_the_layer(quantized, name, mutate):
    model, x = quantized
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    mutate(bad)
    report = verify(model, soniq_tvm.compile(bad), inputs=x)
    assert not report.ok, str(report)
    first = report.first_failure
    assert first.layer.split("[g")[0] == LAYER, str(report)
    assert f"layer {LAYER!r}" in str(report).splitlines()[-1]
    if name.startswith("weight") or name == "channels-swapped":
        assert first.what == "kernel"
    if name == "weight-channel-plus-one":
        assert "file channels 3" in first.detail


def test_module_without_probes_falls_back_to_end_to_end(quantized):
    model, x = quantized
    m = soniq_tvm.compile(model, probes=False)
    report = verify(model, m, inputs=x)
    assert not report.layered and report.outputs
    with pytest.raises(soniq_tvm.SoniqError, match="without probes"):
        m.probe(x)


def test_package_verify_stays_callable_after_the_module_is_imported():
    """``import soniq_tvm.verify`` sets the package attribute to the module; the
    documented call ``soniq_tvm.verify(model, compiled)`` must still work."""
    import importlib

    import soniq_tvm
    from tests.helpers import conv_case

    module = importlib.import_module("soniq_tvm.verify")
    assert soniq_tvm.verify is module
    case = conv_case(np.random.default_rng(2), 4, 5, [2, 8, 2, 8], [2, 8, 2, 8])
    report = soniq_tvm.verify(case.model, soniq_tvm.compile(case.model))
    assert report.ok and report.layered, report
