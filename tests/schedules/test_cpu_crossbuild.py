"""Cross-built kernels use the instructions they are written for.

These targets (AVX-512 VNNI / VPOPCNTDQ, aarch64 NEON dotprod) are only compiled
and disassembled with LLVM's assembly printer here, never called.
"""
from __future__ import annotations

import re

import pytest

tvm = pytest.importorskip("tvm")

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.qop import QOp  # noqa: E402
from soniq_tvm.schedules import registry  # noqa: E402

CASCADELAKE = {"kind": "llvm", "mcpu": "cascadelake"}
ICELAKE = {"kind": "llvm", "mcpu": "icelake-server"}
NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
AVX2 = {"kind": "llvm", "mcpu": "znver3"}


def conv(wb, ab):
    return QOp("conv2d", "x", (1, 13, 9, 9), (19, 13, 3, 3), (wb,) * 13, (ab,) * 13, padding=(1, 1, 1, 1))


def matmul(wb, ab):
    return QOp("matmul", "x", (1, 77), (77, 40), (wb,) * 77, (ab,) * 77)


def asm_of(family, op, target_dict):
    target = tv.Target(target_dict)
    fam = registry.get(family)
    assert fam.cost(op, target) is not None, f"{family} refused {target_dict}"
    return tvm.compile(fam.primfunc(op, target), target=target).mod.inspect_source("asm")


def count(asm, mnemonic):
    return len(re.findall(rf"^\s+{mnemonic}\b", asm, flags=re.M))


@pytest.mark.parametrize("target", [CASCADELAKE, ICELAKE], ids=["cascadelake", "icelake-server"])
@pytest.mark.parametrize("make", [conv, matmul])
def test_vnni_uses_vpdpbusd(target, make):
    asm = asm_of("x86-avx512-vnni", make(8, 8), target)
    assert count(asm, "vpdpbusd") > 0
    assert count(asm, "vpmaddubsw") == 0


@pytest.mark.parametrize("make", [conv, matmul])
def test_bitserial_uses_vpopcntq_on_icelake(make):
    asm = asm_of("cpu-bitserial", make(1, 1), ICELAKE)
    assert count(asm, "vpopcntq") > 0


@pytest.mark.parametrize("make", [conv, matmul])
def test_neon_uses_sdot(make):
    asm = asm_of("arm-neon-sdot", make(8, 8), NEON)
    assert count(asm, "sdot") > 0


def test_bitserial_uses_cnt_on_neon():
    asm = asm_of("cpu-bitserial", conv(1, 2), NEON)
    assert count(asm, "cnt") > 0


@pytest.mark.parametrize("wb,ab,inst", [(4, 4, "vpmaddubsw"), (7, 8, "vpmaddubsw"), (8, 8, "vpmaddwd")])
def test_avx2_dot_instructions(wb, ab, inst):
    asm = asm_of("x86-avx2-dot", conv(wb, ab), AVX2)
    assert count(asm, inst) > 0
    assert "zmm" not in asm


def test_avx2_16bit_sums_only_where_proven():
    asm = asm_of("x86-avx2-dot", conv(4, 4), AVX2)
    assert count(asm, "vpaddsw") > 0  # the 16-bit partial sums
    asm = asm_of("x86-avx2-dot", conv(7, 8), AVX2)  # 2*255*64 fits once, not twice
    assert count(asm, "vpaddsw") == 0 and count(asm, "vpaddw") == 0
