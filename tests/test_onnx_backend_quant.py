"""ONNX's own backend node tests for the quantization operators, compiled by soniq-tvm.

Every case of ``onnx.backend.test.case.node.collect_testcases`` whose name holds
qlinearconv, qlinearmatmul, convinteger, matmulinteger, quantizelinear or
dequantizelinear: integer cases must compile and reproduce ONNX's expected
outputs (integers exactly); float8 / float4 cases may be refused, with a typed
error naming the node, and nothing may crash.
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import soniq_tvm
from soniq_tvm.errors import UnsupportedModelError

KEYS = ("qlinearconv", "qlinearmatmul", "convinteger", "matmulinteger", "quantizelinear", "dequantizelinear")
SMALL_FLOATS = ("e4m3", "e5m2", "float4", "e8m0")


def _cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [c for c in collect_testcases(None) if any(k in c.name for k in KEYS)]


CASES = _cases()


def _array(v) -> np.ndarray:
    return numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)


def test_the_cases_are_there():
    names = {c.name for c in CASES}
    assert len(CASES) >= 40
    for must in ("test_qlinearconv", "test_convinteger_with_padding", "test_matmulinteger",
                 "test_qlinearmatmul_3D_int8_float32", "test_quantizelinear_int4", "test_dequantizelinear_blocked"):
        assert must in names


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_backend_case(case):
    small_float = any(k in case.name for k in SMALL_FLOATS)
    try:
        m = soniq_tvm.compile(case.model)
    except UnsupportedModelError as e:
        assert small_float, f"{case.name}: {e}"
        assert e.node, "the error names the node"
        return
    assert not small_float, f"{case.name} compiled: a float8/float4 case must be refused or run right"
    for inputs, expected in case.data_sets:
        feed = {spec["name"]: _array(v).astype(spec["dtype"]) for spec, v in zip(m.inputs, inputs)}
        got = m.run(feed)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            e = _array(e)
            if e.dtype.kind in "iub" or "int" in str(e.dtype):
                np.testing.assert_array_equal(g.astype(np.int64), e.astype(np.int64))
            else:
                np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), rtol=1e-3, atol=1e-6)
