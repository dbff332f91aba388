"""``benchmarks.kernels``' attention section: both kernels exact on the BERT shapes.
(Speed is the benchmark's to report, not a test's to assert.)"""
from __future__ import annotations

import pytest

pytest.importorskip("tvm")

from benchmarks import kernels  # noqa: E402
from soniq_tvm.schedules.cpu import _isa  # noqa: E402


def test_attention_section_rows_are_exact():
    lines = []
    rows = kernels.attention_section(rounds=1, log=lines.append)
    hostf = _isa.host_features()
    if "avx2" not in hostf:
        assert rows == [] and "no AVX2" in lines[0]
        return
    modes = ["avx512-vnni", "avx2-wide"] if "avx512vnni" in hostf else ["avx2-wide"]
    generics = ["generic int32 host"] + (["generic int32 x86-64-v3"] if len(modes) == 2 else [])
    assert {(r["shape"], r["kernel"]) for r in rows} == {
        (f"{b}x{m}x{k}x{n} {d}", kern) for b, m, k, n, d in kernels.ATTENTION
        for kern in [f"actdot {m_}" for m_ in modes] + generics}
    assert all(r["exact"] and r["us"] > 0 for r in rows)
    assert all(r["x_generic"] == 1.0 for r in rows if r["kernel"].startswith("generic"))


def test_resnet18_section_rows_are_exact_and_name_their_goal():
    lines = []
    convs = [c for c in kernels.RESNET_CONVS if c[0] in ("1x1/2 14->7", "3x3 @7")]
    rows = kernels.resnet18_section(rounds=1, log=lines.append, convs=convs)
    hostf = _isa.host_features()
    families = {d for d, _w, _m, need, _mode in kernels.WINOGRAD_RUNS if need <= hostf}
    assert {(r["conv"], r["family"]) for r in rows} == {(c[0], f) for c in convs for f in families}
    assert all(r["exact"] and r["us"] > 0 and 0 < r["pct_peak"] for r in rows)
    assert {r["conv"]: r["goal"] for r in rows} == {"1x1/2 14->7": 70.0, "3x3 @7": 85.0}
    assert any("peak" in line and "GOP/s" in line for line in lines)
