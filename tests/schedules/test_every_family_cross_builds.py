"""Every ISA-specific kernel family builds for its own instruction set on any host.

A test that runs a kernel skips where the host lacks the ISA (an AVX2-only CI host
cannot run VNNI code). This file is what stands in for those runs there: each
family with ISA requirements is compiled for a target that has them, through the
same ``primfunc`` the compiler uses, and its assembly must hold the instruction
the family is written around. Nothing here is executed, so it runs the same on
AVX2-only, AVX-512 VNNI and ARM hosts; a family added without an entry below fails.
"""
from __future__ import annotations

import re

import pytest

tvm = pytest.importorskip("tvm")

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.qop import QOp  # noqa: E402
from soniq_tvm.schedules import registry  # noqa: E402

ICELAKE = {"kind": "llvm", "mcpu": "icelake-server"}
ALDERLAKE = {"kind": "llvm", "mcpu": "alderlake"}
HASWELL = {"kind": "llvm", "mcpu": "haswell"}
NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}

# family -> (target with its ISA, instruction it is written around, register it must use or None)
EXPECT = {
    "x86-avx2-dot": (HASWELL, "vpmaddubsw|vpmaddwd", "ymm"),
    "x86-avx512-vnni": (ICELAKE, "vpdpbusd", "zmm"),
    "arm-neon-sdot": (NEON, "sdot", None),
    "cpu-bitserial": (ICELAKE, "vpopcntq", None),
    "x86-avx512-lowbit": (ICELAKE, "vpdpbusd", "zmm"),
    "x86-avxvnni-lowbit": (ALDERLAKE, "vpdpbusd", "ymm"),
    "x86-avx2-lowbit": (HASWELL, "vpmaddubsw", "ymm"),
    "x86-avx512-lut": (ICELAKE, "vpshufb", "zmm"),
    "x86-avx2-lut": (HASWELL, "vpshufb", "ymm"),
    "arm-neon-lut": (NEON, "tbl", None),
    "cpu-depthwise": (HASWELL, "vfmadd\\w+", None),  # small ints in fp32 lanes: exact
    "x86-avx512-winograd": (ICELAKE, "vpdpbusd", "zmm"),
    "x86-avx2-winograd": (HASWELL, "vpmaddubsw", "ymm"),
}
REFERENCE = {"int8-ref", "bitplane-ref"}  # plain TIR, no ISA: run on every host elsewhere


def _ops(family: str):
    """Small ops of the kinds and widths the family takes (tried in order)."""
    if family == "cpu-depthwise":
        yield QOp("conv2d", "x", (1, 16, 9, 9), (16, 1, 3, 3), (4,) * 16, (4,) * 16, padding=(1, 1, 1, 1), groups=16)
        return
    for wb, ab in ((2, 2), (1, 4), (4, 4), (8, 8), (1, 1), (2, 8)):
        yield QOp("conv2d", "x", (1, 16, 9, 9), (16, 16, 3, 3), (wb,) * 16, (ab,) * 16, padding=(1, 1, 1, 1))
        yield QOp("matmul", "x", (1, 64), (64, 32), (wb,) * 64, (ab,) * 64)


def test_every_isa_family_has_a_cross_build_entry():
    names = {f.name for f in registry.families()}
    assert names - REFERENCE == set(EXPECT), "add the new family to EXPECT"


@pytest.mark.parametrize("family", sorted(EXPECT))
def test_family_builds_for_its_isa_and_uses_its_instruction(family):
    target_dict, mnemonic, reg = EXPECT[family]
    fam = registry.get(family)
    target = tv.Target(target_dict)
    op = next((o for o in _ops(family) if fam.cost(o, target) is not None), None)
    assert op is not None, f"{family} takes none of the test ops on {target_dict}"
    op = registry.with_target_knobs(fam, op, target)
    asm = tvm.compile(fam.primfunc(op, target), target=target).mod.inspect_source("asm")
    lines = [ln for ln in asm.splitlines() if re.match(rf"^\s+(\{{vex\}}\s+)?({mnemonic})\b", ln)]
    assert lines, f"{family} on {target_dict}: no {mnemonic} in its code"
    if reg is not None:
        assert any(reg in ln for ln in lines), f"{family}: {mnemonic} never on {reg} registers"
