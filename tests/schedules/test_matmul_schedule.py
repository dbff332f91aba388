"""The default CPU matmul schedule (:mod:`soniq_tvm.schedules.cpu.matmul`).

Integer matmuls must be bit-exact against an int64 NumPy reference (operands at
the extremes of their code range, shapes that do not fill whole tiles, batched,
broadcast and 2-D, B plain or transposed); float32 ones must stay within the
dot-product rounding bound ``K * 2^-24 * (|A| @ |B|)``. The rule must answer
``None`` for anything that is not a matmul.
"""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import te  # noqa: E402

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.schedules.cpu import _isa  # noqa: E402
from soniq_tvm.schedules.cpu.generic import default_rules  # noqa: E402
from soniq_tvm.schedules.cpu.matmul import Matmul, _tile, vector_lanes  # noqa: E402

HOST = _isa.host_features()
HOST_T = tv.Target({"kind": "llvm", "mcpu": tv.host_cpu(), "num-cores": 2})
AVX2_T = tv.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})
AVX512_T = tv.Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})
TARGETS = [pytest.param(HOST_T, id="host"),
           pytest.param(AVX2_T, id="avx2", marks=pytest.mark.skipif("avx2" not in HOST,
                   reason="host has no AVX2; cross-built in test_every_family_cross_builds"))]
SCALE = np.float32(0.000281141372397542)


# ---- helpers -------------------------------------------------------------------------------
def make_matmul(a_shape, b_shape, dtype, trans_b=False, epilogue="scale"):
    """C = A @ B (B given as [.., N, K] when ``trans_b``) accumulated in int32 (float32
    for float32 operands), then the epilogue: "scale" (cast, * SCALE, * 0.125, as the
    legalised attention matmul), "transpose" (cast, swap the last two axes) or None."""
    acc = "float32" if dtype == "float32" else "int32"
    a = te.placeholder(a_shape, dtype, name="A")
    b = te.placeholder(b_shape, dtype, name="B")
    m, kk = a_shape[-2:]
    n = b_shape[-2] if trans_b else b_shape[-1]
    batch = tuple(np.broadcast_shapes(a_shape[:-2], b_shape[:-2]))
    k = te.reduce_axis((0, kk), "k")

    def lead(shape, idx):  # broadcast: missing leading dims, size-1 dims read index 0
        idx = idx[len(idx) - (len(shape) - 2):] if len(shape) > 2 else ()  # aligned right
        return tuple(0 if s == 1 else v for s, v in zip(shape[:-2], idx))

    def body(*idx):
        bi, i, j = idx[:-2], idx[-2], idx[-1]
        bv = b[(*lead(b_shape, bi), j, k)] if trans_b else b[(*lead(b_shape, bi), k, j)]
        av = a[(*lead(a_shape, bi), i, k)]
        if dtype != acc:
            av, bv = av.astype(acc), bv.astype(acc)
        return te.sum(av * bv, axis=k)

    c = te.compute((*batch, m, n), body, name="matmul")
    outs = [c]
    if epilogue == "scale":
        f = te.compute(c.shape, lambda *i: c[i].astype("float32"), name="compute")
        g = te.compute(c.shape, lambda *i: f[i] * tv.tirx.const(float(SCALE), "float32"), name="T_multiply")
        outs = [te.compute(c.shape, lambda *i: g[i] * tv.tirx.const(0.125, "float32"), name="T_multiply1")]
    elif epilogue == "transpose":
        outs = [te.compute((*batch, n, m), lambda *i: c[(*i[:-2], i[-1], i[-2])].astype("float32"), name="epi")]
    return te.create_prim_func([a, b, *outs]).with_attr("global_symbol", "main")


def schedule(func, target, rule=None):
    mod = tvm.IRModule({"main": func})
    with target:
        mod = tv.dlight.ApplyDefaultSchedule(rule or Matmul())(mod)
    assert "tirx.is_scheduled" in mod["main"].attrs, "the matmul rule did not take the function"
    return mod


def run(func, target, a, b, out_shape, out_dtype):
    lib = tvm.compile(schedule(func, target), target=target)
    out = tvm.runtime.empty(out_shape, out_dtype)
    lib["main"](tv.tensor(a), tv.tensor(b), out)
    return out.numpy()


def code_range(dtype, k):
    """The operand range of a test: the dtype's full range for 8-bit codes; for wider
    ones the widest symmetric range whose worst case (K products at the extremes)
    still fits int32 (beyond that the int32 matmul itself would overflow)."""
    if dtype in ("int8", "uint8"):
        info = np.iinfo(dtype)
        return int(info.min), int(info.max)
    hi = min(int(np.iinfo(dtype).max), int(np.sqrt((2**31 - 1) / k)))
    return -hi, hi


def codes(rng, shape, dtype, lo, hi):
    x = rng.integers(lo, hi, shape, endpoint=True)
    x.flat[::5], x.flat[1::7] = lo, hi  # the extremes, spread over rows and columns
    return x.astype(dtype)


def reference(a, b, trans_b):
    bm = np.swapaxes(b, -1, -2) if trans_b else b
    return np.matmul(a.astype(np.int64), bm.astype(np.int64))


# ---- exactness -------------------------------------------------------------------------------
SHAPES = [  # (id, A shape, B shape as [.., K, N] / [.., N, K] when transposed)
    ("bert-scores", (1, 4, 128, 64), (1, 4, 64, 128)),
    ("bert-context", (1, 4, 128, 128), (1, 4, 128, 64)),
    ("batched-ragged", (2, 3, 13, 7), (2, 3, 7, 10)),
    ("2d-ragged", (37, 45), (45, 19)),
    ("broadcast-b", (2, 33, 20), (20, 50)),
    ("broadcast-dim1", (3, 1, 9, 16), (1, 2, 16, 17)),
    ("gemv", (1, 77), (77, 33)),
    ("narrow-n3", (5, 300), (300, 3)),
]


def _b_shape(b_shape, trans_b):
    return (*b_shape[:-2], b_shape[-1], b_shape[-2]) if trans_b else b_shape


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("trans_b", [False, True], ids=["b-kn", "b-nk"])
@pytest.mark.parametrize("name,a_shape,b_shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_int32_exact(name, a_shape, b_shape, trans_b, target):
    """int32 codes -> int32, no epilogue: every output bit-exact."""
    del name
    b_shape = _b_shape(b_shape, trans_b)
    k = a_shape[-1]
    lo, hi = code_range("int32", k)
    rng = np.random.default_rng(k)
    a, b = codes(rng, a_shape, "int32", lo, hi), codes(rng, b_shape, "int32", lo, hi)
    expect = reference(a, b, trans_b)
    assert np.abs(expect).max() < 2**31
    got = run(make_matmul(a_shape, b_shape, "int32", trans_b, epilogue=None), target, a, b, expect.shape, "int32")
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int16"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["b-kn", "b-nk"])
@pytest.mark.parametrize("name,a_shape,b_shape", [SHAPES[0], SHAPES[2], SHAPES[3]], ids=["bert", "batched", "2d"])
def test_narrow_codes_exact(name, a_shape, b_shape, trans_b, dtype):
    """int8/uint8/int16 operands cast to int32 inside the matmul: bit-exact."""
    del name
    b_shape = _b_shape(b_shape, trans_b)
    lo, hi = code_range(dtype, a_shape[-1])
    rng = np.random.default_rng(7)
    a, b = codes(rng, a_shape, dtype, lo, hi), codes(rng, b_shape, dtype, lo, hi)
    expect = reference(a, b, trans_b)
    got = run(make_matmul(a_shape, b_shape, dtype, trans_b, epilogue=None), HOST_T, a, b, expect.shape, "int32")
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_worst_case_sums(dtype):
    """Every product at the largest-magnitude corner: the sums are exact to the last bit."""
    a_shape, b_shape = (2, 19, 200), (2, 200, 40)
    lo, hi = code_range(dtype, 200)
    v = lo if abs(lo) > abs(hi) else hi
    a, b = np.full(a_shape, v, dtype), np.full(b_shape, v, dtype)
    expect = reference(a, b, False)
    assert int(expect.flat[0]) == 200 * v * v
    got = run(make_matmul(a_shape, b_shape, dtype, epilogue=None), HOST_T, a, b, expect.shape, "int32")
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("trans_b", [False, True], ids=["b-kn", "b-nk"])
def test_attention_epilogue_fused_and_exact(trans_b, target):
    """The legalised attention shape, cast * scale * 0.125 fused into the tile: the
    float result equals NumPy's float32 evaluation of the same expression bit for bit."""
    a_shape, b_shape = (1, 4, 128, 64), _b_shape((1, 4, 64, 128), trans_b)
    rng = np.random.default_rng(3)
    a, b = codes(rng, a_shape, "int32", -255, 255), codes(rng, b_shape, "int32", -255, 255)
    func = make_matmul(a_shape, b_shape, "int32", trans_b)
    acc = reference(a, b, trans_b).astype(np.int32)
    expect = acc.astype(np.float32) * SCALE * np.float32(0.125)
    got = run(func, target, a, b, expect.shape, "float32")
    np.testing.assert_array_equal(got, expect)
    # one parallel loop nest computes the tile and its epilogue
    sch = tv.s_tir.Schedule(schedule(func, target)["main"])
    outer_mm = sch.get(sch.get_loops(sch.get_sblock("matmul_update"))[0])
    outer_epi = sch.get(sch.get_loops(sch.get_sblock("T_multiply1"))[0])
    assert outer_epi.same_as(outer_mm)
    assert outer_mm.kind == tv.tirx.ForKind.PARALLEL


def test_transposing_epilogue_exact():
    """An epilogue writing C^T (cast to float32) joins the tile transposed: exact."""
    a_shape, b_shape = (2, 21, 30), (2, 30, 40)
    rng = np.random.default_rng(4)
    a, b = codes(rng, a_shape, "int8", -128, 127), codes(rng, b_shape, "int8", -128, 127)
    expect = np.swapaxes(reference(a, b, False), -1, -2).astype(np.float32)
    got = run(make_matmul(a_shape, b_shape, "int8", epilogue="transpose"), HOST_T, a, b, expect.shape, "float32")
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("n", [32, 40], ids=["whole-tiles", "padded"])
def test_unfusable_epilogue_still_exact(n):
    """An epilogue reading other rows of C (here row i and row M-1-i) cannot join
    the tile: it runs as its own pass after the matmul, and the result is exact."""
    m, kk = 21, 30
    a = te.placeholder((2, m, kk), "int8", name="A")
    b = te.placeholder((2, kk, n), "int8", name="B")
    k = te.reduce_axis((0, kk), "k")
    c = te.compute((2, m, n), lambda z, i, j: te.sum(a[z, i, k].astype("int32") * b[z, k, j].astype("int32"), axis=k),
                   name="matmul")
    e = te.compute((2, m, n), lambda z, i, j: c[z, i, j] - c[z, m - 1 - i, j], name="epi")
    func = te.create_prim_func([a, b, e]).with_attr("global_symbol", "main")
    sch = tv.s_tir.Schedule(schedule(func, HOST_T)["main"])
    tile_loop = sch.get(sch.get_loops(sch.get_sblock("matmul_update"))[0])
    assert not sch.get(sch.get_loops(sch.get_sblock("epi"))[0]).same_as(tile_loop)
    rng = np.random.default_rng(5)
    av, bv = codes(rng, (2, m, kk), "int8", -128, 127), codes(rng, (2, kk, n), "int8", -128, 127)
    acc = reference(av, bv, False)
    expect = acc - acc[:, ::-1, :]
    assert np.abs(expect).max() > 0
    np.testing.assert_array_equal(run(func, HOST_T, av, bv, expect.shape, "int32"), expect)


@pytest.mark.parametrize("trans_b", [False, True], ids=["b-kn", "b-nk"])
@pytest.mark.parametrize("name,a_shape,b_shape", [SHAPES[0], SHAPES[2], SHAPES[4], SHAPES[7]],
                         ids=["bert", "batched", "broadcast", "narrow"])
def test_float32_within_rounding_bound(name, a_shape, b_shape, trans_b):
    """float32: |got - exact| <= K * 2^-24 * (|A| @ |B|) (the summation-order bound;
    the epilogue's * 0.125 is exact)."""
    del name
    b_shape = _b_shape(b_shape, trans_b)
    rng = np.random.default_rng(11)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    bm = np.swapaxes(b, -1, -2) if trans_b else b
    exact = np.matmul(a.astype(np.float64), bm.astype(np.float64))
    bound = a_shape[-1] * 2.0**-24 * np.matmul(np.abs(a).astype(np.float64), np.abs(bm).astype(np.float64))
    func = make_matmul(a_shape, b_shape, "float32", trans_b, epilogue=None)
    got = run(func, HOST_T, a, b, exact.shape, "float32")
    err = np.abs(got - exact)
    assert (err <= bound + 1e-30).all(), f"max error {err.max():.3g} over the bound at {np.argmax(err - bound)}"
    assert err.max() > 0 or a_shape[-1] == 1  # the test can see rounding at all


# ---- what the rule takes and leaves ------------------------------------------------------
def test_targets_set_the_vector_width():
    assert vector_lanes(AVX512_T) == 16
    assert vector_lanes(AVX2_T) == 8
    assert vector_lanes(tv.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})) == 4
    for target, lanes in ((AVX512_T, 16), (AVX2_T, 8)):
        sch = tv.s_tir.Schedule(schedule(make_matmul((1, 4, 128, 64), (1, 4, 64, 128), "int32"), target)["main"])
        inner = sch.get(sch.get_loops(sch.get_sblock("matmul_update"))[-1])
        assert int(inner.extent) == lanes and inner.kind == tv.tirx.ForKind.VECTORIZED


def test_tiles_fit_the_stack_buffer():
    for lanes in (16, 8, 4):
        for m, n in ((128, 128), (128, 64), (13, 10), (1, 77), (300, 3), (7, 48)):
            mr, nv, vl = _tile(m, n, lanes)
            assert 1 <= mr <= m and mr * nv * vl * 4 < 1024, (m, n, lanes)
            assert vl in (4, 8, 16) and vl <= lanes


def test_default_rules_try_matmul_first():
    assert isinstance(default_rules()[0], Matmul)


def _te_func(outs, ins):
    return te.create_prim_func([*ins, *outs]).with_attr("global_symbol", "main")


def _not_matmuls():
    a = te.placeholder((8, 16), "float32", name="A")
    b = te.placeholder((16, 8), "float32", name="B")
    k = te.reduce_axis((0, 16), "k")
    yield "row-sum", _te_func([te.compute((8,), lambda i: te.sum(a[i, k], axis=k))], [a])
    yield "row-max", _te_func([te.compute((8,), lambda i: te.max(a[i, k], axis=k))], [a])
    yield "sum-of-sums", _te_func([te.compute((8, 8), lambda i, j: te.sum(a[i, k] + b[k, j], axis=k))], [a, b])
    x = te.placeholder((40,), "float32", name="x")
    w = te.placeholder((9,), "float32", name="w")
    r = te.reduce_axis((0, 9), "r")
    yield "conv1d", _te_func([te.compute((32,), lambda i: te.sum(x[i + r] * w[r], axis=r))], [x, w])
    yield "elementwise", _te_func([te.compute((8, 16), lambda i, j: a[i, j] * 2.0)], [a])
    c = te.compute((8, 8), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="mm")
    kk = te.reduce_axis((0, 8), "kk")
    yield "matmul-then-reduce", _te_func([te.compute((8,), lambda i: te.max(c[i, kk], axis=kk))], [a, b])
    a64 = te.placeholder((8, 16), "float64", name="A")
    b64 = te.placeholder((16, 8), "float64", name="B")
    yield "float64", _te_func([te.compute((8, 8), lambda i, j: te.sum(a64[i, k] * b64[k, j], axis=k))], [a64, b64])
    at = te.placeholder((16, 8), "float32", name="At")
    yield "a-transposed", _te_func([te.compute((8, 8), lambda i, j: te.sum(at[k, i] * b[k, j], axis=k))], [at, b])
    n = tv.tirx.Var("n", "int64")
    ad = te.placeholder((n, 16), "float32", name="A")
    yield "symbolic-m", _te_func([te.compute((n, 8), lambda i, j: te.sum(ad[i, k] * b[k, j], axis=k))], [ad, b])


@pytest.mark.parametrize("name,func", list(_not_matmuls()), ids=[n for n, _ in _not_matmuls()])
def test_not_mine(name, func):
    del name
    assert Matmul().apply(func, HOST_T, False) is None


def test_not_mine_off_llvm():
    func = make_matmul((4, 16), (16, 8), "float32", epilogue=None)
    assert Matmul().apply(func, tv.Target({"kind": "cuda", "arch": "sm_80"}), False) is None
    assert Matmul().apply(func, HOST_T, False) is not None
