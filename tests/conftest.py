"""Shared fixtures and markers for the soniq-tvm test suite."""
from __future__ import annotations

import numpy as np
import pytest


def pytest_addoption(parser):
    parser.addoption("--fuzz-cases", type=int, default=500,
                     help="differential fuzz cases against the integer reference and ONNX Runtime (tests/fuzz)")


def _host_lines() -> list[str]:
    """The host's CPU and the ISA features the kernel families key on."""
    import platform

    from soniq_tvm import hardware

    model = hardware.cpu_model()
    feats = " ".join(sorted(hardware.host_features())) or "none tracked"
    return [f"soniq host: {platform.machine()} {model or '?'}, {hardware.physical_cores()} cores",
            f"soniq host ISA features: {feats}"]


def pytest_sessionstart(session):
    """Print :func:`_host_lines` first, even under ``-q``, so a CI log says which kernel
    families (AVX2-only, AVX-512 VNNI, ...) the suite ran natively on this host."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller prints
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    for line in _host_lines():
        if reporter is not None:
            reporter.write_line(line)
        else:
            print(line)


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
