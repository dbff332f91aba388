"""Differential fuzzing of the integer kernels (see :mod:`tests.fuzz.cases`).

``--fuzz-cases N`` (default 500) sets the number of single-group cases run on this
host: N/8 random configs x 8 data sets, each bit for bit against the integer
reference and within one output step of ONNX Runtime. Beside them, in proportion:
every fourth config also built for the other x86 level (haswell, run here on an
AVX-512 host; skylake-avx512, compiled only, on an AVX2 host); N/40 layers with 2-4
activation scale groups in one kernel (conv and matmul, bit for bit against numpy's
float sum); N/80 attention activation x activation matmuls (2 data sets each); N/100
random annotated layers through the whole compiler, checked by ``verify``. A
failure names a one-line reproducer.
"""
from __future__ import annotations

import pytest

pytest.importorskip("tvm")
pytest.importorskip("onnxruntime")

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.schedules.cpu import _isa  # noqa: E402

from .cases import (  # noqa: E402
    DATA_PER_CONFIG,
    SEED,
    fuzzed_families,
    make_config,
    make_group_config,
    reproducer,
    run_act_config,
    run_config,
    run_group_config,
    run_model_config,
)

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
    cases = metafunc.config.getoption("fuzz_cases")
    counts = {"config_index": (-(-cases // DATA_PER_CONFIG), 1, "c"),  # name: (how many, step, id prefix)
              "other_index": (-(-cases // DATA_PER_CONFIG), 4, "c"),
              "group_index": (max(1, cases // 40), 1, "g"),
              "act_index": (max(1, cases // 80), 1, "a"),
              "model_index": (max(1, cases // 100), 1, "m")}
    for name, (n, step, prefix) in counts.items():
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, range(0, n, step), ids=[f"{prefix}{i:04d}" for i in range(0, n, step)])


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


def test_fuzz_scale_groups(group_index):
    """A layer's activation scale groups in one kernel (random channel counts, widths,
    zero points, gathers from a wider input; conv and matmul): bit for bit."""
    names = [n for n in ("x86-avx512-vnni", "x86-avx2-dot") if n in _families()]
    if not names:
        pytest.skip("no int8-dot family on this host")
    cfg = make_group_config(SEED, group_index)
    family = names[group_index % len(names)]
    failures = run_group_config(cfg, family)
    if failures == ["n/a"]:
        pytest.skip("these groups do not share a kernel on this family (tiles or operand modes differ)")
    assert not failures, "\n".join(failures) + f"\nreproduce: make_group_config({SEED}, {group_index}) on {family}"


def test_fuzz_attention_matmul(act_index):
    """Attention's activation x activation kernels, bit for bit."""
    failures = run_act_config(SEED, act_index)
    if failures == ["n/a"]:
        pytest.skip("no activation x activation kernel for these operands on this host")
    assert not failures, "\n".join(failures) + f"\nreproduce: run_act_config({SEED}, {act_index})"


def test_fuzz_layer_through_the_compiler(model_index):
    """A random annotated layer (per-channel width pairs, split axis and fraction,
    step layout, zero point, split mode) compiled and verified against its file."""
    failures = run_model_config(SEED, model_index)
    assert not failures, "\n".join(failures) + f"\nreproduce: run_model_config({SEED}, {model_index})"
