"""The scale-group matmul kernel (``schedules/cpu/groups.py``) and its pass (phase 10).

A matmul whose input channels carry several steps runs one int8-dot reduction per
group and sums ``float(acc_g) * (s_g * sw)`` in group order. Checked bit for bit
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
from soniq_tvm.schedules.cpu.groups import SHUFFLE_MAX, scale_group_matmul  # noqa: E402

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
    wide = groups_case("x86-avx2-dot", HASWELL, bits=((8, 8), (2, 2)))[0]
    assert scale_group_matmul(wide) is None  # int16 operands beside u8 ones
    mixed = [parts[0], groups_case("x86-avx2-dot", HASWELL)[0][1]]
    assert scale_group_matmul(mixed) is None  # two families
    conv = parts[0][0].with_(kind="conv2d")
    assert scale_group_matmul([(conv,) + parts[0][1:], parts[1]]) is None
    assert scale_group_matmul(parts, columns=np.arange(3), x_shape=x.shape) is None


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
    if "avx512vnni" not in HOST:  # AVX2: the 8 x 8 groups use int16 operands, nothing fuses
        assert fused == 0
        return
    assert fused >= 4
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
