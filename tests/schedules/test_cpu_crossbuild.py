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


def test_pack_phase_gives_bitserial_zmm_vectors_on_icelake(rng):
    """Compiled through the passes (not the family alone), an ICELAKE bit-serial
    group gets the 512-bit knobs and its kernel popcounts zmm registers; on AVX2
    it keeps 256-bit vectors. (A strided conv: channel lanes.)"""
    from soniq_tvm.compiler import prepare
    from soniq_tvm.passes._common import soniq_call

    from tests.helpers import conv_case

    case = conv_case(rng, 64, 32, [1] * 64, [1] * 64, hw=(8, 30), stride=2)
    for target, vl, reg in ((ICELAKE, 8, "zmm"), (AVX2, 4, "ymm")):
        mod = prepare(case.model, target, family="cpu-bitserial")[0].mod
        found = []
        tv.relax.analysis.post_order_visit(mod["main"].body, lambda e: found.append(soniq_call(e, mod)) if
                                           soniq_call(e, mod) else None)
        (op, _), = found
        assert op.family == "cpu-bitserial" and op.knobs["vl"] == vl, op.knobs
        asm = asm_of("cpu-bitserial", op, target)
        popcnt = [line for line in asm.splitlines() if re.match(r"\s+vpopcntq\b", line)]
        if target is ICELAKE:
            wide = [line for line in popcnt if reg in line]  # the rest: the bipolar per-pixel sum
            assert len(wide) >= len(popcnt) / 2 and wide
        else:
            assert not popcnt  # AVX2: the vpshufb nibble table


def test_pixel_lanes_on_icelake_broadcast_weights_into_vpandq():
    """Pixel lanes: the weight word is an embedded broadcast of vpandq ({1to8}),
    the popcount is zmm, and the write-back stores whole vectors (no scalar
    32-bit stores per output)."""
    op = QOp("conv2d", "x", (1, 64, 10, 24), (16, 64, 3, 3), (1,) * 64, (1,) * 64, padding=(1, 1, 1, 1),
             knobs={"lanes": "px", "C": 8})
    asm = asm_of("cpu-bitserial", op, ICELAKE)
    assert re.search(r"vpandq\s+[^\n]*\{1to8\}", asm)
    assert count(asm, "vpopcntq") > 0 and all("zmm" in l for l in asm.splitlines() if re.match(r"\s+vpopcntq\b", l))
    assert count(asm, "vpmovqd") > 0  # int64 lanes narrowed to int32 for the vector store


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
