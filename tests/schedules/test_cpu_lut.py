"""Lookup-table families (``x86-avx512-lut``, ``x86-avx2-lut``, ``arm-neon-lut``).

Exactness against ``qop.reference`` for every weight width x activation width,
signed and unsigned, on awkward shapes and at the operand extremes that make the
16-bit partial sums tight; the packing round trip; the overflow bound itself; the
knobs; feature gating; the instructions in the cross-built assembly (zmm and ymm
``vpshufb``, NEON ``tbl``) and the cost rule's choices. Kernels run only where
this host has their instructions; the cross-build tests only compile.
"""
from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.qop import reference, weight_range  # noqa: E402
from soniq_tvm.schedules import registry  # noqa: E402
from soniq_tvm.schedules.cpu import _isa  # noqa: E402
from soniq_tvm.schedules.cpu.lut import (AVX2_LUT, AVX512_LUT, MAX_REDUCTION, MODES, NEON_LUT,  # noqa: E402
                                         chunk_groups, table_max, units)

from test_cpu_families import check, make_op, operands  # noqa: E402  (same directory)

HOST = _isa.host_features()
HAS_BW = {"avx512f", "avx512bw"} <= HOST
HOST_T = tv.Target({"kind": "llvm", "mcpu": tv.host_cpu(), "num-cores": 2})
HASWELL = tv.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
ICELAKE = tv.Target({"kind": "llvm", "mcpu": "icelake-server"})
ZNVER5 = tv.Target({"kind": "llvm", "mcpu": "znver5", "num-cores": 2})
NEON = tv.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
needs_avx2 = pytest.mark.skipif("avx2" not in HOST,
        reason="host has no AVX2; cross-built in test_every_family_cross_builds")

# the widest family this host runs gets the whole grid, the AVX2 one a sample
BEST = ("x86-avx512-lut", HOST_T) if HAS_BW else ("x86-avx2-lut", HASWELL)
GRID = list(itertools.product(range(1, 5), range(2, 9), (True, False)))
SAMPLE = [(1, 8, True), (2, 8, False), (3, 7, True), (4, 8, True), (4, 5, False), (2, 6, True), (1, 3, False)]


def gemv(wb, ab, signed=True, k=77, n=45, lead=(1,), **kw):
    return make_op("matmul", wb, ab, a_signed=signed, x=(*lead, k), w=(k, n), **kw)


def run(family, op, target, x, w):
    fam = registry.get(family)
    lib = tvm.compile(fam.primfunc(op, target), target=target)
    out = tvm.runtime.empty(op.out_shape, "int32")
    lib["main"](tv.tensor(x), *[tv.tensor(p) for p in fam.pack(w, op)], out)
    return out.numpy()


# ---- exactness -------------------------------------------------------------------------------
@needs_avx2
@pytest.mark.parametrize("wb,ab,signed", GRID)
def test_best_family_grid(wb, ab, signed):
    """Every width pair, signed and unsigned activations; K = 77 (not a multiple of
    4 or 8), N = 45 (not a multiple of the vector width), 3 rows."""
    check(BEST[0], gemv(wb, ab, signed, lead=(3,)), BEST[1])


@needs_avx2
@pytest.mark.parametrize("wb,ab,signed", SAMPLE)
def test_avx2_lut(wb, ab, signed):
    check("x86-avx2-lut", gemv(wb, ab, signed, lead=(2, 3), k=130, n=70), HASWELL)


def _tight_operands(op, single_bit: bool):
    """Activations at their largest code (x' = 2**a - 1 everywhere) and weights whose
    codes make every lookup the largest low byte (``single_bit``: one set bit per
    group and plane, T = x'max, low byte 255 for 8-bit activations) or the largest
    entry (all bits set: T = 4 x'max, high byte 3 for 8-bit activations)."""
    xmax = (1 << (op.a_bit - 1)) - 1 if op.a_signed else (1 << op.a_bit) - 1
    x = np.full(op.x_shape, xmax).astype(op.a_dtype)
    lo, hi = weight_range(op.w_bit, op.w_signed)
    k, n = op.w_shape
    if single_bit:  # u = 2**b - 1 on the first weight of each group of 4, u = 0 elsewhere
        w = np.full((k, n), lo if op.w_signed and not op.bipolar else (-1 if op.bipolar else 0))
        w[0::4] = hi
    else:
        w = np.full((k, n), hi)
    return x, w


@needs_avx2
@pytest.mark.parametrize("family,target", [BEST, ("x86-avx2-lut", HASWELL)], ids=["best", "avx2"])
@pytest.mark.parametrize("wb,ab,signed", [(1, 8, False), (2, 8, False), (3, 8, True), (4, 8, False), (4, 7, False),
                                          (3, 6, False), (1, 6, True), (2, 7, True)])
@pytest.mark.parametrize("single_bit", [False, True], ids=["all-set", "one-bit"])
def test_partial_sums_at_their_bound(family, target, wb, ab, signed, single_bit):
    """Every lookup at the bound the chunk length is derived from, over several full
    chunks (K = 2003: 85-group chunks for 8-bit activations are 340 values long):
    the uint16 / uint8 partial sums reach their limit and stay exact."""
    op = gemv(wb, ab, signed, k=2003, n=70, lead=(2,))
    x, w = _tight_operands(op, single_bit)
    np.testing.assert_array_equal(run(family, op, target, x, w), reference(x, w, op))


@needs_avx2
@pytest.mark.parametrize("wb", [1, 2, 3, 4])
@pytest.mark.parametrize("xval", [-128, 127])
def test_extremes_signed_8bit(wb, xval):
    """x = -128 / 127 everywhere against the most negative / positive weights."""
    op = gemv(wb, 8, k=4 * 257 + 3, n=130)
    x = np.full(op.x_shape, xval, np.int8)
    lo, hi = weight_range(wb, True)
    for wval in (lo, hi):
        w = np.full(op.w_shape, wval)
        np.testing.assert_array_equal(run(BEST[0], op, BEST[1], x, w), reference(x, w, op))


@needs_avx2
@pytest.mark.parametrize("name,kw", [("gemv-4096", dict(k=4096, n=300)),
                                     ("k-4098", dict(k=4098, n=17)),
                                     ("k-1", dict(k=1, n=9)),
                                     ("lead-dims", dict(lead=(2, 2, 3), k=64, n=129)),
                                     ("m9", dict(lead=(9,), k=300, n=24)),
                                     ("n-one", dict(lead=(5,), k=33, n=1)),
                                     ("x-1d", dict(lead=(), k=70, n=66))],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_matmul_shapes(name, kw):
    for family, target in (BEST, ("x86-avx2-lut", HASWELL)):
        check(family, gemv(2, 8, **kw), target)
        check(family, gemv(3, 6, signed=False, **kw), target)


@needs_avx2
@pytest.mark.parametrize("wb", [1, 2, 3, 4])
def test_unsigned_weights(wb):
    check(BEST[0], gemv(wb, 8, signed=False, w_signed=False, lead=(3,)), BEST[1])
    check(BEST[0], gemv(wb, 4, signed=True, w_signed=False, lead=(3,)), BEST[1])


@needs_avx2
@pytest.mark.parametrize("knobs", [{"R": 1, "JB": 1}, {"R": 3, "JB": 2}, {"R": 4, "JB": 1}, {"R": 2, "JB": 3},
                                   {"R": 1, "JB": 7}])
def test_knobs_are_exact(knobs):
    op = gemv(3, 8, lead=(7,), k=130, n=200).with_(knobs=knobs)
    check(BEST[0], op, BEST[1])
    check(BEST[0], gemv(2, 5, lead=(7,), k=130, n=200).with_(knobs=knobs), BEST[1])


def test_knob_space_values_are_valid():
    op = gemv(2, 8, lead=(16,), k=512, n=700)
    for fam in (AVX512_LUT, AVX2_LUT, NEON_LUT):
        space = fam.knob_space(op, None)
        assert space["R"] == [1, 2, 3, 4] and space["JB"][0] == 1
        for r, jb in itertools.product(space["R"], space["JB"]):
            try:
                k = fam.knobs(op.with_(knobs={"R": r, "JB": jb}))
            except ValueError:
                continue  # the pair exceeds the 1 KiB partial-sum buffer; each value alone is valid
            assert k == {"R": r, "JB": jb}
    with pytest.raises(ValueError):
        AVX512_LUT.knobs(op.with_(knobs={"R": 4, "JB": 8}))
    with pytest.raises(ValueError):
        AVX512_LUT.knobs(gemv(2, 8, lead=(2,)).with_(knobs={"R": 3}))  # more rows than the op has


# ---- the overflow bound -------------------------------------------------------------------------
def test_chunk_groups_is_the_exact_bound():
    """The chunk length is the largest that keeps every 16-bit partial sum (and the
    8-bit high-byte sums) within its container, for every activation width."""
    for ab, signed in itertools.product(range(1, 9), (True, False)):
        op = gemv(2, ab, signed)
        tmax = table_max(op)
        assert tmax == 4 * ((1 << ab) - 1)
        lmax, hmax = min(255, tmax), tmax >> 8
        for kind, scale in (("single", 1), ("pair", 3)):
            n = chunk_groups(op, kind)
            assert n * scale * lmax <= 65535 and n * hmax <= 255
            assert (n + 1) * scale * lmax > 65535 or (n + 1) * hmax > 255
    assert chunk_groups(gemv(2, 8), "pair") == chunk_groups(gemv(2, 8), "single") == 85
    assert chunk_groups(gemv(2, 6), "single") == 260


def test_int32_bound_and_units():
    assert MAX_REDUCTION * 255 * 15 < 2 ** 31
    x86, neon = MODES["pshufb512"], MODES["tbl128"]
    assert units(gemv(1, 8), x86) == [("single", 0)]
    assert units(gemv(2, 8), x86) == [("pair", 0)]
    assert units(gemv(3, 8), x86) == [("pair", 0), ("single", 2)]
    assert units(gemv(4, 8), x86) == [("pair", 0), ("pair", 2)]
    assert units(gemv(4, 8), neon) == [("single", j) for j in range(4)]


# ---- packing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", [AVX512_LUT, AVX2_LUT, NEON_LUT], ids=lambda f: f.name)
@pytest.mark.parametrize("wb,wsigned", [(1, True), (2, True), (3, True), (4, True), (3, False), (1, False)])
def test_pack_roundtrip_and_real_width(fam, wb, wsigned):
    op = gemv(wb, 8, lead=(2,), k=45, n=300, w_signed=wsigned)
    _, w = operands(op, np.random.default_rng(wb))
    packed = fam.pack(w, op)
    np.testing.assert_array_equal(fam.unpack(packed, op), w)
    assert packed[0].dtype == np.uint8 and packed[1].dtype == np.int32
    lay = fam.layout(op)
    # one bit per weight and plane, up to the tile and group-pair padding
    assert packed[0].nbytes * 8 == wb * lay["NP"] * lay["GP"] * 8
    np.testing.assert_array_equal(packed[1][:300], 128 * w.sum(axis=0))  # off * sum(w): x' = x + 128
    assert not packed[1][300:].any()


def test_pack_rejects_out_of_range_weights():
    op = gemv(2, 8)
    with pytest.raises(ValueError, match="2-bit range"):
        AVX2_LUT.pack(np.full(op.w_shape, 2), op)


# ---- gating, instructions, choices -------------------------------------------------------------------
def test_feature_gating():
    op = gemv(2, 8, k=4096, n=4096)
    plain = tv.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"})
    assert AVX512_LUT.cost(op, HASWELL) is None and AVX2_LUT.cost(op, HASWELL) is not None
    assert AVX512_LUT.cost(op, ICELAKE) is not None and AVX2_LUT.cost(op, ICELAKE) is not None
    assert NEON_LUT.cost(op, NEON) is not None
    for fam in (AVX512_LUT, AVX2_LUT):
        assert fam.cost(op, NEON) is None and fam.cost(op, plain) is None
        with pytest.raises(ValueError):
            fam.primfunc(op, plain)
    assert NEON_LUT.cost(op, HASWELL) is None
    for fam in (AVX512_LUT, AVX2_LUT, NEON_LUT):
        t = NEON if fam is NEON_LUT else ICELAKE
        assert fam.cost(gemv(5, 8), t) is None  # 5+ bits: the dot families
        assert fam.cost(gemv(2, 8, k=MAX_REDUCTION + 8, n=16), t) is None  # int32 bound
        assert fam.cost(gemv(2, 8, lead=(65,)), t) is None  # large M: tables outgrow L2
        assert fam.cost(make_op("conv2d", 2, 8), t) is None  # matmuls only
        with pytest.raises(ValueError, match="matmuls only"):
            fam.primfunc(make_op("conv2d", 2, 8))


def asm_of(fam, op, target):
    assert fam.cost(op, target) is not None
    return tvm.compile(fam.primfunc(op, target), target=target).mod.inspect_source("asm")


def count(asm, pattern):
    return len(re.findall(rf"^\s+{pattern}", asm, flags=re.M))


@pytest.mark.parametrize("wb,ab", [(1, 8), (2, 8), (3, 4)])
def test_crossbuild_avx512_vpshufb_zmm(wb, ab):
    asm = asm_of(AVX512_LUT, gemv(wb, ab, k=256, n=256), ICELAKE)
    assert count(asm, r"vpshufb\s+%zmm") > 0
    if wb >= 2:  # plane pairs weighed (1, 2)
        assert count(asm, r"vpmaddubsw\s+%zmm") > 0


@pytest.mark.parametrize("wb,ab", [(1, 8), (2, 8), (4, 5)])
def test_crossbuild_haswell_avx2_only(wb, ab):
    asm = asm_of(AVX2_LUT, gemv(wb, ab, k=256, n=256), HASWELL)
    assert count(asm, r"vpshufb\s+%ymm") > 0
    assert "zmm" not in asm


@pytest.mark.parametrize("wb,ab", [(1, 8), (2, 8), (4, 4)])
def test_crossbuild_neon_tbl(wb, ab):
    asm = asm_of(NEON_LUT, gemv(wb, ab, k=256, n=256), NEON)
    assert count(asm, r"tbl\s+v\d+\.16b") > 0


def _big(wb, ab, m=1):
    return gemv(wb, ab, lead=(m,), k=4096, n=4096)


def test_cost_picks_lut_where_it_measured_fastest():
    """The cost rule's choices for the 4096 x 4096 matmul (calibration in lut.py):
    on an AVX-512 VNNI host the LUT wins only 1-bit weights against 3-6-bit
    activations (the VNNI low-bit kernel does 64 MACs per instruction); on
    AVX2-only targets it wins 1- and 2-bit weights, and 3-bit and wider stay with
    the packed low-bit kernel; 1-bit x 1-bit stays bit-serial everywhere."""
    for target in (ZNVER5, ICELAKE):
        assert registry.select(_big(1, 4), target).name == "x86-avx512-lut"
        assert registry.select(_big(1, 4, m=16), target).name == "x86-avx512-lut"
        for wb, ab, m in [(1, 8, 1), (2, 4, 1), (2, 8, 1), (3, 8, 1), (4, 8, 1)]:
            assert registry.select(_big(wb, ab, m), target).name == "x86-avx512-lowbit", (wb, ab, m)
        # 16 rows: compute-bound, low-bit and VNNI measured within noise of each other (either
        # faster by up to 1.5x between runs on a shared machine); never the LUT
        assert registry.select(_big(2, 8, 16), target).name in ("x86-avx512-lowbit", "x86-avx512-vnni")
        assert registry.select(_big(1, 1), target).name == "cpu-bitserial"
        assert registry.select(_big(8, 8), target).name == "x86-avx512-vnni"
    for wb, ab, m in [(1, 4, 1), (1, 8, 1), (2, 4, 1), (2, 8, 1), (1, 4, 16)]:
        assert registry.select(_big(wb, ab, m), HASWELL).name == "x86-avx2-lut", (wb, ab, m)
    for wb, ab in [(3, 8), (4, 4), (4, 8)]:
        assert registry.select(_big(wb, ab), HASWELL).name == "x86-avx2-lowbit", (wb, ab)
    assert registry.select(_big(1, 1), HASWELL).name == "cpu-bitserial"
    # the cost grows with the planes and with the high-byte table, and never undercuts
    # the stream of its own packed weights
    costs = [AVX2_LUT.cost(_big(wb, 8), HASWELL) for wb in (1, 2, 3, 4)]
    assert costs == sorted(costs) and AVX2_LUT.cost(_big(2, 6), HASWELL) < costs[1]
    op = _big(1, 4)
    assert AVX512_LUT.cost(op, ZNVER5) >= AVX512_LUT.packed_weight_bytes(op) / AVX512_LUT.rates["bytes"]
