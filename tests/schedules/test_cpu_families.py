"""Exactness of the CPU kernel families against ``qop.reference``.

Each case compiles the family's PrimFunc, runs it on this machine and compares
bit-exactly with the int64 NumPy reference, with operands pushed to the extremes
of their bit widths (that is where int16 sums would saturate). Families whose
instructions this host lacks are skipped here; test_cpu_crossbuild.py still
builds them for their own targets.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.qop import QOp, reference, weight_range  # noqa: E402
from soniq_tvm.schedules import registry  # noqa: E402
from soniq_tvm.schedules.cpu import _isa  # noqa: E402
from soniq_tvm.schedules.cpu.int8dot import AVX2_DOT, sum16_limit  # noqa: E402

HOST = _isa.host_features()
AVX2 = tv.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})
HOST_T = tv.Target({"kind": "llvm", "mcpu": tv.host_cpu(), "num-cores": 2})
needs_avx2 = pytest.mark.skipif("avx2" not in HOST,
        reason="host has no AVX2; cross-built in test_every_family_cross_builds")
needs_vnni = pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vnni"} <= HOST,
        reason="host has no AVX512-VNNI; cross-built in test_every_family_cross_builds")


def make_op(kind, wb, ab, a_signed=True, w_signed=True, **kw):
    if kind == "conv2d":
        x_shape, w_shape = kw.pop("x", (1, 5, 7, 7)), kw.pop("w", (6, 5, 3, 3))
        nin = x_shape[1]
    else:
        x_shape, w_shape = kw.pop("x", (2, 3, 13)), kw.pop("w", (13, 10))
        nin = w_shape[0]
    return QOp(kind, "t", x_shape, w_shape, (wb,) * nin, (ab,) * nin, w_signed=w_signed, a_signed=a_signed,
               a_dtype="int8" if a_signed else "uint8", **kw)


def operands(op, rng, worst=False):
    lo, hi = weight_range(op.w_bit, op.w_signed)
    w = rng.integers(lo, hi + 1, op.w_shape)
    if op.bipolar:
        w = np.where(w >= 0, 1, -1)
    alo, ahi = (-(1 << (op.a_bit - 1)), (1 << (op.a_bit - 1)) - 1) if op.a_signed else (0, (1 << op.a_bit) - 1)
    x = rng.integers(alo, ahi + 1, op.x_shape)
    if worst:  # every product at the most negative extreme: the int16 bound is tight
        x[...] = alo if abs(alo) > abs(ahi) else ahi
        w[...] = lo
    else:
        x.flat[::5], x.flat[1::5], w.flat[::3], w.flat[1::7] = alo, ahi, lo, hi
    return x.astype(op.a_dtype), w


def check(family_name, op, target, seed=0, worst=False):
    fam = registry.get(family_name)
    assert fam.cost(op, target) is not None, f"{family_name} refused {op}"
    x, w = operands(op, np.random.default_rng(seed), worst)
    packed = fam.pack(w, op)
    func = fam.primfunc(op, target)
    assert registry.get(family_name).name in str(func.attrs["soniq.qop"])
    lib = tvm.compile(func, target=target)
    out = tvm.runtime.empty(op.out_shape, "int32")
    lib["main"](tv.tensor(x), *[tv.tensor(p) for p in packed], out)
    expect = reference(x, w, op)
    np.testing.assert_array_equal(out.numpy(), expect)
    np.testing.assert_array_equal(fam.reference(x, packed, op), expect)


BITS = range(1, 9)
CONV_CASES = [  # (id, conv kwargs): awkward channel counts, strides, padding, dilation, groups, big kernels
    ("3x3-pad", dict(padding=(1, 1, 1, 1))),
    ("3x3-s2-asym", dict(strides=(2, 1), padding=(1, 1, 1, 0))),
    ("dilated", dict(dilation=(2, 1), padding=(2, 1, 2, 1))),
    ("1x1-c19-o17", dict(x=(2, 19, 5, 6), w=(17, 19, 1, 1))),
    ("7x7-s2", dict(x=(1, 3, 17, 15), w=(9, 3, 7, 7), strides=(2, 2), padding=(3, 3, 3, 3))),
    ("groups2", dict(x=(1, 16, 9, 9), w=(16, 8, 3, 3), groups=2, padding=(1, 1, 1, 1))),
    ("c70-o40", dict(x=(1, 70, 4, 5), w=(40, 70, 3, 3), padding=(0, 1, 2, 1))),
    ("narrow-w1", dict(x=(1, 8, 6, 1), w=(8, 8, 3, 1), padding=(1, 0, 1, 0))),
]
MATMUL_CASES = [
    ("gemv", dict(x=(1, 77), w=(77, 33))),
    ("gemm-lead", dict(x=(2, 3, 13), w=(13, 10))),
    ("gemm-wide", dict(x=(9, 300), w=(300, 24))),
]


# ---- x86 AVX2 int8-dot ---------------------------------------------------------------------
@needs_avx2
@pytest.mark.parametrize("wb,ab", list(itertools.product(BITS, BITS)))
def test_avx2_dot_matmul_grid(wb, ab):
    check("x86-avx2-dot", make_op("matmul", wb, ab, x=(3, 45), w=(45, 19)), AVX2)


@needs_avx2
@pytest.mark.parametrize("wb,ab", [(1, 1), (2, 8), (4, 4), (7, 8), (8, 7), (8, 8), (3, 5)])
def test_avx2_dot_unsigned_activations(wb, ab):
    check("x86-avx2-dot", make_op("matmul", wb, ab, a_signed=False, x=(3, 45), w=(45, 19)), AVX2)


@needs_avx2
@pytest.mark.parametrize("name,kw", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("wb,ab", [(2, 3), (8, 8), (4, 8)])
def test_avx2_dot_conv(name, kw, wb, ab):
    check("x86-avx2-dot", make_op("conv2d", wb, ab, **dict(kw)), AVX2)


@needs_avx2
@pytest.mark.parametrize("name,kw", MATMUL_CASES, ids=[c[0] for c in MATMUL_CASES])
def test_avx2_dot_matmul_shapes(name, kw):
    check("x86-avx2-dot", make_op("matmul", 3, 6, **dict(kw)), AVX2)


@needs_avx2
@pytest.mark.parametrize("wb,ab", [(8, 7), (7, 8), (4, 8), (2, 8), (4, 4), (1, 8)])
def test_avx2_dot_int16_bound_is_tight(wb, ab):
    """All products at the extreme, 16-bit chunk at its proven maximum: still exact."""
    op = make_op("matmul", wb, ab, x=(2, 4 * 64), w=(4 * 64, 8))
    mode = AVX2_DOT.mode(op)
    if mode.name == "avx2-sum16":
        op = op.with_(knobs={"tc": min(sum16_limit(op), 64)})
    check("x86-avx2-dot", op, AVX2, worst=True)


def test_sum16_limit_is_the_int16_bound():
    for wb, ab in itertools.product(BITS, BITS):
        op = make_op("matmul", wb, ab)
        t = sum16_limit(op)
        lo, hi = weight_range(wb, True)
        amax = (1 << ab) - 1
        assert 2 * t * amax * max(hi, 0) <= 32767 and 2 * t * amax * -lo <= 32768
        assert 2 * (t + 1) * amax * max(hi, -lo) > 32767


def test_mode_choice():
    assert AVX2_DOT.mode(make_op("matmul", 8, 8)).name == "avx2-wide"
    assert AVX2_DOT.mode(make_op("matmul", 7, 8)).name == "avx2-madd"
    assert AVX2_DOT.mode(make_op("matmul", 4, 4)).name == "avx2-sum16"


# ---- AVX-512 VNNI (runs only where the host has it) -------------------------------------------
@needs_vnni
@pytest.mark.parametrize("wb,ab,signed", [(8, 8, True), (8, 8, False), (1, 1, True), (3, 7, False), (5, 2, True)])
def test_vnni_matmul(wb, ab, signed):
    check("x86-avx512-vnni", make_op("matmul", wb, ab, a_signed=signed, x=(3, 45), w=(45, 37)), HOST_T)


@needs_vnni
@pytest.mark.parametrize("name,kw", CONV_CASES[:6], ids=[c[0] for c in CONV_CASES[:6]])
def test_vnni_conv(name, kw):
    check("x86-avx512-vnni", make_op("conv2d", 8, 8, **dict(kw)), HOST_T)


# ---- bit-serial ------------------------------------------------------------------------------
@needs_avx2
@pytest.mark.parametrize("wb,ab", list(itertools.product(range(1, 5), range(1, 5))))
def test_bitserial_matmul_grid(wb, ab):
    signed = (wb + ab) % 2 == 0
    check("cpu-bitserial", make_op("matmul", wb, ab, a_signed=signed, x=(3, 70), w=(70, 19)), AVX2)


@needs_avx2
@pytest.mark.parametrize("name,kw", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("wb,ab,signed", [(1, 1, True), (2, 2, False)])
def test_bitserial_conv(name, kw, wb, ab, signed):
    check("cpu-bitserial", make_op("conv2d", wb, ab, a_signed=signed, **dict(kw)), AVX2)


needs_vpopcntdq = pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vpopcntdq"} <= HOST,
                                     reason="host has no AVX512-VPOPCNTDQ; cross-built in test_every_family_cross_builds")


@needs_vpopcntdq
@pytest.mark.parametrize("name,kw", CONV_CASES + [("wide-c70", dict(x=(1, 70, 3, 30), w=(24, 70, 3, 3),
                                                                     padding=(1, 1, 1, 1)))],
                         ids=[c[0] for c in CONV_CASES] + ["wide-c70"])
@pytest.mark.parametrize("wb,ab,signed", [(1, 1, True), (2, 3, False)])
def test_bitserial_zmm_target_knobs_exact(name, kw, wb, ab, signed):
    """The knobs the pack phase sets on a VPOPCNTDQ target (512-bit vectors, small
    tiles) compute exactly what the reference does."""
    fam = registry.get("cpu-bitserial")
    op = make_op("conv2d", wb, ab, a_signed=signed, **dict(kw))
    knobs = fam.target_knobs(op, HOST_T)
    if knobs.get("lanes") == "px":
        assert knobs == {"lanes": "px", "C": 8}
    else:
        assert knobs["vl"] == 8 and knobs["R"] <= 4 and knobs["J"] in (1, 2)
    check("cpu-bitserial", op.with_(knobs=knobs), HOST_T)


PX_CASES = [  # stride-1 convs at least 8 wide: pixel lanes apply
    ("3x3-pad-w11", dict(x=(1, 13, 9, 11), w=(19, 13, 3, 3), padding=(1, 1, 1, 1))),
    ("batch2-c70-w16", dict(x=(2, 70, 5, 16), w=(9, 70, 3, 3))),
    ("1x1-c130", dict(x=(1, 130, 3, 9), w=(5, 130, 1, 1))),
    ("dilated-asym", dict(x=(1, 8, 9, 12), w=(12, 8, 3, 3), dilation=(2, 1), padding=(2, 1, 1, 0))),
    ("groups2", dict(x=(1, 16, 9, 9), w=(16, 8, 3, 3), groups=2, padding=(1, 1, 1, 1))),
    ("strided-rows", dict(x=(1, 6, 11, 10), w=(7, 6, 3, 3), strides=(2, 1), padding=(1, 1, 1, 1))),
]


@needs_avx2
@pytest.mark.parametrize("name,kw", PX_CASES, ids=[c[0] for c in PX_CASES])
@pytest.mark.parametrize("wb,ab,signed,c", [(1, 1, True, 8), (2, 2, False, 8), (1, 2, False, 5), (3, 4, True, 12)])
def test_bitserial_pixel_lanes_exact(name, kw, wb, ab, signed, c):
    """Pixel lanes (8 output pixels per vector, C channels per task, a channel
    tail when C does not divide them) against the reference, worst-case codes too;
    built for AVX2 (the nibble-table popcount) so that it runs on any CI machine."""
    op = make_op("conv2d", wb, ab, a_signed=signed, **dict(kw)).with_(knobs={"lanes": "px", "C": c})
    assert registry.get("cpu-bitserial").knobs(op) == {"lanes": "px", "C": c, "R": 8, "J": 1}
    check("cpu-bitserial", op, AVX2)
    check("cpu-bitserial", op, AVX2, seed=1, worst=True)


@pytest.mark.parametrize("kw,why", [
    (dict(x=(1, 8, 9, 7), w=(4, 8, 3, 3), padding=(1, 1, 1, 1)), "at least 8 wide"),
    (dict(x=(1, 8, 9, 20), w=(4, 8, 3, 3), strides=(1, 2)), "stride-1"),
])
def test_bitserial_pixel_lanes_refused_where_they_cannot_run(kw, why):
    fam = registry.get("cpu-bitserial")
    op = make_op("conv2d", 1, 1, **kw).with_(knobs={"lanes": "px", "C": 8})
    with pytest.raises(ValueError, match=why):
        fam.knobs(op)
    assert fam.target_knobs(op.with_(knobs={}), tv.Target({"kind": "llvm", "mcpu": "icelake-server"}))["vl"] == 8
    with pytest.raises(ValueError, match="C=16"):
        fam.knobs(make_op("conv2d", 1, 1, x=(1, 8, 9, 9), w=(4, 8, 3, 3)).with_(knobs={"lanes": "px", "C": 16}))


def test_bitserial_target_knobs_only_with_vpopcntdq():
    fam = registry.get("cpu-bitserial")
    op = make_op("conv2d", 1, 1, x=(1, 64, 28, 28), w=(64, 64, 3, 3), padding=(1, 1, 1, 1))
    assert fam.target_knobs(op, AVX2) == {}
    icelake = tv.Target({"kind": "llvm", "mcpu": "icelake-server"})
    assert fam.target_knobs(op, icelake) == {"lanes": "px", "C": 8}
    strided = make_op("conv2d", 1, 1, x=(1, 64, 56, 56), w=(64, 64, 3, 3), strides=(2, 2), padding=(1, 1, 1, 1))
    assert fam.target_knobs(strided, icelake) == {"vl": 8, "R": 4, "J": 2}
    narrow = make_op("conv2d", 1, 1, x=(1, 64, 7, 7), w=(64, 64, 3, 3), padding=(1, 1, 1, 1))
    assert fam.target_knobs(narrow, icelake) == {"vl": 8, "R": 4, "J": 1}
    gemv = make_op("matmul", 1, 1, x=(1, 256), w=(256, 24))
    assert fam.target_knobs(gemv, icelake) == {"vl": 8, "R": 1, "J": 1}


def test_with_target_knobs_fills_only_an_untuned_op():
    """The pack phase and the tuner share one rule: an op without knobs gets the
    target's; a tuned setting (here channel lanes at 256 bits) is kept whole, not
    merged with the target's pixel lanes."""
    fam = registry.get("cpu-bitserial")
    icelake = tv.Target({"kind": "llvm", "mcpu": "icelake-server"})
    op = make_op("conv2d", 1, 1, x=(1, 64, 28, 28), w=(64, 64, 3, 3), padding=(1, 1, 1, 1))
    assert registry.with_target_knobs(fam, op, icelake).knobs == {"lanes": "px", "C": 8}
    assert registry.with_target_knobs(fam, op, AVX2).knobs == {}
    tuned = op.with_(knobs={"vl": 4, "R": 4, "J": 2})
    assert registry.with_target_knobs(fam, tuned, icelake).knobs == {"vl": 4, "R": 4, "J": 2}
    assert fam.knobs(registry.with_target_knobs(fam, tuned, icelake)) == {"vl": 4, "R": 4, "J": 2}


@needs_avx2
def test_bitserial_unsigned_weights_and_multiword():
    check("cpu-bitserial", make_op("conv2d", 2, 3, w_signed=False, x=(1, 130, 4, 4), w=(5, 130, 3, 3),
                                   padding=(1, 1, 1, 1)), AVX2)


# ---- packing, selection, knobs ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["x86-avx2-dot", "x86-avx512-vnni", "arm-neon-sdot", "cpu-bitserial"])
@pytest.mark.parametrize("kind,wb,ab", [("conv2d", 1, 1), ("conv2d", 8, 8), ("matmul", 3, 5), ("matmul", 1, 2)])
def test_pack_roundtrip(family, kind, wb, ab):
    op = make_op(kind, wb, ab, **({"x": (1, 70, 5, 5), "w": (12, 35, 3, 3), "groups": 2} if kind == "conv2d" else {}))
    fam = registry.get(family)
    _, w = operands(op, np.random.default_rng(1))
    np.testing.assert_array_equal(fam.unpack(fam.pack(w, op), op), w)


@pytest.mark.parametrize("family", ["x86-avx2-dot", "x86-avx512-vnni", "cpu-bitserial"])
def test_knob_space_values_are_valid(family):
    fam = registry.get(family)
    op = make_op("conv2d", 2, 4, x=(1, 24, 10, 10), w=(40, 24, 3, 3), padding=(1, 1, 1, 1))
    space = fam.knob_space(op, AVX2)
    assert space["R"] and space["J"]
    for r, j in itertools.product(space["R"][:3], space["J"][:2]):
        try:
            knobs = fam.knobs(op.with_(knobs={"R": r, "J": j}))
        except ValueError:
            continue  # some (R, J) pairs exceed the register tile; each value alone is valid
        assert knobs["R"] == r and knobs["J"] == j


def test_cost_gates_on_target_features():
    op = make_op("matmul", 8, 8)
    plain = tv.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"})
    arm = tv.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
    assert registry.get("x86-avx2-dot").cost(op, plain) is None  # would abort LLVM
    assert registry.get("x86-avx512-vnni").cost(op, AVX2) is None
    assert registry.get("arm-neon-sdot").cost(op, AVX2) is None
    assert registry.get("x86-avx2-dot").cost(op, arm) is None
    assert registry.get("arm-neon-sdot").cost(op, arm) is not None
    depthwise = make_op("conv2d", 4, 4, x=(1, 8, 6, 6), w=(8, 1, 3, 3), groups=8)
    assert registry.get("x86-avx2-dot").cost(depthwise, AVX2) is None


def test_select_prefers_the_right_family():
    conv = dict(x=(1, 64, 56, 56), w=(64, 64, 3, 3), padding=(1, 1, 1, 1))
    # 1-bit codes: bit-serial and Winograd tie (cost within 2 %, measured 673 against 694 us)
    assert registry.select(make_op("conv2d", 1, 1, **conv), AVX2).name in ("cpu-bitserial", "x86-avx2-winograd")
    # narrow codes, 3x3 stride 1: integer Winograd (1.25x at 56x56, 1.6x at 14x14, haswell build)
    assert registry.select(make_op("conv2d", 2, 2, **conv), AVX2).name == "x86-avx2-winograd"
    small = dict(x=(1, 192, 14, 14), w=(256, 192, 3, 3), padding=(1, 1, 1, 1))
    assert registry.select(make_op("conv2d", 2, 2, **small), AVX2).name == "x86-avx2-winograd"
    assert registry.select(make_op("conv2d", 2, 2, strides=(2, 2), **small), AVX2).name == "x86-avx2-dot"
    assert registry.select(make_op("conv2d", 8, 8, **conv), AVX2).name == "x86-avx2-dot"
    icelake = tv.Target({"kind": "llvm", "mcpu": "icelake-server"})
    assert registry.select(make_op("conv2d", 8, 8, **conv), icelake).name == "x86-avx512-vnni"
    assert registry.select(make_op("conv2d", 1, 1, **conv), icelake).name == "cpu-bitserial"


def test_depthwise_refuses_a_single_output_column():
    """Found by tests/fuzz: a depthwise conv with one output column built a 1-lane
    vector and crashed TVM; the family now says "not applicable" and another runs it."""
    op = make_op("conv2d", 4, 4, x=(1, 7, 12, 4), w=(7, 1, 3, 3), groups=7, strides=(1, 2))
    assert op.out_shape[3] == 1
    assert registry.get("cpu-depthwise").cost(op, HOST_T) is None
    assert registry.select(op, HOST_T).name != "cpu-depthwise"
    wide = make_op("conv2d", 4, 4, x=(1, 7, 12, 6), w=(7, 1, 3, 3), groups=7, strides=(1, 2))
    assert registry.get("cpu-depthwise").cost(wide, HOST_T) is not None
