"""The default CPU schedules for the float glue (:mod:`soniq_tvm.schedules.cpu.generic`).

* fast math: the float32 exp/erf/tanh/sigmoid of :mod:`.fastmath`, compiled and
  vectorised, against float64 references over the ranges that matter (measured
  on znver5, LLVM 22: exp 8.3e-8 relative on [-87, 88]; erf 3.7e-7, tanh 3.1e-7,
  sigmoid 8.9e-8 absolute). A quantisation step of the glue is >= 1e-4, so these
  move a code only when the float value sits within 1e-6 of a rounding boundary;
* each rule on the Relax ops it is for (GELU epilogue, layer norm, softmax +
  quantise, mean, max/avg pool float and int8, take, strided_slice, requantise),
  built through the real build pipeline and compared with NumPy: integer
  results exactly, float results within float32 rounding (the vectorised
  reductions add in another order);
* what each rule claims and how: vector loops only where lanes load
  contiguously, no libm calls left, ``None`` for what is not theirs.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax, te  # noqa: E402

from soniq_tvm import tvm_shim as tv  # noqa: E402
from soniq_tvm.passes.pipeline import build_pipeline  # noqa: E402
from soniq_tvm.schedules.cpu import _glue, _isa, fastmath  # noqa: E402
from soniq_tvm.schedules.cpu.generic import Injective, ParallelOuter, default_rules  # noqa: E402
from soniq_tvm.schedules.cpu.pool import Pool  # noqa: E402
from soniq_tvm.schedules.cpu.reduction import RowReduction  # noqa: E402

HOST = _isa.host_features()
HOST_T = tv.Target({"kind": "llvm", "mcpu": tv.host_cpu(), "num-cores": 2})
AVX2_T = tv.Target({"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2})
TARGETS = [pytest.param(HOST_T, id="host"),
           pytest.param(AVX2_T, id="avx2", marks=pytest.mark.skipif("avx2" not in HOST,
                   reason="host has no AVX2; cross-built in test_every_family_cross_builds"))]


# ---- helpers -------------------------------------------------------------------------------
def relax_module(build, *params):
    """A Relax module ``main(*params) = build(*params)``; params: (shape, dtype) pairs."""
    bb = relax.BlockBuilder()
    args = [relax.Var(f"x{i}", relax.TensorType(list(shape), dtype)) for i, (shape, dtype) in enumerate(params)]
    with bb.function("main", args):
        with bb.dataflow():
            out = bb.emit_output(build(*args))
        bb.emit_func_output(out)
    return bb.finalize()


def run_pipeline(mod, target, *inputs):
    """Build ``mod`` with the soniq build pipeline (default schedules included) and run it."""
    ex = tvm.compile(mod, target=target, relax_pipeline=build_pipeline(target))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tv.tensor(x) for x in inputs]).numpy()


def legalized(mod, target):
    """The PrimFuncs of ``mod`` after TVM's legalisation and fusion, by name."""
    with target:
        dispatch, legalize, _lower, _finalize = tv.cpu_pipeline_stages(target)
        out = tvm.transform.Sequential(dispatch + legalize)(mod)
    return {gv.name_hint: f for gv, f in out.functions.items() if isinstance(f, tv.PrimFunc)}


def only_func(mod, target):
    funcs = legalized(mod, target)
    assert len(funcs) == 1, sorted(funcs)
    return next(iter(funcs.values()))


def scheduled_script(func, target, rule) -> str:
    sch = rule.apply(func, target, False)
    assert sch is not None, f"{type(rule).__name__} refused {func}"
    return sch.mod["main"].script()


def const(x):
    return relax.const(np.asarray(x))


def quantize_np(x, scale, zp=0, lo=-128, hi=127):
    return np.clip(np.round(x / np.float32(scale)) + zp, lo, hi)


def gelu_np(x):
    x = x.astype(np.float64)
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def row_layer_norm_np(x, g, b, eps=1e-5):
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * g + b


def softmax_np(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def pool_np(x, k, s, p, kind, fill):
    n, c, h, w = x.shape
    xp = np.full((n, c, h + 2 * p, w + 2 * p), fill, x.dtype)
    xp[:, :, p:p + h, p:p + w] = x
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    wins = np.stack([xp[:, :, r:r + s * oh:s, q:q + s * ow:s] for r in range(k) for q in range(k)])
    if kind == "max":
        return wins.max(0)
    valid = np.stack([np.pad(np.ones((h, w)), p)[r:r + s * oh:s, q:q + s * ow:s] for r in range(k) for q in range(k)])
    return wins.astype(np.float64).sum(0) / valid.sum(0)


# ---- fast math -----------------------------------------------------------------------------
FAST = [  # name, builder, float64 reference, range, relative?, bound
    ("exp", fastmath.fast_exp, np.exp, (-87.0, 88.0), True, 2e-7),
    ("exp_softmax", fastmath.fast_exp, np.exp, (-30.0, 0.0), True, 2e-7),
    ("erf", fastmath.fast_erf, np.vectorize(math.erf), (-6.0, 6.0), False, 5e-7),
    ("tanh", fastmath.fast_tanh, np.tanh, (-12.0, 12.0), False, 5e-7),
    ("sigmoid", fastmath.fast_sigmoid, lambda x: 1 / (1 + np.exp(-x)), (-30.0, 30.0), False, 2e-7),
]


@pytest.mark.parametrize("name,fn,ref,span,relative,bound", FAST, ids=[f[0] for f in FAST])
def test_fast_math_accuracy(name, fn, ref, span, relative, bound):
    xs = np.linspace(*span, 1 << 17, dtype=np.float32)
    a = te.placeholder(xs.shape, "float32", name="A")
    b = te.compute(xs.shape, lambda i: fn(a[i].asobject()), name="B")
    sch = tv.s_tir.Schedule(te.create_prim_func([a, b]))
    (i,) = sch.get_loops(sch.get_sblock("B"))
    sch.vectorize(sch.split(i, [None, 8])[1])
    ex = tvm.compile(sch.mod, target=HOST_T)
    out = tv.tensor(np.zeros_like(xs))
    ex["main"](tv.tensor(xs), out)
    want = ref(xs.astype(np.float64))
    err = np.abs(out.numpy() - want)
    if relative:
        err = err / np.abs(want)
    assert err.max() < bound, f"{name}: max {'relative' if relative else 'absolute'} error {err.max():.3g}"
    assert not _libm_calls(ex)


_LIBM = {"exp", "expf", "erf", "erff", "tanh", "tanhf"}


def _libm_calls(ex) -> set:
    """libm functions the compiled code calls."""
    return {c for c in re.findall(r"call\w*\s+(\w+)", ex.mod.inspect_source("asm")) if c in _LIBM}


def test_fast_math_extremes():
    """Saturation instead of inf/denormals at the clamps, and exact values where they must be."""
    xs = np.array([-1e30, -200.0, -87.3, 0.0, 88.0, 200.0, 1e30], np.float32)
    a = te.placeholder(xs.shape, "float32", name="A")
    outs = {}

    def elementwise(fn):
        return te.compute(xs.shape, lambda i: fn(a[i].asobject()), name="B")

    for name, fn in (("exp", fastmath.fast_exp), ("erf", fastmath.fast_erf), ("tanh", fastmath.fast_tanh)):
        ex = tvm.compile(tvm.IRModule({"main": te.create_prim_func([a, elementwise(fn)])}), target=HOST_T)
        o = tv.tensor(np.zeros_like(xs))
        ex["main"](tv.tensor(xs), o)
        outs[name] = o.numpy()
    assert outs["exp"][0] == 0 and outs["exp"][1] == 0 and outs["exp"][3] == 1.0
    assert np.isfinite(outs["exp"]).all() and outs["exp"][-1] == outs["exp"][-2]
    np.testing.assert_array_equal(outs["erf"][[0, 1, -2, -1]], [-1, -1, 1, 1])
    np.testing.assert_array_equal(outs["tanh"][[0, 1, -2, -1]], [-1, -1, 1, 1])
    assert outs["erf"][3] == 0 and outs["tanh"][3] == 0


def test_substitute_only_float32_calls():
    x32 = te.placeholder((16,), "float32", name="X")
    x64 = te.placeholder((16,), "float64", name="Y")
    out32 = te.compute((16,), lambda i: te.exp(x32[i]) + te.erf(x32[i]), name="O")
    out64 = te.compute((16,), lambda i: te.exp(x64[i]), name="P")
    f = fastmath.substitute(te.create_prim_func([x32, x64, out32, out64]))
    script = f.script()
    assert "T.erf" not in script and script.count("T.exp") == 1  # the float64 exp is left to TVM
    g = te.create_prim_func([x32, te.compute((16,), lambda i: x32[i] * 2.0, name="Q")])
    assert fastmath.substitute(g).same_as(g) or tv.structural_equal(fastmath.substitute(g), g)


# ---- whole-op numerics through the build pipeline ------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_gelu_epilogue(target, rng):
    """int32 accumulators -> scale, bias, GELU, quantise (the FFN epilogue)."""
    rows, cols = 32, 96
    scale = (rng.random(cols) * 0.02 + 0.005).astype("float32")
    bias = rng.standard_normal(cols).astype("float32")
    qs = np.float32(0.037)

    def build(acc):
        y = relax.op.add(relax.op.multiply(relax.op.astype(acc, "float32"), const(scale)), const(bias))
        return relax.op.quantize(relax.op.nn.gelu(y), const(qs), const(np.int8(0)), out_dtype="int8")

    mod = relax_module(build, ((rows, cols), "int32"))
    acc = rng.integers(-600, 600, (rows, cols)).astype("int32")
    got = run_pipeline(mod, target, acc)
    y = (acc.astype(np.float32) * scale + bias).astype(np.float32)
    want = quantize_np(gelu_np(y), qs)
    diff = np.abs(got.astype(np.int64) - want)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999
    assert "T.erf" not in scheduled_script(only_func(mod, target), target, Injective())


@pytest.mark.parametrize("shape", [(1, 128, 256), (3, 50)], ids=["bert", "odd"])
@pytest.mark.parametrize("target", TARGETS)
def test_layer_norm(shape, target, rng):
    x = (rng.standard_normal(shape) * 4 + 1).astype("float32")
    g = rng.standard_normal(shape[-1]).astype("float32")
    b = rng.standard_normal(shape[-1]).astype("float32")
    mod = relax_module(lambda a: relax.op.nn.layer_norm(a, const(g), const(b), axes=[-1]), (shape, "float32"))
    got = run_pipeline(mod, target, x)
    np.testing.assert_allclose(got, row_layer_norm_np(x, g, b), rtol=1e-5, atol=2e-5)
    script = scheduled_script(only_func(mod, target), target, RowReduction())
    if shape[-1] % 16 == 0:
        assert "_rf" in script and "T.vectorized" in script  # partial sums in vector lanes


@pytest.mark.parametrize("shape", [(1, 4, 128, 128), (5, 37)], ids=["attention", "odd"])
@pytest.mark.parametrize("target", TARGETS)
def test_softmax_quantize(shape, target, rng):
    """Attention probabilities: softmax, then quantise to uint8 codes (as in BERT)."""
    x = (rng.standard_normal(shape) * 3).astype("float32")
    qs = np.float32(1 / 255)
    mod = relax_module(lambda a: relax.op.quantize(relax.op.nn.softmax(a, axis=-1), const(qs), const(np.uint8(0)),
                                                   out_dtype="uint8"), (shape, "float32"))
    got = run_pipeline(mod, target, x)
    want = quantize_np(softmax_np(x), qs, lo=0, hi=255)
    diff = np.abs(got.astype(np.int64) - want)
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.999
    script = scheduled_script(only_func(mod, target), target, RowReduction())
    assert "T.exp" not in script and "T.parallel" in script or np.prod(shape) < 8192


@pytest.mark.parametrize("target", TARGETS)
def test_mean_over_plane(target, rng):
    """ResNet's global average pool: a row reduction of 7 x 7 (no whole vector of lanes)."""
    x = rng.standard_normal((1, 64, 7, 7)).astype("float32")
    mod = relax_module(lambda a: relax.op.mean(a, axis=[2, 3], keepdims=True), (x.shape, "float32"))
    got = run_pipeline(mod, target, x)
    np.testing.assert_allclose(got, x.astype(np.float64).mean((2, 3), keepdims=True), rtol=1e-5, atol=1e-6)
    assert RowReduction().apply(only_func(mod, target), target, False) is not None


POOLS = [  # kind, dtype, shape, kernel, stride, pad
    ("max", "float32", (1, 8, 112, 112), 3, 2, 1),
    ("max", "float32", (2, 3, 17, 19), 3, 2, 1),
    ("max", "int8", (1, 4, 20, 24), 3, 2, 1),
    ("max", "float32", (1, 4, 16, 16), 2, 2, 0),
    ("avg", "float32", (1, 4, 15, 13), 3, 1, 1),
]


POOL_IDS = [f"{p[0]}-{p[1]}-{p[2][2]}x{p[2][3]}-k{p[3]}s{p[4]}p{p[5]}" for p in POOLS]


@pytest.mark.parametrize("kind,dtype,shape,k,s,p", POOLS, ids=POOL_IDS)
def test_pool2d(kind, dtype, shape, k, s, p, rng):
    if dtype == "int8":
        x = rng.integers(-128, 128, shape).astype(dtype)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    op = relax.op.nn.max_pool2d if kind == "max" else relax.op.nn.avg_pool2d
    mod = relax_module(lambda a: op(a, pool_size=k, strides=s, padding=p), (shape, dtype))
    got = run_pipeline(mod, HOST_T, x)
    fill = np.iinfo(dtype).min if dtype == "int8" else -np.inf
    want = pool_np(x, k, s, p, kind, fill if kind == "max" else 0)
    if kind == "max":
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    funcs = legalized(mod, HOST_T)
    pooled = [f for name, f in funcs.items() if "pool" in name]
    assert pooled and Pool().apply(pooled[0], HOST_T, False) is not None


def flattened(func, target) -> str:
    """``func`` through TVM's lowering up to flattening, vectorisation and simplification."""
    from tvm import s_tir, tirx

    steps = [s_tir.transform.LowerInitBlock(), s_tir.transform.ConvertBlocksToOpaque(),
             s_tir.transform.CompactBufferAllocation(), s_tir.transform.LowerOpaqueBlock(),
             tirx.transform.FlattenBuffer(), tirx.transform.StmtSimplify(), tirx.transform.VectorizeLoop(True),
             tirx.transform.StmtSimplify()]
    return tvm.transform.Sequential(steps)(tvm.IRModule({"main": func.with_attr("target", target)})).script()


def test_max_pool_interior_has_no_padding_branch():
    """The border row and column are split off: once lowered, the interior reads
    the input without a condition, and the window is unrolled inside it."""
    mod = relax_module(lambda a: relax.op.nn.max_pool2d(a, pool_size=3, strides=2, padding=1),
                       ((1, 64, 56, 56), "float32"))
    sch = Pool().apply(only_func(mod, HOST_T), HOST_T, False)
    assert "T.parallel" in sch.mod["main"].script()
    low = flattened(sch.mod["main"], HOST_T)
    updates = [line for line in low.splitlines() if "T.max(pool_max" in line]
    assert len(updates) == 4  # the corner, the top row, the left column, the interior
    assert sum("if_then_else" not in line for line in updates) == 1
    assert low.count("T.unroll") == 8


@pytest.mark.parametrize("target", TARGETS)
def test_take_and_strided_slice(target, rng):
    """Channel gathers between groups: vector loads only where they are contiguous."""
    x = rng.integers(-128, 128, (1, 128, 256)).astype("int8")
    perm = rng.permutation(256).astype("int32")
    mod = relax_module(lambda a: relax.op.take(a, const(perm), axis=2), (x.shape, "int8"))
    np.testing.assert_array_equal(run_pipeline(mod, target, x), x[:, :, perm])
    script = scheduled_script(only_func(mod, target), target, Injective())
    assert "T.vectorized" not in script  # a gather in the innermost loop: lanes would not be contiguous

    def sliced(a):
        return relax.op.strided_slice(a, axes=[2], begin=[64], end=[256])

    mod = relax_module(sliced, (x.shape, "int8"))
    np.testing.assert_array_equal(run_pipeline(mod, target, x), x[:, :, 64:])
    script = scheduled_script(only_func(mod, target), target, Injective())
    assert re.search(r"T\.vectorized\(T\.int64\((64|32)\)\)", script)


@pytest.mark.parametrize("target", TARGETS)
def test_requantize_nchw(target, rng):
    """Per-channel rescale + relu + quantise over 28 x 28 planes: (h, w) fused into the
    vector loop, the channel loop parallel (three fused levels would gather)."""
    shape = (1, 32, 28, 28)
    acc = rng.integers(-5000, 5000, shape).astype("int32")
    s = (rng.random((1, 32, 1, 1)) * 0.01).astype("float32")
    qs = np.float32(0.05)

    def build(a):
        y = relax.op.nn.relu(relax.op.multiply(relax.op.astype(a, "float32"), const(s)))
        return relax.op.quantize(y, const(qs), const(np.uint8(0)), out_dtype="uint8")

    mod = relax_module(build, (shape, "int32"))
    got = run_pipeline(mod, target, acc)
    want = quantize_np(np.maximum(acc.astype(np.float32) * s, 0), qs, lo=0, hi=255)
    np.testing.assert_array_equal(got, want)
    sch = Injective().apply(only_func(mod, target), target, False)
    low = flattened(sch.mod["main"], target)
    # one contiguous vector store per 16 (8 on AVX2) codes: the lanes' index folded back to a ramp
    assert re.search(r"\w+\[[^\[\]]+:[^\[\]]+\] = T\.Cast\(\"uint8x(16|8)\"", low), low


@pytest.mark.parametrize("perm", [[0, 2, 1, 3], [0, 2, 3, 1]], ids=["heads-first", "keys-transposed"])
def test_transposes(perm, rng):
    """Attention layout changes + requantisation: vector loads and arithmetic along the
    axis the input is contiguous in (the stores are scattered when the output is not)."""
    x = rng.standard_normal((1, 128, 4, 64)).astype("float32")
    qs = np.float32(0.02)

    def build(a):
        return relax.op.quantize(relax.op.permute_dims(a, perm), const(qs), const(np.int8(0)), out_dtype="int8")

    mod = relax_module(build, (x.shape, "float32"))
    np.testing.assert_array_equal(run_pipeline(mod, HOST_T, x), quantize_np(x.transpose(perm), qs))
    script = scheduled_script(only_func(mod, HOST_T), HOST_T, Injective())
    assert "T.vectorized" in script and "T.parallel" in script


def test_symbolic_rows(rng):
    """A dynamic leading axis: scheduled (no whole-vector split of an unknown extent), still right."""
    n = tv.tirx.Var("n", "int64")
    g = rng.standard_normal(64).astype("float32")
    b = rng.standard_normal(64).astype("float32")

    def build(a):
        return relax.op.nn.softmax(relax.op.nn.gelu(relax.op.nn.layer_norm(a, const(g), const(b), axes=[-1])), -1)

    mod = relax_module(build, ((n, 64), "float32"))
    x = rng.standard_normal((37, 64)).astype("float32")
    got = run_pipeline(mod, HOST_T, x)
    want = softmax_np(gelu_np(row_layer_norm_np(x, g, b)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    for func in legalized(mod, HOST_T).values():  # layer norm + GELU, softmax: both row reductions
        assert RowReduction().apply(func, HOST_T, False) is not None


# ---- what the rules claim ------------------------------------------------------------------
def test_rules_refuse_what_is_not_theirs():
    k = te.reduce_axis((0, 32), "k")
    a = te.placeholder((16, 32), "float32", name="A")
    b = te.placeholder((32, 8), "float32", name="B")
    mm = te.compute((16, 8), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    matmul = te.create_prim_func([a, b, mm])
    assert RowReduction().apply(matmul, HOST_T, False) is None
    assert Pool().apply(matmul, HOST_T, False) is None
    assert Injective().apply(matmul, HOST_T, False) is None
    sq = te.compute((16,), lambda i: te.sum(a[i, k] * a[i, k], axis=k), name="S")  # x * x is a row reduction
    assert RowReduction().apply(te.create_prim_func([a, sq]), HOST_T, False) is not None
    conv_in = te.placeholder((1, 4, 10, 10), "float32", name="X")
    w = te.placeholder((4, 4, 3, 3), "float32", name="W")
    rc, ry, rx = te.reduce_axis((0, 4)), te.reduce_axis((0, 3)), te.reduce_axis((0, 3))
    conv = te.compute((1, 4, 8, 8), lambda n, f, y, x: te.sum(conv_in[n, rc, y + ry, x + rx] * w[f, rc, ry, rx],
                                                              axis=[rc, ry, rx]), name="conv")
    conv = te.create_prim_func([conv_in, w, conv])
    assert Pool().apply(conv, HOST_T, False) is None and RowReduction().apply(conv, HOST_T, False) is None
    assert ParallelOuter().apply(conv, HOST_T, False) is not None
    cuda = tv.Target({"kind": "cuda", "arch": "sm_80"})
    assert all(r.apply(matmul, cuda, False) is None for r in default_rules())


def test_default_rules_order():
    names = [type(r).__name__ for r in default_rules()]
    assert names[-4:] == ["RowReduction", "Pool", "Injective", "ParallelOuter"]
    assert names[0] == "Matmul"


def test_contiguity_analysis():
    """Steps of each access per loop: broadcasts 0, rows their length, gathers None."""
    x = te.placeholder((8, 32), "float32", name="X")
    idx = te.placeholder((32,), "int32", name="I")
    col = te.placeholder((32,), "float32", name="C")
    out = te.compute((8, 32), lambda i, j: x[i, idx[j]] + col[j] + x[i, j], name="O")
    sch = tv.s_tir.Schedule(te.create_prim_func([x, idx, col, out]))
    blk = sch.get_sblock("O")
    steps = [(str(buf.name), st) for buf, st in _glue.access_strides(sch, blk)]  # loads (inner first), the store
    assert steps == [("I", [0, 1]), ("X", [32, None]), ("C", [0, 1]), ("X", [32, 1]), ("O", [32, 1])]
    assert _glue.contiguous_suffix(sch, blk, sch.get_loops(blk)) == 0
    plain = te.compute((8, 32), lambda i, j: x[i, j] + col[j], name="P")
    sch = tv.s_tir.Schedule(te.create_prim_func([x, col, plain]))
    blk = sch.get_sblock("P")
    assert _glue.contiguous_suffix(sch, blk, sch.get_loops(blk)) == 1  # C repeats per row: rows not fused
