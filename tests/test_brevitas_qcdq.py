"""Brevitas's QCDQ export (QuantizeLinear -> Clip -> DequantizeLinear) compiles as it is.

``tests/data/brevitas_digits_w4a4_qcdq.onnx`` was exported by Brevitas itself
(``tests/data/make_brevitas_qcdq.py``): a conv + linear model trained on
scikit-learn's digits, 4-bit per-channel weights and 4-bit activations, Clip for
the narrow ranges, and the old export style that lists initializers among the
graph inputs. Where brevitas is installed, the file is made afresh and checked too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import soniq_tvm

DATA = Path(__file__).parent / "data" / "brevitas_digits_w4a4_qcdq.onnx"
ort = pytest.importorskip("onnxruntime")


def _digits(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    images = load_digits().images[-n:] / 16.0 * 2 - 1  # images the model did not train on
    return images.astype(np.float32)[:, None]


def _reference(path, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: xi[None]})[0] for xi in x])


def _check(path):
    m = soniq_tvm.compile(str(path))
    plan = m.plan
    assert not plan.float_layers, plan  # both layers on integer kernels
    assert sorted({b for layer in plan.layers for b in layer.w_bits}) == [4], plan
    assert sorted({b for layer in plan.layers for b in layer.a_bits}) == [4], plan
    x = _digits(200)
    ours = np.concatenate([m.run(xi[None])[0] for xi in x])
    ref = _reference(path, x)
    # the logits are a float Gemm of exact integer codes: fp32 summation order only
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert (ours.argmax(1) == ref.argmax(1)).mean() >= 0.999
    report = soniq_tvm.verify(str(path), m, inputs={m.inputs[0]["name"]: x[0][None]})
    assert report.ok, report
    return m, plan


def test_committed_brevitas_export_compiles_and_agrees():
    _, plan = _check(DATA)
    assert len(plan.layers) == 2


def test_fresh_brevitas_export(tmp_path):
    pytest.importorskip("brevitas")
    pytest.importorskip("onnxoptimizer")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_brevitas_qcdq", DATA.with_name("make_brevitas_qcdq.py"))
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    _check(maker.build(tmp_path / "fresh.onnx", epochs=3))
