"""Target parsing: legacy strings, dicts, Target objects, and errors naming the option."""
from __future__ import annotations

import pytest

from soniq_tvm import TargetError
from soniq_tvm.targets import parse_target, to_tvm_target


@pytest.mark.parametrize("text, expect", [
    ("llvm -mcpu=skylake-avx512 -mattr=+avx512f", {"kind": "llvm", "mcpu": "skylake-avx512", "mattr": ["+avx512f"]}),
    ("llvm -mtriple=aarch64-linux-gnu -mattr=+neon", {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                                      "mattr": ["+neon"]}),
    ("cuda -arch=sm_80", {"kind": "cuda", "arch": "sm_80"}),
    ("llvm -mcpu=znver3 -num-cores=4", {"kind": "llvm", "mcpu": "znver3", "num-cores": 4}),
])
def test_legacy_strings(text, expect):
    d = parse_target(text)
    for k, v in expect.items():
        assert d[k] == v
    assert to_tvm_target(d).kind.name == expect["kind"]


def test_plain_llvm_is_this_host():
    from soniq_tvm import tvm_shim

    d = parse_target("llvm")
    assert d["mcpu"] == tvm_shim.host_cpu()
    assert d["num-cores"] >= 1


def test_dict_and_target_object():
    import tvm

    assert parse_target({"kind": "llvm", "mcpu": "znver3"})["mcpu"] == "znver3"
    t = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake"})
    assert parse_target(t)["mcpu"] == "cascadelake"


@pytest.mark.parametrize("bad, word", [
    ("llvm -mcpux=znver3", "mcpux"),
    ("gpu9000", "gpu9000"),
    ("cuda", "arch"),
    ("llvm -num-cores=two", "num-cores"),
    ("llvm mcpu=znver3", "mcpu=znver3"),
    ("", "empty"),
    ({"kind": "llvm", "bogus": 1}, "bogus"),
])
def test_bad_targets_name_the_option(bad, word):
    with pytest.raises(TargetError, match=word):
        parse_target(bad)
