"""Differential fuzzing of every kernel family against the integer reference and ONNX
Runtime (see :mod:`tests.fuzz.cases`). ``--fuzz-cases N`` sets the number of cases
run on this host (default 500: 125 random configs x 4 data sets); every fourth config
is also built for the other x86 level (haswell, run here on an AVX-512 host;
skylake-avx512, compiled only, on an AVX2 host). A failure names a one-line
reproducer."""
from __future__ import annotations

import pytest

pytest.importorskip("tvm")
pytest.importorskip("onnxruntime")

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.schedules.cpu import _isa  # noqa: E402

from .cases import DATA_PER_CONFIG, SEED, fuzzed_families, make_config, reproducer, run_config  # noqa: E402

HOST = _isa.host_features()
OTHER = tv.Target({"kind": "llvm", "mcpu": "haswell" if "avx512f" in HOST else "skylake-avx512", "num-cores": 2})
OTHER_RUNS = "avx512f" in HOST  # haswell code runs on an AVX-512 host


_FAMILIES: dict = {}


def _families(target=None) -> list[str]:
    key = str(target)
    if key not in _FAMILIES:
        _FAMILIES[key] = fuzzed_families(target)
    return _FAMILIES[key]


def pytest_generate_tests(metafunc):
    n = -(-metafunc.config.getoption("fuzz_cases") // DATA_PER_CONFIG)
    if "config_index" in metafunc.fixturenames:
        metafunc.parametrize("config_index", range(n), ids=[f"c{i:04d}" for i in range(n)])
    if "other_index" in metafunc.fixturenames:
        metafunc.parametrize("other_index", range(0, n, 4), ids=[f"c{i:04d}" for i in range(0, n, 4)])


def test_fuzz_case(config_index):
    cfg = make_config(SEED, config_index, _families())
    failures = run_config(cfg)
    assert not failures, "\n".join(failures) + "\nreproduce: " + reproducer(cfg)


def test_fuzz_other_x86_build(other_index):
    names = _families(OTHER)
    if not names:
        pytest.skip(f"no fast kernel family for {OTHER}")
    cfg = make_config(SEED, other_index // 4, names, OTHER)
    failures = run_config(cfg, OTHER, execute=OTHER_RUNS)
    assert not failures, "\n".join(failures) + "\nreproduce: " + reproducer(cfg)
