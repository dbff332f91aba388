"""Shared fixtures and markers for the soniq-tvm test suite."""
from __future__ import annotations

import numpy as np
import pytest


def pytest_addoption(parser):
    parser.addoption("--fuzz-cases", type=int, default=500,
                     help="differential fuzz cases against the integer reference and ONNX Runtime (tests/fuzz)")


def pytest_collection_modifyitems(config, items):
    try:
        import tvm

        has_gpu = tvm.cuda(0).exist
    except Exception:  # noqa: BLE001
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def host_target():
    from soniq_tvm.targets import parse_target

    return parse_target("llvm")
