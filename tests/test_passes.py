"""Each pass on its own: the IR before and after, and the numbers unchanged."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from soniq_tvm import tvm_shim as tv
from soniq_tvm.compiler import prepare
from soniq_tvm.passes._common import soniq_call
from soniq_tvm.passes.canonicalize_minmax import CanonicalizeMinMax
from soniq_tvm.passes.pipeline import import_onnx
from soniq_tvm.qop import decode_bitplanes

from .helpers import conv_case, matmul_case


def _ops(mod) -> list[str]:
    names = []
    tv.relax.analysis.post_order_visit(
        mod["main"].body, lambda e: names.append(e.op.name) if isinstance(e, relax.Call) and
        isinstance(e.op, tvm.ir.Op) else None)
    return names


def _soniq_ops(mod):
    found = []
    tv.relax.analysis.post_order_visit(mod["main"].body, lambda e: found.append(soniq_call(e, mod)) if
                                       soniq_call(e, mod) else None)
    return found


def _run(mod, x, params=None):
    if params:
        mod = relax.transform.BindParams("main", params)(mod)
    ex = tvm.compile(mod, target=tv.Target({"kind": "llvm", "mcpu": tv.host_cpu()}))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tv.tensor(x)).numpy()


@pytest.fixture
def mixed_conv(rng):
    return conv_case(rng, 6, 5, [2, 8, 8, 2, 8, 2], [2, 8, 8, 2, 8, 2], w_axis=1, a_signed=False)


def test_canonicalize_minmax_structure(mixed_conv):
    mod, params = import_onnx(mixed_conv.model)
    assert "relax.stack" in _ops(mod) and "relax.maximum" not in _ops(mod)
    after = relax.transform.DeadCodeElimination()(CanonicalizeMinMax(mod))
    # expected: quantize -> maximum(lo) -> minimum(hi) -> dequantize, nothing stacked
    main = mod["main"]
    p = {v.name: v for v in main.params}
    bb = relax.BlockBuilder()
    with bb.function("main", list(main.params), attrs={"num_input": 1}):
        with bb.dataflow():
            q = bb.emit(relax.op.quantize(p["x"], *[a for a in _dq_args(mod)], axis=1, out_dtype="uint8"))
            lo_name, hi_name = _clamp_names(mixed_conv.model)
            q = bb.emit(relax.op.maximum(q, p[lo_name]))
            q = bb.emit(relax.op.minimum(q, p[hi_name]))
            rest = _tail_after_clamp(after, bb, q)
        bb.emit_func_output(rest)
    expected = bb.finalize()
    tvm.ir.assert_structural_equal(after["main"], expected["main"])
    np.testing.assert_array_equal(_run(mod, mixed_conv.x, params), _run(after, mixed_conv.x, params))


def _dq_args(mod):
    for b in mod["main"].body.blocks[0].bindings:
        if isinstance(b.value, relax.Call) and b.value.op.name == "relax.quantize":
            return b.value.args[1], b.value.args[2]
    raise AssertionError("no quantize")


def _clamp_names(model):
    mx = next(n for n in model.graph.node if n.op_type == "Max")
    mn = next(n for n in model.graph.node if n.op_type == "Min")
    return mx.input[1], mn.input[1]


def _tail_after_clamp(after, bb, q):
    """Re-emit the bindings after the clamp (dequantize, conv, ...) onto ``q``."""
    bindings = after["main"].body.blocks[0].bindings
    start = next(i for i, b in enumerate(bindings) if b.value.op.name == "relax.minimum") + 1
    remap = {bindings[start - 1].var: q}
    last = None
    for i, b in enumerate(bindings[start:], start=start):
        value = relax.Call(b.value.op, [remap.get(a, a) for a in b.value.args], b.value.attrs)
        emit = bb.emit_output if i == len(bindings) - 1 else bb.emit
        last = remap[b.var] = emit(value)
    return last


def test_fold_qdq_makes_integer_kernel(mixed_conv):
    before = prepare(mixed_conv.model, stop_after="canonicalize")[0].mod
    after = prepare(mixed_conv.model, stop_after="fold_qdq")[0]
    assert "relax.nn.conv2d" in _ops(before)
    assert "relax.nn.conv2d" not in _ops(after.mod) and "relax.call_tir" in _ops(after.mod)
    (op, args), = _soniq_ops(after.mod)
    assert op.kind == "conv2d" and op.family == "int8-ref" and not op.uniform
    assert op.a_bits == (2, 8, 8, 2, 8, 2) and op.w_bits == (2, 8, 8, 2, 8, 2) and op.w_axis == "in"
    assert not op.a_signed and op.a_dtype == "uint8"
    assert len(after.layers) == 1 and after.layers[0] == op


def test_split_groups_then_fold_permutations(mixed_conv):
    bind = prepare(mixed_conv.model, stop_after="bind")[0].mod
    split = prepare(mixed_conv.model, stop_after="split", split="always")[0]
    ops = _soniq_ops(split.mod)
    assert sorted((o.w_bit, o.a_bit, o.in_channels) for o, _ in ops) == [(2, 2, 3), (8, 8, 3)]
    assert all(o.uniform for o, _ in ops)
    assert sum(split.gathers_after_split.values()) == 1 and "relax.take" in _ops(split.mod)
    x = mixed_conv.x
    np.testing.assert_array_equal(_run(bind, x), _run(split.mod, x))
    # the gather reads the model input: nothing upstream can absorb it
    perm = prepare(mixed_conv.model, stop_after="permute", split="always")[0]
    assert sum(perm.gathers.values()) == 1


def test_fold_permutations_into_producer(rng):
    """conv1 -> relu -> quant(mixed) -> conv2: conv2's gather folds into conv1."""
    from soniq_tvm.builder import QDQBuilder

    b = QDQBuilder("two_convs")
    x = b.input("x", [1, 4, 5, 5])
    xd = b.quant_act(x, 2.0 ** -4, 8, signed=True)
    w1 = rng.integers(-8, 8, (6, 4, 3, 3)).astype(np.int8)
    y = b.conv(xd, w1, np.full(6, 2.0 ** -6, np.float32), 8, bias=rng.standard_normal(6).astype(np.float32),
               pads=(1, 1, 1, 1))
    y = b.node("Relu", [y])
    bits = [2, 8, 2, 8, 8, 2]
    yd = b.quant_act(y, 2.0 ** -3, bits, signed=False)
    w2 = np.stack([rng.integers(-2, 2, (3, 3, 3)) if bb == 2 else rng.integers(-128, 128, (3, 3, 3))
                   for bb in bits], axis=1).astype(np.int8)
    out = b.conv(yd, w2, np.full(3, 2.0 ** -6, np.float32), bits, w_axis=1)
    b.output(out, "out")
    model = b.build()
    split = prepare(model, stop_after="split", split="always")[0]
    folded = prepare(model, stop_after="permute", split="always")[0]
    assert sum(split.gathers_after_split.values()) == 1
    assert sum(folded.gathers.values()) == 0 and "relax.take" not in _ops(folded.mod)
    xin = (rng.integers(-128, 128, (1, 4, 5, 5)) * 2.0 ** -4).astype(np.float32)
    np.testing.assert_array_equal(_run(split.mod, xin), _run(folded.mod, xin))


def test_pack_weights_bitplanes(mixed_conv):
    permuted = prepare(mixed_conv.model, stop_after="permute", split="always")[0].mod
    packed = prepare(mixed_conv.model, stop_after="pack", family="bitplane-ref")[0].mod
    before = {o.group: (o, tv.const_value(a[1])) for o, a in _soniq_ops(permuted)}
    after = {o.group: (o, tv.const_value(a[1])) for o, a in _soniq_ops(packed)}
    assert set(before) == set(after) == {0, 1}
    for g, (op, w) in before.items():
        pop, planes = after[g]
        assert pop.family == "bitplane-ref" and planes.dtype == np.uint8
        assert planes.shape == (op.out_channels, op.w_bit, (op.reduction + 7) // 8)
        np.testing.assert_array_equal(decode_bitplanes(planes, pop).reshape(w.shape), w)
    np.testing.assert_array_equal(_run(permuted, mixed_conv.x), _run(packed, mixed_conv.x))


def test_matmul_out_axis_split_restores_order(rng):
    case = matmul_case(rng, (1, 2), 9, 7, [8] * 9, [3, 8, 3, 3, 8, 8, 3], w_axis=1)
    res = prepare(case.model, stop_after="permute", split="always")[0]
    ops = _soniq_ops(res.mod)
    assert sorted(o.out_channels for o, _ in ops) == [3, 4]
    assert "relax.concat" in _ops(res.mod)
    acc = case.xq.astype(np.int64) @ case.w.astype(np.int64)
    np.testing.assert_array_equal(_run(res.mod, case.x), (acc.astype(np.float32) * case.scale).astype(np.float32))


def test_attention_matmuls_become_integer():
    """Both operands dequantized activations (scores and context): int32 matmuls."""
    from soniq_tvm import models

    before = prepare(models.example_transformer(), stop_after="canonicalize")[0].mod
    after = prepare(models.example_transformer(), stop_after="fold_qdq")[0].mod
    float_mm = [c for c in _calls(before, "relax.matmul")]
    int_mm = [c for c in _calls(after, "relax.matmul") if str(c.attrs.out_dtype) == "int32"]
    # 6 weight matmuls became kernels; each attention matmul is one int32 matmul per
    # step group of its reduction: Q.K^T has one step per width (two groups), P.V one
    assert len(float_mm) == 8 and len(int_mm) == 3
    for c in int_mm:
        assert all(tv.dtype_of(a) == "int32" for a in c.args)


def _calls(mod, name):
    found = []
    tv.relax.analysis.post_order_visit(
        mod["main"].body, lambda e: found.append(e) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op)
        and e.op.name == name else None)
    return found


def _act_kernel_calls(mod):
    from soniq_tvm.passes.pipeline import act_kernels

    return act_kernels(mod)


@pytest.mark.parametrize("target,lowered", [("llvm -mcpu=cascadelake", True), ("llvm -mcpu=haswell", True),
                                            ("llvm -mtriple=aarch64-linux-gnu -mattr=+neon,+dotprod", True),
                                            ("llvm -mcpu=x86-64", False),
                                            ("llvm -mtriple=aarch64-linux-gnu -mattr=+neon", False)])
def test_act_matmuls_lowered_where_an_instruction_takes_them(target, lowered):
    """Phase 7: the two attention matmuls (three int32 matmuls: Q.K^T has two
    step groups) become dot-product kernels on VNNI, AVX2 and NEON dotprod, reading
    the 8-bit codes; SSE-only x86 and NEON without dotprod keep the exact int32
    matmuls."""
    from soniq_tvm import models

    before = prepare(models.example_transformer(), target, stop_after="pack")[0].mod
    after = prepare(models.example_transformer(), target)[0].mod
    int_mm = lambda mod: [c for c in _calls(mod, "relax.matmul") if str(c.attrs.out_dtype) == "int32"]  # noqa: E731
    assert len(int_mm(before)) == 3 and not _act_kernel_calls(before)
    if lowered:
        assert not int_mm(after) and len(_act_kernel_calls(after)) == 3
        casts = [c for c in _calls(after, "relax.astype") if tv.dtype_of(c) == "int32"]
        assert not [c for c in casts if tv.dtype_of(c.args[0]) in ("int8", "uint8")]  # no int32 copies of codes
    else:
        assert len(int_mm(after)) == 3 and not _act_kernel_calls(after)


def test_act_matmuls_kept_with_a_forced_family():
    from soniq_tvm import models

    after = prepare(models.example_transformer(), "llvm -mcpu=cascadelake", family="int8-ref")[0].mod
    assert not _act_kernel_calls(after)
    assert len([c for c in _calls(after, "relax.matmul") if str(c.attrs.out_dtype) == "int32"]) == 3


@pytest.mark.skipif("avx2" not in __import__("soniq_tvm.schedules.cpu._isa", fromlist=["x"]).host_features(),
                    reason="host has no AVX2")
@pytest.mark.parametrize("target", ["llvm", "llvm -mcpu=x86-64-v3"], ids=["host", "avx2"])
def test_act_matmul_kernels_change_no_number(target):
    """The whole transformer with its attention on dot-product kernels (the host's:
    VNNI or AVX2; and AVX2's int16 pairs) gives bit for bit the output of the
    reference build (int8-ref kernels, generic int32 matmuls)."""
    import soniq_tvm
    from soniq_tvm import models

    # one step per tensor: no scale groups, whose one-kernel sum (phase 10) rounds its
    # float terms as the numpy reference does where TVM's glue may fuse them into FMAs
    proto = models.example_transformer(scales="tensor")
    fast = soniq_tvm.compile(proto, target=target)
    ref = soniq_tvm.compile(proto, target=target, family="int8-ref")
    assert any("activation x activation" in n for n in fast.plan.notes)
    assert not any("activation x activation" in n for n in ref.plan.notes)
    for seed in range(3):
        inputs = models.example_inputs(proto, seed=seed)
        np.testing.assert_array_equal(fast.run(inputs)[0], ref.run(inputs)[0])
