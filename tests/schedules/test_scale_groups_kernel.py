"""The scale-group kernels (``schedules/cpu/groups.py``) and their pass (phase 10).

A matmul or conv whose input channels carry several steps runs one int8-dot reduction
per group and sums ``float(acc_g) * (s_g * sw)`` in group order. Checked bit for bit
against numpy doing the same float operations (two roundings per term), with the
groups' channels gathered from anywhere in the input (one constant byte shuffle per
row up to 512 channels, element-wise beyond), zero points, output tails and leading
dimensions; then through the compiler: verify's check of the fused kernel, the plan,
and the module against the unfused one.
"""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.qop import QOp, reference  # noqa: E402
from soniq_tvm.schedules import registry  # noqa: E402
from soniq_tvm.schedules.cpu.groups import SHUFFLE_MAX, scale_group_conv, scale_group_matmul  # noqa: E402

from test_cpu_families import HOST, HOST_T, needs_avx2, needs_vnni  # noqa: E402

HASWELL = tv.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})


def groups_case(family_name, target, lead=(1, 16), ks=(32, 20), bits=((8, 8), (2, 2)), n=40, zeros=(0, 3),
                channels=None, seed=0, knobs=None):
    """``(parts, x, columns, numpy result)``: group ``g`` reads ``ks[g]`` channels of ``x``
    (``channels`` of them in all, in a random order), weights and step factors random."""
    rng = np.random.default_rng(seed)
    fam = registry.get(family_name)
    k = sum(ks)
    channels = channels or k
    columns = rng.permutation(channels)[:k]
    x = rng.integers(-128, 128, lead + (channels,))
    parts, total, col = [], None, 0
    for g, (kg, (wb, ab), z) in enumerate(zip(ks, bits, zeros)):
        cols = columns[col:col + kg]
        lo, hi = -(1 << (ab - 1)), (1 << (ab - 1)) - 1
        x[..., cols] = rng.integers(lo, hi + 1, lead + (kg,))
        x[..., cols[:2]] = [lo, hi]
        op = QOp("matmul", "L", lead + (kg,), (kg, n), (wb,) * kg, (ab,) * kg, a_zero=z, group=g)
        op = registry.with_target_knobs(fam, op, target).with_(family=fam.name)
        op = op.with_(knobs=knobs or fam.knobs(op))
        w = rng.integers(-(1 << (wb - 1)), 1 << (wb - 1), (kg, n))
        if wb == 1:  # signed 1-bit is bipolar: -1 or +1, never 0
            w = np.where(w < 0, -1, 1)
        packed = fam.pack(w, op)
        factor = (rng.random(n) * 10.0 ** (3 * g - 2)).astype(np.float32)  # steps 1000x apart
        parts.append((op, packed[0], packed[1], factor))
        acc = reference(x[..., cols].astype(np.int8), w, op)
        term = acc.astype(np.float32) * factor
        total = term if total is None else total + term
        col += kg
    return parts, x.astype(np.int8), columns, total


def run(parts, x, columns, target):
    built = scale_group_matmul(parts, columns=columns, x_shape=x.shape)
    assert built is not None
    func, consts = built
    lib = tvm.compile(func, target=target)
    out = tvm.runtime.empty(x.shape[:-1] + (parts[0][0].w_shape[1],), "float32")
    lib["main"](tv.tensor(x), *[tv.tensor(c) for c in consts], out)
    return out.numpy()


def assert_bits(got, expect):
    np.testing.assert_array_equal(got.view(np.int32), expect.view(np.int32))


CASES = [  # (id, kwargs)
    ("two-groups", dict()),
    ("bert-like", dict(lead=(128,), ks=(192, 64), n=256, zeros=(0, 0))),
    ("three-groups-tail", dict(lead=(2, 7), ks=(5, 9, 30), bits=((4, 4), (8, 8), (1, 2)), n=33, zeros=(0, 1, -2))),
    ("gather-from-wider", dict(ks=(24, 16), channels=64)),
    ("scalar-gather", dict(lead=(3,), ks=(300, SHUFFLE_MAX - 290), n=24)),
]


@needs_vnni
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_vnni_bit_for_bit(name, kw):
    parts, x, columns, expect = groups_case("x86-avx512-vnni", HOST_T, **kw)
    assert_bits(run(parts, x, columns, HOST_T), expect)


@needs_avx2
@pytest.mark.parametrize("name,kw", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_avx2_bit_for_bit(name, kw):
    kw = dict(kw, bits=tuple((min(w, 4), min(a, 4)) for w, a in kw.get("bits", ((8, 8), (2, 2)))))
    parts, x, columns, expect = groups_case("x86-avx2-dot", HASWELL, **kw)
    assert_bits(run(parts, x, columns, HASWELL), expect)


def _recorded_modes(func) -> list:
    """The mode each group's recorded op (what verify and the weight store read) runs in."""
    import json

    from soniq_tvm.schedules.cpu.groups import GROUPS_ATTR

    ops = [QOp.from_dict(d) for d in json.loads(str(func.attrs[GROUPS_ATTR]))]
    return [registry.get(op.family).mode(op).name for op in ops]


@needs_avx2
@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_avx2_8x8_beside_narrow_groups_runs_all_in_int16(name, kw, monkeypatch):
    """A layer with an 8 x 8 group (only ``vpmaddwd`` on int16 is exact) and narrower
    ones: every group re-packed for ``avx2-wide`` (the ops the kernel records pin
    that mode, so readers unpack what it runs), bit for bit, the byte gather widened
    to int16 in the shuffle. (Whether it pays is the cost's call, tested below: here
    every case is made to fuse.)"""
    from soniq_tvm.schedules.cpu import groups

    monkeypatch.setattr(groups, "COMBINE_UNITS", 1e6)
    parts, x, columns, expect = groups_case("x86-avx2-dot", HASWELL, **kw)
    assert {registry.get(p[0].family).mode(p[0]).name for p in parts} != {"avx2-wide"}
    func, _ = scale_group_matmul(parts, columns=columns, x_shape=x.shape)
    assert _recorded_modes(func) == ["avx2-wide"] * len(parts)
    assert_bits(run(parts, x, columns, HASWELL), expect)


def test_mode_knob_pins_wide_and_refuses_an_inexact_mode():
    fam = registry.get("x86-avx2-dot")
    narrow = QOp("matmul", "L", (4, 32), (32, 16), (2,) * 32, (2,) * 32)
    assert fam.mode(narrow).name == "avx2-sum16"
    pinned = narrow.with_(knobs={"mode": "avx2-wide"})
    assert fam.mode(pinned).name == "avx2-wide" and fam.knobs(pinned)["mode"] == "avx2-wide"
    w = np.random.default_rng(0).integers(-2, 2, (32, 16))
    np.testing.assert_array_equal(fam.unpack(fam.pack(w, pinned), pinned), w)
    wide = QOp("matmul", "L", (4, 32), (32, 16), (8,) * 32, (8,) * 32)
    with pytest.raises(ValueError, match="cannot run"):
        fam.mode(wide.with_(knobs={"mode": "avx2-sum16"}))  # 8 x 8 pairs overflow int16 sums


def test_one_rounding_per_operation_shows_in_the_bits():
    """The comparison can fail: the second term fused into an FMA with the first (one
    rounding instead of two, what LLVM does to ``a * b + c`` unless fenced) differs in
    the last bits on this data, and so does summing the terms in the other order's
    float64."""
    parts, x, columns, expect = groups_case("x86-avx512-vnni", None, lead=(64,), ks=(40, 24), n=64)
    accs, col = [], 0
    for op, wp, corr, factor in parts:
        fam = registry.get(op.family)
        accs.append(reference(x[..., columns[col:col + op.w_shape[0]]], fam.unpack([wp, corr], op), op))
        col += op.w_shape[0]
    t0 = accs[0].astype(np.float32) * parts[0][3]
    assert_bits(t0 + accs[1].astype(np.float32) * parts[1][3], expect)
    fma = (accs[1].astype(np.float64) * parts[1][3].astype(np.float64) + t0.astype(np.float64)).astype(np.float32)
    assert (fma.view(np.int32) != expect.view(np.int32)).any()


def test_not_applicable_says_none():
    parts, x, columns, _ = groups_case("x86-avx512-vnni", None)
    assert scale_group_matmul(parts[:1]) is None  # one group: nothing to share
    other_j = [(parts[0][0].with_(knobs={"R": 4, "J": 1}),) + parts[0][1:], parts[1]]
    assert scale_group_matmul(other_j) is None  # tiles differ
    mixed = [parts[0], groups_case("x86-avx2-dot", HASWELL)[0][1]]
    assert scale_group_matmul(mixed) is None  # two families
    conv = parts[0][0].with_(kind="conv2d")
    assert scale_group_matmul([(conv,) + parts[0][1:], parts[1]]) is None
    assert scale_group_matmul(parts, columns=np.arange(3), x_shape=x.shape) is None


# ---- conv layers: the int8-dot conv kernel with the groups' words side by side --------------
def conv_case(family_name, target, chans=(5, 9), bits=((8, 8), (2, 2)), o=20, hw=(9, 11), k=3, stride=1, pad=1,
              zeros=(0, 1), src=None, signed=False, seed=0):
    """``(parts, x, columns, numpy result)`` of an NCHW conv whose group ``g`` reads
    ``chans[g]`` channels (of ``src`` in all, in a random order); each group's codes
    reach both ends of its range."""
    rng = np.random.default_rng(seed)
    fam = registry.get(family_name)
    dt = "int8" if signed else "uint8"
    columns = rng.permutation(src or sum(chans))[:sum(chans)]
    x = rng.integers(0, 100, (1, src or sum(chans)) + hw)
    oh, ow = ((d + 2 * pad - k) // stride + 1 for d in hw)
    parts, total, col = [], None, 0
    for g, (kg, (wb, ab), z) in enumerate(zip(chans, bits, zeros)):
        cols = columns[col:col + kg]
        lo, hi = (-(1 << (ab - 1)), (1 << (ab - 1)) - 1) if signed else (0, (1 << ab) - 1)
        x[:, cols] = rng.integers(lo, hi + 1, (1, kg) + hw)
        x[0, cols[0], 0, 0], x[0, cols[-1], -1, -1] = lo, hi
        op = QOp("conv2d", "L", (1, kg) + hw, (o, kg, k, k), (wb,) * kg, (ab,) * kg, a_zero=z, group=g,
                 a_signed=signed, a_dtype=dt, strides=(stride, stride), padding=(pad,) * 4)
        op = registry.with_target_knobs(fam, op, target).with_(family=fam.name)
        op = op.with_(knobs=fam.knobs(op))
        assert op.out_shape == (1, o, oh, ow)
        w = rng.integers(-(1 << (wb - 1)), 1 << (wb - 1), (o, kg, k, k))
        w[0, 0, 0, 0], w[-1, -1, -1, -1] = -(1 << (wb - 1)), (1 << (wb - 1)) - 1
        packed = fam.pack(w, op)
        factor = (rng.random(o) * 10.0 ** (3 * g - 2)).astype(np.float32).reshape(1, o, 1, 1)
        parts.append((op, packed[0], packed[1], factor))
        term = reference(x[:, cols].astype(dt), w, op).astype(np.float32) * factor
        total = term if total is None else total + term
        col += kg
    return parts, x.astype(dt), columns, total


def run_conv(parts, x, columns, target):
    built = scale_group_conv(parts, columns=columns, x_shape=x.shape)
    assert built is not None
    func, consts = built
    lib = tvm.compile(func, target=target)
    out = tvm.runtime.empty(parts[0][0].out_shape, "float32")
    lib["main"](tv.tensor(x), *[tv.tensor(c) for c in consts], out)
    return out.numpy()


CONV_CASES = [  # (id, kwargs)
    ("3x3-zero-points", dict()),
    ("resnet-like", dict(chans=(16, 48), o=64, hw=(14, 14), zeros=(0, 0))),
    ("stem-1-and-2-channels", dict(chans=(1, 2), o=64, hw=(30, 30), k=7, stride=2, pad=3, signed=True,
                                   zeros=(0, 0))),
    ("taps-5x5-zero-points", dict(chans=(2, 3), o=24, hw=(20, 37), k=5, pad=2, zeros=(1, 2))),
    ("strided-1x1-from-wider", dict(chans=(16, 48), o=40, hw=(14, 14), k=1, stride=2, pad=0, src=70)),
    ("three-groups-narrow", dict(chans=(40, 3, 30), bits=((8, 8), (4, 4), (2, 2)), zeros=(0, 3, 1), hw=(5, 3),
                                 o=40)),
]


@needs_vnni
@pytest.mark.parametrize("name,kw", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv_vnni_bit_for_bit(name, kw):
    parts, x, columns, expect = conv_case("x86-avx512-vnni", HOST_T, **kw)
    assert_bits(run_conv(parts, x, columns, HOST_T), expect)


def test_conv_few_channels_pack_taps_into_words():
    """A conv with few channels per group (the 3-channel stem in 1 + 2) puts 4 taps of
    one channel in a word (2 words per channel and kernel row) instead of 4 channels
    of a pixel (7 words of 1-2 channels each): its weights are packed ``KH x 1``."""
    stem = conv_case("x86-avx512-vnni", None, chans=(1, 2), o=64, hw=(30, 30), k=7, stride=2, pad=3, signed=True)
    wp = scale_group_conv(stem[0], columns=stem[2], x_shape=stem[1].shape)[1][3]
    assert wp.shape[2:5] == (7, 1, 6)  # KH, 1, (1 + 2 channels) x 2 words
    wide = conv_case("x86-avx512-vnni", None, chans=(16, 48), o=64, hw=(14, 14))
    wp = scale_group_conv(wide[0], columns=wide[2], x_shape=wide[1].shape)[1][3]
    assert wp.shape[2:5] == (3, 3, 16)  # channels-last words


@needs_avx2
def test_conv_avx2_bit_for_bit():
    for kw in (dict(chans=(16, 48), o=64, hw=(14, 14)), dict(chans=(1, 2), o=16, hw=(30, 30), k=7, stride=2, pad=3)):
        parts, x, columns, expect = conv_case("x86-avx2-dot", HASWELL, bits=((4, 4), (2, 2)), **kw)
        assert_bits(run_conv(parts, x, columns, HASWELL), expect)


AVX2_WIDE_CONVS = [  # (id, kwargs): layers where one int16 kernel costs less than the groups apart
    ("stem-1-and-2-channels", dict(chans=(1, 2), o=64, hw=(30, 30), k=7, stride=2, pad=3, signed=True,
                                   zeros=(0, 0))),
    ("strided-1x1-from-wider", dict(chans=(16, 48), o=40, hw=(14, 14), k=1, stride=2, pad=0, src=70)),
    ("3x3-zero-points", dict()),
]


@needs_avx2
@pytest.mark.parametrize("name,kw", AVX2_WIDE_CONVS, ids=[c[0] for c in AVX2_WIDE_CONVS])
def test_conv_avx2_8x8_beside_narrow_groups_bit_for_bit(name, kw):
    parts, x, columns, expect = conv_case("x86-avx2-dot", HASWELL, **kw)
    func, _ = scale_group_conv(parts, columns=columns, x_shape=x.shape)
    assert _recorded_modes(func) == ["avx2-wide"] * len(parts)
    assert_bits(run_conv(parts, x, columns, HASWELL), expect)


@needs_avx2
def test_conv_avx2_int16_kernel_only_where_it_costs_less(monkeypatch):
    """A 3x3 layer with a large 2 x 2 group would run it at half speed in int16: the
    groups stay apart (None). Counted as cheaper, the same layer fuses, still exact."""
    from soniq_tvm.schedules.cpu import groups

    parts, x, columns, expect = conv_case("x86-avx2-dot", HASWELL, chans=(16, 48), o=64, hw=(28, 28))
    assert scale_group_conv(parts, columns=columns, x_shape=x.shape) is None
    monkeypatch.setattr(groups, "COMBINE_UNITS", 1e6)
    assert_bits(run_conv(parts, x, columns, HASWELL), expect)


@needs_avx2
def test_cnn_avx2_scale_groups_in_one_int16_kernel_verified():
    """The example CNN built for AVX2 (every layer has an 8 x 8 group beside a 2-bit
    one): its layers run their groups in one int16 kernel, which verify checks bit for
    bit against the file."""
    import soniq_tvm
    from soniq_tvm import models
    from soniq_tvm.verify import verify

    proto = models.example_cnn()
    m = soniq_tvm.compile(proto, target="llvm -mcpu=haswell")
    note = [n for n in m.plan.notes if "scale groups in one kernel" in n]
    assert note and int(note[0].split()[0]) == 6
    report = verify(proto, m, inputs=models.example_inputs(proto))
    checks = [c for c in report.layers if c.layer.endswith("[groups]")]
    assert len(checks) == 6 and all(c.ok and c.differing == 0 for c in checks), [str(c) for c in checks]
    assert report.ok


def test_conv_cross_builds_for_aarch64_with_sdot():
    """The same kernels built for NEON (sdot), compile-only: channels-last and taps."""
    arm = tv.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
    for kw in (dict(), dict(chans=(1, 2), o=64, hw=(30, 30), k=7, stride=2, pad=3, signed=True, zeros=(0, 0))):
        parts, x, columns, _ = conv_case("arm-neon-sdot", arm, **kw)
        func, _ = scale_group_conv(parts, columns=columns, x_shape=x.shape)
        asm = tvm.compile(func, target=arm).mod.inspect_source("asm")
        assert "sdot" in asm


@needs_vnni
def test_conv_comparison_fails_on_a_wrong_gather():
    """Two channels of different groups swapped in the kernel's gather table: the
    same weights, steps and codes, and the bits no longer match."""
    parts, x, columns, expect = conv_case("x86-avx512-vnni", HOST_T, chans=(8, 8), o=16, hw=(6, 6))
    wrong = columns.copy()
    wrong[[0, 8]] = wrong[[8, 0]]
    got = run_conv(parts, x, wrong, HOST_T)
    assert (got.view(np.int32) != expect.view(np.int32)).sum() > got.size // 4


@needs_avx2
def test_conv_avx2_int16_comparison_fails_on_a_wrong_gather():
    """The int16 kernel's check can fail: two channels of the 8 x 8 and the 2 x 2
    group swapped in its gather table."""
    parts, x, columns, expect = conv_case("x86-avx2-dot", HASWELL, chans=(1, 2), o=16, hw=(30, 30), k=7, stride=2,
                                          pad=3, signed=True, zeros=(0, 0))
    wrong = columns.copy()
    wrong[[0, 1]] = wrong[[1, 0]]
    got = run_conv(parts, x, wrong, HASWELL)
    assert (got.view(np.int32) != expect.view(np.int32)).sum() > got.size // 4


def test_conv_not_applicable_says_none():
    parts, x, columns, _ = conv_case("x86-avx512-vnni", None)
    assert scale_group_conv(parts[:1]) is None  # one group
    other = [(parts[0][0].with_(knobs={"R": 2, "J": 1}),) + parts[0][1:], parts[1]]
    assert scale_group_conv(other) is None  # tiles differ
    one_by_one = conv_case("x86-avx512-vnni", None, k=1, pad=0)[0]
    assert one_by_one[0][0].out_shape == parts[0][0].out_shape
    assert scale_group_conv([parts[0], one_by_one[1]]) is None  # kernel sizes differ
    assert scale_group_conv(parts, columns=np.arange(3), x_shape=x.shape) is None
    mm = groups_case("x86-avx512-vnni", None)[0]
    assert scale_group_conv(mm) is None and scale_group_matmul(parts) is None


# ---- through the compiler --------------------------------------------------------------------
@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vnni"} <= HOST and "avx2" not in HOST,
                    reason="no int8-dot family on this host")
def test_transformer_scale_groups_in_one_kernel_verified():
    import soniq_tvm
    import soniq_tvm.passes.pipeline as pipeline
    from soniq_tvm import models
    from soniq_tvm.verify import verify

    proto = models.example_transformer()
    m = soniq_tvm.compile(proto, target="llvm")
    inputs = models.example_inputs(proto)
    note = [n for n in m.plan.notes if "scale groups in one kernel" in n]
    fused = int(note[0].split()[0]) if note else 0
    assert fused >= 4  # on AVX2 in int16 (the 8 x 8 groups), where that costs less than apart
    kinds = [p.get("kind") for p in m.manifest["probes"]]
    assert kinds.count("scale-groups") == fused
    report = verify(proto, m, inputs=inputs)
    checks = [c for c in report.layers if c.layer.endswith("[groups]")]
    assert len(checks) == fused and all(c.ok for c in checks), [str(c) for c in checks]
    assert all(c.ok for c in report.layers if c.what == "kernel")
    # the same module with the groups as separate kernels: TVM's glue may fuse a term into
    # an FMA (one rounding), so the float outputs agree to within a few ulps, not bit for bit
    saved = pipeline.FuseScaleGroups
    pipeline.FuseScaleGroups = lambda target, force=None: tv.tvm.transform.Sequential([])
    try:
        apart = soniq_tvm.compile(proto, target="llvm")
    finally:
        pipeline.FuseScaleGroups = saved
    assert not any("scale groups in one kernel" in n for n in apart.plan.notes)
    np.testing.assert_allclose(m.run(inputs)[0], apart.run(inputs)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not {"avx512f", "avx512bw", "avx512vnni"} <= HOST,
        reason="no VNNI on this host; cross-built in test_every_family_cross_builds")
def test_cnn_scale_groups_in_one_kernel_verified():
    """Every conv of the example CNN (stem with 1 + 2 channels, 3x3, residual block, a
    conv whose output channels differ in width) and its head run their activation
    scale groups in one kernel; verify checks each bit for bit and passes."""
    import soniq_tvm
    from soniq_tvm import models
    from soniq_tvm.verify import verify

    proto = models.example_cnn()
    m = soniq_tvm.compile(proto, target="llvm")
    note = [n for n in m.plan.notes if "scale groups in one kernel" in n]
    assert note and int(note[0].split()[0]) == 6
    assert m.plan.gathers == 0 and any("into scale-group kernels' re-layout" in n for n in m.plan.notes)
    report = verify(proto, m, inputs=models.example_inputs(proto))
    checks = [c for c in report.layers if c.layer.endswith("[groups]")]
    assert len(checks) == 6 and all(c.ok and c.differing == 0 for c in checks), [str(c) for c in checks]
    assert report.ok
