"""Packed low-bit families (``x86-*-lowbit``) and ``cpu-depthwise``.

Exactness against ``qop.reference`` with operands at the extremes of their widths,
the packing round trip, the tile knobs, feature gating, the cross-built
instructions and the cost rules' choices. Kernels run only where this host has
their instructions; the cross-build tests compile for other CPUs and read the
assembly, never calling it.
"""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.schedules import registry  # noqa: E402
from soniq_tvm.schedules.cpu import _isa  # noqa: E402
from soniq_tvm.schedules.cpu.lowbit import AVX2_LOWBIT, AVX512_LOWBIT, MODES, codes, fields  # noqa: E402

from test_cpu_families import CONV_CASES, check, make_op, operands  # noqa: E402  (same directory)

HOST = _isa.host_features()
VNNI512 = {"avx512f", "avx512bw", "avx512vnni"} <= HOST
AVX2 = tv.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})
HOST_T = tv.Target({"kind": "llvm", "mcpu": tv.host_cpu(), "num-cores": 2})
ALDERLAKE = tv.Target({"kind": "llvm", "mcpu": "alderlake", "num-cores": 2})
ZNVER3 = tv.Target({"kind": "llvm", "mcpu": "znver3"})
ICELAKE = tv.Target({"kind": "llvm", "mcpu": "icelake-server"})
needs_avx2 = pytest.mark.skipif("avx2" not in HOST,
        reason="host has no AVX2; cross-built in test_every_family_cross_builds")
needs_vnni = pytest.mark.skipif(not VNNI512,
        reason="host has no AVX512-VNNI; cross-built in test_every_family_cross_builds")
needs_avxvnni = pytest.mark.skipif(not {"avx2", "avxvnni"} <= HOST,
        reason="host has no AVX-VNNI; cross-built in test_every_family_cross_builds")

# the widest family this host runs is checked on the whole grid, the others on a sample
BEST = ("x86-avx512-lowbit", HOST_T) if VNNI512 else ("x86-avx2-lowbit", AVX2)
GRID = list(itertools.product(range(1, 5), range(1, 9), (True, False)))
SAMPLE = [(1, 8, True), (2, 8, False), (3, 5, True), (4, 8, True), (4, 7, False), (2, 1, False), (1, 2, True)]


def gemv(wb, ab, signed=True, k=77, n=45, lead=(1,), **kw):
    return make_op("matmul", wb, ab, a_signed=signed, x=(*lead, k), w=(k, n), **kw)


# ---- exactness -------------------------------------------------------------------------------
@needs_avx2
@pytest.mark.parametrize("wb,ab,signed", GRID)
def test_best_family_grid(wb, ab, signed):
    """Every width pair, signed and unsigned activations; K and N off every block size."""
    check(BEST[0], gemv(wb, ab, signed, lead=(3,)), BEST[1])


@needs_avx2
@pytest.mark.parametrize("wb,ab,signed", SAMPLE)
def test_avx2_lowbit(wb, ab, signed):
    check("x86-avx2-lowbit", gemv(wb, ab, signed, lead=(2, 3)), AVX2)


@needs_avxvnni
@pytest.mark.parametrize("wb,ab,signed", SAMPLE)
def test_avxvnni_lowbit(wb, ab, signed):
    check("x86-avxvnni-lowbit", gemv(wb, ab, signed), ALDERLAKE)


@needs_avx2
@pytest.mark.parametrize("family,target", [("x86-avx2-lowbit", AVX2), BEST], ids=["avx2", "best"])
@pytest.mark.parametrize("wb,ab,signed", [(4, 8, True), (4, 8, False), (3, 8, True), (2, 8, False), (1, 8, True)])
def test_extremes_do_not_saturate(family, target, wb, ab, signed):
    """Every product at the extreme of both widths over a long reduction: the
    vpmaddubsw pair bound (scaled codes <= 127) and the int32 accumulators hold."""
    check(family, gemv(wb, ab, signed, k=4 * 300, n=40), target, worst=True)


@needs_avx2
@pytest.mark.parametrize("wb", [1, 2, 3, 4])
@pytest.mark.parametrize("xval", [-128, 127])
def test_largest_codes_at_activation_extremes(wb, xval):
    """The largest weight code (w = max) against x = -128 / 127 everywhere: the
    vpmaddubsw pairs are 2 * 127 * 128 at most (exact), the sums long."""
    from soniq_tvm.qop import reference, weight_range

    op = gemv(wb, 8, k=4 * 257, n=130)
    x = np.full(op.x_shape, xval, np.int8)
    w = np.full(op.w_shape, weight_range(wb, True)[1])
    for name, target in {"x86-avx2-lowbit": AVX2, BEST[0]: BEST[1]}.items():
        fam = registry.get(name)
        lib = tvm.compile(fam.primfunc(op, target), target=target)
        out = tvm.runtime.empty(op.out_shape, "int32")
        lib["main"](tv.tensor(x), *[tv.tensor(p) for p in fam.pack(w, op)], out)
        np.testing.assert_array_equal(out.numpy(), reference(x, w, op))


@needs_avx2
@pytest.mark.parametrize("name,kw", [("gemv", dict(lead=(1,), k=4096, n=300)),
                                     ("k-not-mult-4", dict(lead=(1,), k=4098, n=17)),
                                     ("lead-dims", dict(lead=(2, 2, 3), k=64, n=129)),
                                     ("m9", dict(lead=(9,), k=300, n=24)),
                                     ("n-one", dict(lead=(5,), k=33, n=1))],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_matmul_shapes(name, kw):
    check(BEST[0], gemv(2, 8, **kw), BEST[1])
    check(BEST[0], gemv(3, 6, signed=False, **kw), BEST[1])


@needs_avx2
@pytest.mark.parametrize("wb", [1, 2, 3, 4])
def test_unsigned_weights(wb):
    check(BEST[0], gemv(wb, 8, signed=False, w_signed=False, lead=(3,)), BEST[1])


@needs_avx2
@pytest.mark.parametrize("name,kw", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv(name, kw):
    check(BEST[0], make_op("conv2d", 2, 5, a_signed=False, **dict(kw)), BEST[1])


@needs_avx2
@pytest.mark.parametrize("wb,ab", [(1, 8), (4, 4), (3, 8)])
def test_conv_avx2(wb, ab):
    check("x86-avx2-lowbit", make_op("conv2d", wb, ab, x=(1, 19, 6, 7), w=(21, 19, 3, 3), padding=(1, 1, 1, 1)),
          AVX2)


@needs_avx2
@pytest.mark.parametrize("knobs", [{"R": 1, "JP": 1}, {"R": 3, "JP": 2}, {"R": 5, "JP": 1}, {"R": 2, "JP": 3}])
def test_knobs_are_exact(knobs):
    op = gemv(2, 8, lead=(7,), k=130, n=200).with_(knobs=knobs)
    check(BEST[0], op, BEST[1])


def test_knob_space_values_are_valid():
    op = make_op("conv2d", 2, 4, x=(1, 24, 10, 10), w=(140, 24, 3, 3), padding=(1, 1, 1, 1))
    for fam in (AVX512_LOWBIT, AVX2_LOWBIT):
        space = fam.knob_space(op, AVX2)
        assert space["R"] and space["JP"]
        for r, jp in itertools.product(space["R"], space["JP"]):
            try:
                k = fam.knobs(op.with_(knobs={"R": r, "JP": jp}))
            except ValueError:
                continue  # some pairs exceed the register tile; each value alone is valid
            assert k == {"R": r, "JP": jp}
    with pytest.raises(ValueError):
        AVX512_LOWBIT.knobs(op.with_(knobs={"R": 8, "JP": 8}))


# ---- packing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["x86-avx512-lowbit", "x86-avxvnni-lowbit", "x86-avx2-lowbit"])
@pytest.mark.parametrize("wb", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["matmul", "conv2d"])
def test_pack_roundtrip_and_real_width(family, wb, kind):
    kw = {"x": (1, 70, 5, 5), "w": (12, 35, 3, 3), "groups": 2} if kind == "conv2d" else {"x": (2, 45), "w": (45, 300)}
    op = make_op(kind, wb, 8, **kw)
    fam = registry.get(family)
    _, w = operands(op, np.random.default_rng(wb))
    packed = fam.pack(w, op)
    np.testing.assert_array_equal(fam.unpack(packed, op), w)
    assert packed[0].dtype == np.uint8
    # stored at the field width (3-bit in 4-bit fields), up to block padding
    lay = fam.layout(op)
    bits = 4 if wb == 3 else wb
    taps = op.w_shape[2] * op.w_shape[3] if kind == "conv2d" else 1
    assert packed[0].nbytes * 8 == op.groups * lay["ogp"] * lay["cgp"] * taps * bits


def test_pack_rejects_out_of_range_weights():
    op = gemv(2, 8)
    w = np.full(op.w_shape, 2)
    with pytest.raises(ValueError, match="2-bit range"):
        AVX2_LOWBIT.pack(w, op)


def test_fields_fit_their_operand():
    """Scaled codes fit the unsigned operand: <= 255 for vpdpbusd, <= 127 for
    vpmaddubsw (its pair sum must stay below 2**15); exponents undo the scale."""
    for wb in range(1, 5):
        op = gemv(wb, 8)
        umax = (1 << wb) - 1
        for mode in MODES.values():
            for sh, mask, e in fields(op, mode):
                assert mask == umax << e <= mode.limit and sh in (0, 1)
        s, z = codes(op)
        lo, hi = (-1, 1) if wb == 1 else (-(1 << (wb - 1)), (1 << (wb - 1)) - 1)
        assert {s * u - z for u in range(umax + 1)} >= set(range(lo, hi + 1, 2 if wb == 1 else 1))


# ---- gating, instructions, choices ----------------------------------------------------------------
def test_feature_gating():
    op = gemv(2, 8, k=4096, n=4096)
    plain = tv.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"})
    arm = tv.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
    assert registry.get("x86-avx512-lowbit").cost(op, ZNVER3) is None
    assert registry.get("x86-avxvnni-lowbit").cost(op, ZNVER3) is None
    assert registry.get("x86-avx2-lowbit").cost(op, ZNVER3) is not None
    assert registry.get("x86-avxvnni-lowbit").cost(op, ALDERLAKE) is not None
    assert registry.get("x86-avx512-lowbit").cost(op, ALDERLAKE) is None
    for name in ("x86-avx512-lowbit", "x86-avxvnni-lowbit", "x86-avx2-lowbit"):
        assert registry.get(name).cost(op, plain) is None
        assert registry.get(name).cost(op, arm) is None
        assert registry.get(name).cost(gemv(5, 8), ICELAKE) is None  # 5+ bits: int8-dot
        assert registry.get(name).cost(gemv(2, 8, k=70000, n=16), ICELAKE) is None  # int32 bound
        with pytest.raises(ValueError):
            registry.get(name).primfunc(op, plain)
    depthwise = make_op("conv2d", 2, 4, x=(1, 8, 6, 6), w=(8, 1, 3, 3), groups=8)
    assert registry.get("x86-avx512-lowbit").cost(depthwise, ICELAKE) is None


def test_avx2_target_never_selects_avx512_code():
    ops = [gemv(w, a, k=4096, n=4096, lead=(m,)) for w, a in [(1, 8), (2, 8), (4, 8), (8, 8)] for m in (1, 16)]
    ops += [make_op("conv2d", w, a, x=(1, 64, 28, 28), w=(64, 64, 3, 3), padding=(1, 1, 1, 1))
            for w, a in [(1, 1), (2, 4), (8, 8)]]
    for op in ops:
        name = registry.select(op, ZNVER3).name
        assert "avx512" not in name and "vnni" not in name, (op.w_bit, op.a_bit, name)


def asm_of(family, op, target):
    assert registry.get(family).cost(op, target) is not None
    return tvm.compile(registry.get(family).primfunc(op, target), target=target).mod.inspect_source("asm")


def count(asm, mnemonic):
    return len(re.findall(rf"^\s+(?:\{{vex\}}\s+)?{mnemonic}\b", asm, flags=re.M))


@pytest.mark.parametrize("wb", [1, 2, 4])
def test_crossbuild_icelake_vpdpbusd_zmm(wb):
    asm = asm_of("x86-avx512-lowbit", gemv(wb, 8, k=256, n=256), ICELAKE)
    assert len(re.findall(r"^\s+vpdpbusd\s+%zmm", asm, flags=re.M)) > 0
    assert count(asm, "vpandq") + count(asm, "vpandd") > 0
    assert count(asm, "vpmaddubsw") == 0


def test_crossbuild_alderlake_vex_vpdpbusd_ymm():
    asm = asm_of("x86-avxvnni-lowbit", gemv(2, 8, k=256, n=256), ALDERLAKE)
    assert len(re.findall(r"^\s+\{vex\}\s+vpdpbusd\s+%ymm", asm, flags=re.M)) > 0
    assert "zmm" not in asm


@pytest.mark.parametrize("wb", [1, 2, 4])
def test_crossbuild_znver3_avx2_only(wb):
    asm = asm_of("x86-avx2-lowbit", gemv(wb, 8, k=256, n=256), ZNVER3)
    assert count(asm, "vpmaddubsw") > 0 and count(asm, "vpmaddwd") > 0
    assert "zmm" not in asm and count(asm, "vpdpbusd") == 0


def test_cost_prefers_packed_weights_for_low_bit_gemv():
    for target in (ICELAKE, ZNVER3, ALDERLAKE):
        for wb in (2, 4):
            # weights streamed at their real width: the packed low-bit or the lookup-table kernel
            assert registry.select(gemv(wb, 8, k=4096, n=4096), target).name.endswith(("-lowbit", "-lut"))
        assert registry.select(gemv(8, 8, k=4096, n=4096), target).name in ("x86-avx512-vnni", "x86-avx2-dot")
    assert registry.select(gemv(2, 8, k=4096, n=4096), ICELAKE).name == "x86-avx512-lowbit"
    assert registry.select(gemv(2, 8, k=4096, n=4096), ZNVER3).name == "x86-avx2-lut"  # AVX2: pshufb beats madd
    assert registry.select(gemv(1, 1, k=4096, n=4096), ICELAKE).name == "cpu-bitserial"
    conv = dict(x=(1, 64, 56, 56), w=(64, 64, 3, 3), padding=(1, 1, 1, 1))
    # compute-bound convs: no packed-weight family; 3x3 stride 1 at <= 4 bits: integer Winograd
    assert registry.select(make_op("conv2d", 4, 4, **conv), ICELAKE).name == "x86-avx512-winograd"
    assert registry.select(make_op("conv2d", 2, 4, **conv), ZNVER3).name == "x86-avx2-winograd"
    strided = dict(conv, strides=(2, 2))
    assert registry.select(make_op("conv2d", 4, 4, **strided), ICELAKE).name == "x86-avx512-vnni"
    assert registry.select(make_op("conv2d", 2, 4, **strided), ZNVER3).name == "x86-avx2-dot"
    dense = gemv(8, 8, k=4096, n=4096)
    vnni, lowbit = registry.get("x86-avx512-vnni"), registry.get("x86-avx512-lowbit")
    assert vnni.cost(dense, ICELAKE) > 2 * lowbit.cost(gemv(2, 8, k=4096, n=4096), ICELAKE)


# ---- depthwise -------------------------------------------------------------------------------------
DW_CASES = [
    ("3x3-pad", dict(x=(2, 8, 9, 20), w=(8, 1, 3, 3), groups=8, padding=(1, 1, 1, 1))),
    ("5x3-s2-mult2", dict(x=(1, 6, 11, 7), w=(12, 1, 5, 3), groups=6, strides=(2, 2), padding=(2, 1, 1, 0))),
    ("dilated-tiny", dict(x=(1, 6, 3, 3), w=(6, 1, 3, 3), groups=6, dilation=(2, 1), padding=(2, 1, 2, 1))),
    ("s2-wide", dict(x=(1, 4, 9, 41), w=(4, 1, 3, 3), groups=4, strides=(1, 2), padding=(1, 1, 1, 1))),
]


@pytest.mark.parametrize("name,kw", DW_CASES, ids=[c[0] for c in DW_CASES])
@pytest.mark.parametrize("wb,ab,signed,wsigned", [(8, 8, True, True), (8, 8, False, False), (4, 4, True, True),
                                                  (1, 1, True, True), (2, 3, False, True)])
def test_depthwise(name, kw, wb, ab, signed, wsigned):
    target = HOST_T if "avx2" in HOST else tv.Target({"kind": "llvm", "mcpu": tv.host_cpu()})
    check("cpu-depthwise", make_op("conv2d", wb, ab, a_signed=signed, w_signed=wsigned, **dict(kw)), target,
          worst=(wb == 8))


def test_depthwise_selection_and_gating():
    op = make_op("conv2d", 4, 4, x=(1, 32, 28, 28), w=(32, 1, 3, 3), groups=32, padding=(1, 1, 1, 1))
    for target in (ZNVER3, ICELAKE):
        assert registry.select(op, target).name == "cpu-depthwise"
    fam = registry.get("cpu-depthwise")
    assert fam.cost(make_op("conv2d", 4, 4), ZNVER3) is None  # not depthwise
    huge = make_op("conv2d", 8, 8, a_signed=False, w_signed=False, x=(1, 2, 20, 20), w=(2, 1, 17, 17), groups=2)
    assert fam.cost(huge, ZNVER3) is None  # 289 taps x 255 x 255 > 2**24: float32 would round
    _, w = operands(op, np.random.default_rng(0))
    np.testing.assert_array_equal(fam.unpack(fam.pack(w, op), op), w)


def test_depthwise_crossbuilds():
    """Plain vector code: zmm FMAs for icelake-server, none for znver3, NEON fmla on aarch64."""
    op = make_op("conv2d", 4, 4, x=(1, 16, 20, 40), w=(16, 1, 3, 3), groups=16, padding=(1, 1, 1, 1))
    asm = asm_of("cpu-depthwise", op, ICELAKE)
    assert re.search(r"^\s+vfmadd\w+\s+.*%zmm", asm, flags=re.M)
    assert "zmm" not in asm_of("cpu-depthwise", op, ZNVER3)
    neon = tv.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert re.search(r"^\s+fml[as]\s", asm_of("cpu-depthwise", op, neon), flags=re.M)
