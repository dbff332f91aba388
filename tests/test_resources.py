"""Memory bounds (issue #15): a model whose constants and live tensors would exceed
the bound is refused before anything is built, with the figures; an input shape too
big for the machine is refused before the importer allocates it."""
from __future__ import annotations

import pytest

import soniq_tvm
from soniq_tvm import ResourceLimitError, SoniqError, models
from soniq_tvm.resources import check_inputs, default_limit, memory_needs, parse_bytes


@pytest.fixture(scope="module")
def cnn():
    return models.example_cnn()


def test_parse_bytes():
    assert parse_bytes(4096) == 4096
    assert parse_bytes("512M") == 512 << 20
    assert parse_bytes("8G") == 8 << 30
    assert parse_bytes("1.5KiB") == 1536
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_default_limit_from_environment(monkeypatch):
    monkeypatch.setenv("SONIQ_MEMORY_LIMIT", "3G")
    assert default_limit() == 3 << 30
    monkeypatch.setenv("SONIQ_MEMORY_LIMIT", "plenty")
    with pytest.raises(ResourceLimitError, match="SONIQ_MEMORY_LIMIT"):
        default_limit()
    monkeypatch.delenv("SONIQ_MEMORY_LIMIT")
    assert default_limit() > 1 << 28  # this machine's memory


def test_memory_needs_counts_constants_once_and_the_live_peak(cnn):
    from soniq_tvm.compiler import _prepare
    from soniq_tvm.targets import parse_target

    result = _prepare(cnn, parse_target("llvm"), probes=True, lift=True)[0]  # as compile() does
    needs = memory_needs(result.mod)
    m = soniq_tvm.compile(cnn, target="llvm")
    packed = m.plan.bytes_after
    assert packed <= needs["weights"] < packed + 64 * 1024  # packed weights + scales, biases, tables
    # the input (3 x 16 x 16 float) and the widest tensor (16 x 16 x 16 float) are alive at some point
    assert needs["workspace"] >= 3 * 16 * 16 * 4 + 16 * 16 * 16 * 4
    assert needs["workspace"] < 40 * 16 * 16 * 16 * 4  # far below "every tensor at once"
    assert m.manifest["memory"] == {"constants_bytes": needs["weights"], "workspace_bytes": needs["workspace"]}


def test_compile_refuses_a_model_over_the_bound(cnn):
    with pytest.raises(ResourceLimitError) as e:
        soniq_tvm.compile(cnn, target="llvm", memory_limit="40K")
    text = str(e.value)
    assert "KiB of constants" in text and "over the bound of 40.0 KiB" in text and e.value.tensor
    assert isinstance(e.value, SoniqError)


def test_huge_input_shape_is_refused_before_import(cnn):
    with pytest.raises(ResourceLimitError, match="input shape") as e:
        soniq_tvm.compile(cnn, target="llvm", shapes={"x": [1, 3, 200000, 200000]})
    assert e.value.tensor == "x"
    with pytest.raises(ResourceLimitError):
        check_inputs([{"name": "x", "shape": [1 << 20], "dtype": "float32"}], limit="1M")
    check_inputs([{"name": "x", "shape": ["n", 3], "dtype": "float32"}], limit="1K")  # symbolic: not judged
