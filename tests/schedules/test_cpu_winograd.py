"""Integer Winograd F(2x2, 3x3): the bounds, the numpy twin, the kernel bit for bit.

The kernel is checked against ``qop.reference`` (direct convolution, int64) on
awkward shapes (odd output sizes, asymmetric padding, channel counts that fill no
word or vector, one tile wide, batches) and on every width pair the family takes,
with codes at both ends of their range; on VNNI where the host has it, and as an
AVX2 (``haswell``) build everywhere.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.qop import QOp, reference, weight_range  # noqa: E402
from soniq_tvm.schedules import registry  # noqa: E402
from soniq_tvm.schedules.cpu.int8dot import MODES  # noqa: E402
from soniq_tvm.schedules.cpu.winograd import (  # noqa: E402
    AVX2_WINOGRAD, AVX512_WINOGRAD, bounds, exact_for, transform_weights, untransform_weights, winograd_reference)

from test_cpu_families import HOST, HOST_T, needs_avx2, needs_vnni  # noqa: E402

HASWELL = tv.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
VNNI_CROSS = tv.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})


def conv(x=(1, 8, 6, 6), o=16, ab=2, wb=2, a_signed=False, zero=0, padding=(1, 1, 1, 1), w_signed=True, **kw):
    c = x[1]
    return QOp("conv2d", "t", x, (o, c, 3, 3), (wb,) * c, (ab,) * c, a_signed=a_signed, w_signed=w_signed,
               a_dtype="int8" if a_signed else "uint8", a_zero=zero, padding=padding, **kw)


def operands(op, rng, extreme=None):
    """Codes and weights, a fifth of each at the ends of their ranges; ``extreme``:
    every code at its low ("lo") or high ("hi") end, the weights at the opposite one."""
    alo, ahi = (-(1 << (op.a_bit - 1)), (1 << (op.a_bit - 1)) - 1) if op.a_signed else (0, (1 << op.a_bit) - 1)
    wlo, whi = weight_range(op.w_bit, op.w_signed)
    x = rng.integers(alo, ahi + 1, op.x_shape)
    w = rng.integers(wlo, whi + 1, op.w_shape)
    if op.w_signed and op.w_bit == 1:
        w = np.where(w >= 0, 1, -1)
    x.flat[::5], x.flat[1::5], w.flat[::3], w.flat[1::7] = alo, ahi, wlo, whi
    if extreme == "lo":
        x[...], w[...] = alo, whi
    elif extreme == "hi":
        x[...], w[...] = ahi, wlo
    return x.astype(op.a_dtype), w


def run(family, op, target, seed=0, extremes=(None,), corrupt=None):
    """``[(kernel output, reference)]``, one pair per operand set (one build)."""
    lib = tvm.compile(family.primfunc(op, target), target=target)
    results = []
    for extreme in extremes:
        x, w = operands(op, np.random.default_rng(seed), extreme)
        packed = family.pack(w, op)
        if corrupt is not None:
            packed = corrupt(packed)
        out = tvm.runtime.empty(op.out_shape, "int32")
        lib["main"](tv.tensor(x), *[tv.tensor(p) for p in packed], out)
        results.append((out.numpy(), reference(x, w, op)))
    return results


def check(family, op, target, **kw):
    for got, expect in run(family, op, target, **kw):
        np.testing.assert_array_equal(got, expect)


def accepted_pairs(family):
    pairs = []
    for ab, wb, a_signed in itertools.product(range(1, 9), range(1, 9), (False, True)):
        if family.refusal(conv(ab=ab, wb=wb, a_signed=a_signed)) is None:
            pairs.append((ab, wb, a_signed))
    return pairs


# ---- arithmetic --------------------------------------------------------------------------
def test_bounds_of_four_bit_codes():
    """The issue's figures: 4-bit unsigned codes transform into [-30, 60], signed 4-bit
    weights into at most 9 x 8 = 72 in magnitude."""
    b = bounds(conv(ab=4, wb=4))
    assert b["v"] == (-30, 60) and b["off"] == 30
    assert b["u"] == (-72, 67)
    assert b["pair"] == 2 * 90 * 72


def test_accepted_pairs_are_exactly_those_the_bounds_cover():
    pairs = accepted_pairs(AVX512_WINOGRAD)
    # every pair of <= 4-bit widths is taken, signed or not; nothing with 8-bit codes
    assert {(a, w, s) for a in range(1, 5) for w in range(1, 5) for s in (False, True)} <= set(pairs)
    assert not [p for p in pairs if p[0] >= 7 or p[1] >= 5]
    for ab, wb, a_signed in itertools.product(range(1, 9), range(1, 9), (False, True)):
        b = bounds(conv(ab=ab, wb=wb, a_signed=a_signed))
        fits = b["v"][1] - b["v"][0] <= 255 and -128 <= b["u"][0] and b["u"][1] <= 127
        assert ((ab, wb, a_signed) in pairs) == fits
    # AVX2 adds the vpmaddubsw pair bound
    tight = {(a, w, s) for a, w, s in pairs if bounds(conv(ab=a, wb=w, a_signed=s))["pair"] > 32767}
    assert set(accepted_pairs(AVX2_WINOGRAD)) == set(pairs) - tight
    assert (6, 4, True) in tight  # signed 6-bit codes: v spans 254, 2 x 254 x 72 > 2^15


def test_pair_bound_refuses_on_avx2_only():
    op = conv(ab=4, wb=4)
    wide = op.with_(a_bits=(5,) * 8)  # v spans 186: u8 holds it, and 2 x 186 x 72 < 2^15
    assert exact_for(wide, MODES["avx2-madd"]) is None
    signed6 = conv(ab=6, wb=4, a_signed=True)  # v spans 254: 2 x 254 x 72 > 2^15
    assert exact_for(signed6, MODES["avx512-vnni"]) is None
    assert "beyond int16" in exact_for(signed6, MODES["avx2-madd"])
    unsigned_w = op.with_(w_signed=False, w_bits=(3,) * 8)  # u spans 9 x 7 = 63
    assert exact_for(unsigned_w, MODES["avx512-vnni"]) is None
    assert "beyond s8" in exact_for(op.with_(w_bits=(5,) * 8), MODES["avx512-vnni"])
    assert "wider than u8" in exact_for(op.with_(a_bits=(6,) * 8), MODES["avx512-vnni"])


@pytest.mark.parametrize("ab,wb,a_signed", accepted_pairs(AVX512_WINOGRAD))
def test_numpy_twin_is_the_convolution(ab, wb, a_signed):
    """The transforms, the 16 products and the shift by 2 give the direct convolution,
    including codes and weights all at their range ends."""
    rng = np.random.default_rng(ab * 10 + wb)
    for shape, pad, extreme in [((2, 5, 7, 9), (1, 0, 2, 1), None), ((1, 3, 4, 4), (1, 1, 1, 1), "lo"),
                                ((1, 3, 5, 6), (0, 0, 0, 0), "hi")]:
        op = conv(x=shape, o=6, ab=ab, wb=wb, a_signed=a_signed, padding=pad)
        x, w = operands(op, rng, extreme)
        np.testing.assert_array_equal(winograd_reference(x, w, op), reference(x, w, op))


def test_weight_transform_round_trips():
    w = np.random.default_rng(0).integers(-8, 8, (5, 7, 3, 3))
    u = transform_weights(w)
    assert u.shape == (5, 7, 16) and np.abs(u).max() <= 72
    np.testing.assert_array_equal(untransform_weights(u), w)
    with pytest.raises(ValueError):
        untransform_weights(u + 1)


def test_refusals_name_the_reason():
    f = AVX512_WINOGRAD
    assert "3x3 stride-1" in f.refusal(conv(strides=(2, 2)))
    assert "3x3 stride-1" in f.refusal(conv(dilation=(2, 2), padding=(2, 2, 2, 2)))
    assert "3x3 stride-1" in f.refusal(conv(x=(1, 8, 6, 6), groups=2).with_(w_shape=(16, 4, 3, 3)))
    assert "uniform" in f.refusal(conv().with_(a_bits=(2,) * 7 + (8,)))
    assert "lacks" in f.refusal(conv(), HASWELL)
    assert f.cost(conv(ab=8, wb=8), HOST_T) is None
    matmul = QOp("matmul", "t", (4, 8), (8, 8), (2,) * 8, (2,) * 8)
    assert f.refusal(matmul) is not None


# ---- the kernel -------------------------------------------------------------------------------
SHAPES = [  # (id, conv kwargs)
    ("odd-out-asym-pad", dict(x=(2, 19, 7, 9), o=21, padding=(1, 0, 2, 1))),
    ("no-pad", dict(x=(1, 8, 9, 10), o=16, padding=(0, 0, 0, 0))),
    ("one-tile-wide", dict(x=(1, 5, 8, 3), o=3, padding=(1, 0, 1, 0))),
    ("c3-o40", dict(x=(1, 3, 12, 12), o=40)),
    ("resnet-7x7", dict(x=(1, 64, 7, 7), o=32)),
    ("wide-row", dict(x=(1, 12, 4, 70), o=17)),
    # found by tests/fuzz: one input column in the plane built a 1-lane vector store
    ("one-column", dict(x=(1, 6, 5, 1), o=8, padding=(1, 1, 1, 1))),
]


@needs_vnni
@pytest.mark.parametrize("name,kw", SHAPES, ids=[s[0] for s in SHAPES])
def test_vnni_shapes(name, kw):
    check(AVX512_WINOGRAD, conv(ab=4, wb=4, **kw), HOST_T)


@needs_avx2
@pytest.mark.parametrize("name,kw", SHAPES, ids=[s[0] for s in SHAPES])
def test_avx2_shapes(name, kw):
    check(AVX2_WINOGRAD, conv(ab=3, wb=4, a_signed=True, **kw), HASWELL)


@pytest.mark.parametrize("ab,wb,a_signed", [p for p in accepted_pairs(AVX512_WINOGRAD) if p[0] in (1, 2, 4, 5)
                                            and p[1] in (1, 2, 4)])
def test_width_pairs_at_range_ends(ab, wb, a_signed):
    """Mixed codes, then every code at its low end against the highest weight, and the
    reverse: the transformed operands at the ends of u8 / s8."""
    op = conv(x=(1, 9, 5, 6), o=18, ab=ab, wb=wb, a_signed=a_signed, padding=(1, 1, 0, 1))
    extremes = (None, "lo", "hi")
    if {"avx512f", "avx512bw", "avx512vnni"} <= HOST:
        check(AVX512_WINOGRAD, op, HOST_T, extremes=extremes)
    if "avx2" in HOST and AVX2_WINOGRAD.accepts(op, HASWELL):
        check(AVX2_WINOGRAD, op, HASWELL, extremes=extremes)


@pytest.mark.skipif("avx2" not in HOST, reason="host has no AVX2; cross-built in test_every_family_cross_builds")
@pytest.mark.parametrize("zero", [1, 15])
def test_zero_points(zero):
    """Padding holds the zero point: ``x - z`` is zero there."""
    op = conv(x=(1, 6, 6, 7), o=8, ab=4, wb=3, zero=zero, padding=(1, 2, 1, 0))
    fam, tgt = (AVX512_WINOGRAD, HOST_T) if {"avx512f", "avx512bw", "avx512vnni"} <= HOST else (AVX2_WINOGRAD,
                                                                                                HASWELL)
    check(fam, op, tgt)


@needs_vnni
@pytest.mark.parametrize("knobs", [{"R": 1, "J": 1}, {"R": 5, "J": 2}, {"R": 12, "J": 1}, {"R": 3, "J": 4},
                                   {"R": 7, "J": 2}])
def test_vnni_tiles(knobs):
    check(AVX512_WINOGRAD, conv(x=(1, 16, 10, 11), o=64, ab=2, wb=2).with_(knobs=knobs), HOST_T)


@needs_vnni
def test_micro_tiles_across_tasks():
    """Tasks of a few rows of tiles each; micro-tiles of 7 tiles do not divide a task's
    tiles, so some reach into the next task (those tiles are not kept) and the image's
    last one moves back into its neighbour's."""
    op = conv(x=(1, 16, 30, 29), o=32, ab=2, wb=2)
    lay = AVX512_WINOGRAD.layout(op)
    assert lay["rt"] < lay["ty"] and lay["tpt"] % 7 and lay["tiles"] % lay["tpt"]
    check(AVX512_WINOGRAD, op.with_(knobs={"R": 7, "J": 2}), HOST_T)


def test_knobs_outside_the_space_are_refused():
    op = conv(x=(1, 16, 10, 11), o=32)
    with pytest.raises(ValueError, match="invalid"):
        AVX512_WINOGRAD.knobs(op.with_(knobs={"R": 31}))  # a task holds all 5 rows of 6 tiles
    with pytest.raises(ValueError, match="1 KiB"):
        AVX512_WINOGRAD.knobs(conv(x=(1, 16, 40, 40), o=32).with_(knobs={"R": 16, "J": 2}))
    space = AVX512_WINOGRAD.knob_space(op)
    assert space["J"] == [1, 2] and max(space["R"]) <= 30


@needs_avx2
def test_a_broken_correction_is_caught():
    """The shift's correction is what makes the u8 operand exact: off by one in one
    output channel, the kernel is wrong there (the comparison can fail)."""
    op = conv(x=(1, 8, 6, 6), o=8, ab=2, wb=2)

    def corrupt(packed):
        corr = packed[1].copy()
        corr[0, 3] += 4
        return [packed[0], corr]

    [(got, expect)] = run(AVX2_WINOGRAD, op, HASWELL, corrupt=corrupt)
    bad = np.argwhere(got != expect)
    assert len(bad) and set(bad[:, 1]) == {3}


def test_vnni_cross_build_compiles():
    """Built for an AVX-512 VNNI CPU on any host (run only where the host has it)."""
    op = conv(x=(1, 16, 8, 8), o=32)
    lib = tvm.compile(AVX512_WINOGRAD.primfunc(op, VNNI_CROSS), target=VNNI_CROSS)
    assert "vpdpbusd" in lib.mod.inspect_source("asm")


def test_cost_prefers_winograd_where_it_pays():
    """The cost model ranks as measured (benchmarks.kernels --sections winograd, 2 threads):
    Winograd on ResNet-18's 2-bit groups at every size, on VNNI (1.07-1.35x) and on
    AVX2 (1.25-1.73x); 8-bit codes stay on int8-dot (no exact bound)."""
    big, mid = conv(x=(1, 48, 56, 56), o=64), conv(x=(1, 192, 14, 14), o=256)
    assert registry.select(big, VNNI_CROSS).name == "x86-avx512-winograd"
    assert registry.select(mid, VNNI_CROSS).name == "x86-avx512-winograd"
    assert registry.select(conv(x=(1, 96, 28, 28), o=128), VNNI_CROSS).name == "x86-avx512-winograd"
    assert registry.select(big, HASWELL).name == "x86-avx2-winograd"
    assert registry.select(mid, HASWELL).name == "x86-avx2-winograd"
    assert registry.select(conv(x=(1, 96, 28, 28), o=128), HASWELL).name == "x86-avx2-winograd"
    wide = mid.with_(a_bits=(8,) * 192, w_bits=(8,) * 192)
    assert AVX2_WINOGRAD.cost(wide, HASWELL) is None and registry.select(wide, HASWELL).name == "x86-avx2-dot"
