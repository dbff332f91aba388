"""Activation steps per tensor, per precision group and per channel (issue #11).

Each scale group of a conv/matmul input is one exact integer kernel; the groups'
terms ``float32(acc_g) * float32(s_g * s_w)`` are added in float, groups in
ascending (step, zero point) order. The numpy model below does the same
arithmetic; LLVM may contract a multiply and the add after it into one FMA (on
hosts that have it), so each output must equal the plain or the fused rounding
of that sum. Beyond :data:`MAX_SCALE_GROUPS` a layer stays float, says so in the
plan, and still agrees with ONNX Runtime.
"""
from __future__ import annotations

import numpy as np
import pytest

import soniq_tvm
from soniq_tvm import SoniqError
from soniq_tvm.compiler import FloatLayerWarning
from soniq_tvm.builder import QDQBuilder, calibrate_scales
from soniq_tvm.passes.fold_qdq import MAX_SCALE_GROUPS
from soniq_tvm.qop import QOp, reference
from soniq_tvm.verify import compare, ort_reference, verify

from .helpers import _codes, _weights, two_level

W_STEP = 2.0 ** -6


def _steps(layout: str, bits, rng, base: float = 0.04) -> np.ndarray:
    """One step per channel, laid out as ``layout`` says."""
    c = len(bits)
    if layout == "tensor":
        return np.full(c, base, np.float32)
    if layout == "group2":  # one step per width
        return np.array([base * (4.0 if b < 8 else 0.37) for b in bits], np.float32)
    if layout == "group4":  # two steps per width
        return np.array([base * (1 + i % 2) * (4.0 if b < 8 else 0.37) for i, b in enumerate(bits)], np.float32)
    if layout == "ratio1024":  # groups 2^10 apart
        return np.array([base * (1024.0 if b < 8 else 1.0) for b in bits], np.float32)
    if layout == "tiny":  # just above the smallest normal once multiplied by the weight step
        return np.array([1.5e-36 * (3.0 if b < 8 else 1.0) for b in bits], np.float32)
    if layout == "singleton":  # one channel has a step of its own
        s = np.full(c, base, np.float32)
        s[c // 2] = base * 0.731
        return s
    if layout == "channel":
        return (base * rng.uniform(0.5, 2.0, c)).astype(np.float32)
    raise ValueError(layout)


def _model_sum(xq, w, steps, zeros, w_steps, op: QOp, axis: int):
    """(plain, fused) float32 results of the group-by-group combine."""
    keys = sorted(set(zip(steps.tolist(), zeros.tolist())))
    plain = fused = None
    for s, z in keys:
        idx = np.flatnonzero((steps == s) & (zeros == z))
        xs = np.take(xq, idx, axis=axis)
        ws = w[:, idx] if op.kind == "conv2d" else w[idx]
        sub = op.with_(x_shape=xs.shape, w_shape=ws.shape, a_zero=int(z))
        acc = reference(xs, ws, sub)
        shape = [1] * acc.ndim
        shape[1 if op.kind == "conv2d" else -1] = -1
        scale = (np.float32(s) * w_steps).astype(np.float32).reshape(shape)
        term = (acc.astype(np.float32) * scale).astype(np.float32)
        if plain is None:
            plain = fused = term
            continue
        plain = (plain + term).astype(np.float32)
        fused = (fused.astype(np.float64) + acc.astype(np.float64) * scale.astype(np.float64)).astype(np.float32)
    return plain, fused


def _assert_model(out, plain, fused):
    ok = (out == plain) | (out == fused)
    assert ok.all(), f"{int((~ok).sum())} of {ok.size} outputs match neither rounding of the group sum"


def _conv_case(rng, layout, k=3, stride=1, signed=False, zero_point=0):
    cin, cout = 10, 12
    bits = two_level(cin, 2, 8, 0.5, rng)
    steps = _steps(layout, bits, rng)
    b = QDQBuilder("scaled_conv")
    x = b.input("x", [1, cin, 7, 6])
    xd = b.quant_act(x, steps, bits, signed=signed, axis=1, zero_point=zero_point)
    w = _weights(rng, (cout, cin, k, k), bits, 1)
    w_steps = (W_STEP * (1 + np.arange(cout) % 3)).astype(np.float32)
    pad = k // 2
    y = b.conv(xd, w, w_steps, bits, w_axis=1, strides=(stride, stride), pads=(pad,) * 4)
    b.output(y, "y")
    xq = _codes(rng, (1, cin, 7, 6), bits, 1, signed)  # codes in each width's range: the zero point
    xf = ((xq - zero_point) * steps.reshape(1, -1, 1, 1)).astype(np.float32)
    op = QOp("conv2d", "t", xq.shape, w.shape, (8,), (8,), strides=(stride, stride), padding=(pad,) * 4)
    return b.build(), xf, xq, w, steps, np.full(cin, zero_point), w_steps, op


def _check_against_ort(model, feeds, out):
    agreement = compare("y", out, ort_reference(model, feeds)[0])
    assert agreement.identical >= 0.999 and agreement.max_steps <= 1, agreement


@pytest.mark.parametrize("layout,k,stride", [
    ("tensor", 3, 1), ("group2", 3, 1), ("group2", 1, 1), ("group2", 3, 2), ("group4", 3, 1), ("group4", 1, 1),
    ("ratio1024", 3, 1), ("tiny", 3, 2), ("singleton", 1, 1), ("singleton", 3, 1)])
def test_conv_scale_groups_exact(layout, k, stride, rng):
    model, xf, xq, w, steps, zeros, w_steps, op = _conv_case(rng, layout, k, stride)
    m = soniq_tvm.compile(model, "llvm")
    out = m.run({"x": xf})[0]
    _assert_model(out, *_model_sum(xq, w, steps, zeros, w_steps, op, axis=1))
    _check_against_ort(model, {"x": xf}, out)
    layer = m.plan.layers[0]
    assert not layer.is_float
    groups = len(set(steps.tolist()))
    assert len(layer.groups) >= groups  # one kernel (or more, split by width) per scale group
    assert layer.scale_groups == groups


def test_conv_scale_groups_with_zero_point_and_split(rng):
    """u8 codes with a zero point, every mixed group split by width too."""
    model, xf, xq, w, steps, zeros, w_steps, op = _conv_case(rng, "group4", zero_point=3)
    for split in ("auto", "always"):
        out = soniq_tvm.compile(model, "llvm", split=split).run({"x": xf})[0]
        _assert_model(out, *_model_sum(xq, w, steps, zeros, w_steps, op, axis=1))


def test_the_model_check_fails_on_swapped_group_steps(rng):
    """The exactness check above is not vacuous: the module's output does not
    match a combine with the two groups' steps swapped."""
    model, xf, xq, w, steps, zeros, w_steps, op = _conv_case(rng, "group2")
    out = soniq_tvm.compile(model, "llvm").run({"x": xf})[0]
    lo, hi = sorted(set(steps.tolist()))
    swapped = np.where(steps == lo, np.float32(hi), np.float32(lo)).astype(np.float32)
    plain, fused = _model_sum(xq, w, swapped, zeros, w_steps, op, axis=1)
    with pytest.raises(AssertionError, match="match neither"):
        _assert_model(out, plain, fused)


def test_per_channel_steps_run_float_and_say_so(rng):
    model, xf, *_ = _conv_case(rng, "channel")
    with pytest.warns(FloatLayerWarning, match="10 scale groups"):
        m = soniq_tvm.compile(model, "llvm")
    layer = m.plan.layers[0]
    assert layer.is_float and "10 scale groups" in layer.reason and str(MAX_SCALE_GROUPS) in layer.reason
    assert "10 scale groups" in str(m.plan)
    _check_against_ort(model, {"x": xf}, m.run({"x": xf})[0])


@pytest.mark.parametrize("op_type,layout", [("MatMul", "group2"), ("MatMul", "group4"), ("Gemm", "group2"),
                                             ("Gemm", "singleton")])
def test_matmul_and_gemm_scale_groups_exact(op_type, layout, rng):
    k, n = 19, 7
    bits = two_level(k, 2, 8, 0.6, rng)
    steps = _steps(layout, bits, rng)
    b = QDQBuilder("scaled_mm")
    x = b.input("x", [3, k])
    xd = b.quant_act(x, steps, bits, signed=True, axis=1)
    w = _weights(rng, (k, n), bits, 0)
    w_steps = np.full(n, W_STEP, np.float32)
    if op_type == "MatMul":
        y = b.matmul(xd, w, w_steps, bits, w_axis=0)
    else:
        y = b.gemm(xd, np.ascontiguousarray(w.T), w_steps, bits, w_axis=1)
    b.output(y, "y")
    model = b.build()
    xq = _codes(rng, (3, k), bits, 1, True)
    xf = (xq * steps).astype(np.float32)
    out = soniq_tvm.compile(model, "llvm").run({"x": xf})[0]
    op = QOp("matmul", "t", xq.shape, w.shape, (8,), (8,))
    _assert_model(out, *_model_sum(xq, w, steps, np.zeros(k, np.int64), w_steps, op, axis=1))
    _check_against_ort(model, {"x": xf}, out)


def _attention(rng, a_layout, b_axis):
    """``A[1,2,5,8] @ B[1,2,8,6]`` of two quantized activations; A's steps run
    along the reduction (per group), B's along ``b_axis``."""
    bits_k = two_level(8, 2, 8, 0.5, rng)
    sa = _steps(a_layout, bits_k, rng, base=0.05)
    b = QDQBuilder("scaled_attention")
    a_in, b_in = b.input("a", [1, 2, 5, 8]), b.input("b", [1, 2, 8, 6])
    ad = b.quant_act(a_in, sa, bits_k, signed=True, axis=3)
    if b_axis == 2:  # along the reduction, grouped like A's
        sb, b_bits = _steps("group2", bits_k, rng, base=0.03), bits_k
    else:  # one step per output column: factorises
        sb, b_bits = (0.03 * rng.uniform(0.5, 2, 6)).astype(np.float32), [8] * 6
    bd = b.quant_act(b_in, sb, b_bits, signed=True, axis=b_axis)
    b.output(b.matmul_act(ad, bd), "y")
    model = b.build()
    aq = _codes(rng, (1, 2, 5, 8), bits_k, 3, True)
    bq = _codes(rng, (1, 2, 8, 6), b_bits, b_axis, True)
    shape_b = [1, 1, 1, 1]
    shape_b[b_axis] = -1
    feeds = {"a": (aq * sa).astype(np.float32), "b": (bq * sb.reshape(shape_b)).astype(np.float32)}
    return model, feeds, aq, bq, sa, sb, b_axis


def _attention_sum(aq, bq, sa, sb, b_axis):
    if b_axis == 3:  # factorised: one product per output
        acc = np.matmul(aq.astype(np.int64), bq.astype(np.int64))
        scale = (sa[0].astype(np.float64) * sb.astype(np.float64)).astype(np.float32)
        y = (acc.astype(np.float32) * scale).astype(np.float32)
        return y, y
    keys = sorted(set(zip(sa.tolist(), sb.tolist())))
    plain = fused = None
    for ka, kb in keys:
        idx = np.flatnonzero((sa == ka) & (sb == kb))
        acc = np.matmul(aq[..., idx].astype(np.int64), bq[:, :, idx].astype(np.int64))
        scale = np.float32(np.float64(ka) * np.float64(kb))
        term = (acc.astype(np.float32) * scale).astype(np.float32)
        if plain is None:
            plain = fused = term
            continue
        plain = (plain + term).astype(np.float32)
        fused = (fused.astype(np.float64) + acc.astype(np.float64) * np.float64(scale)).astype(np.float32)
    return plain, fused


@pytest.mark.parametrize("a_layout,b_axis", [("group2", 2), ("group4", 2), ("tensor", 3)])
def test_attention_scale_groups_exact(a_layout, b_axis, rng):
    model, feeds, aq, bq, sa, sb, b_axis = _attention(rng, a_layout, b_axis)
    m = soniq_tvm.compile(model, "llvm")
    out = m.run(feeds)[0]
    _assert_model(out, *_attention_sum(aq, bq, sa, sb, b_axis))
    agreement = compare("y", out, ort_reference(model, feeds)[0])
    assert agreement.identical >= 0.999 and agreement.max_steps <= 1, agreement
    assert not m.plan.float_layers and m.plan.layers[0].kind == "act-matmul"


def _residual_block(layout: str, c: int, rng):
    """conv -> relu -> requantize -> conv + skip (both with per-channel steps) ->
    relu -> requantize -> max-pool -> requantize -> conv: the glue carries the steps."""
    bits = two_level(c, 2, 8, 0.5, rng)
    b = QDQBuilder("scaled_block")
    x = b.input("x", [1, c, 8, 8])
    feeds = [{"x": rng.standard_normal((1, c, 8, 8)).astype(np.float32)} for _ in range(4)]

    def act(t, signed):
        values = np.concatenate([b.evaluate([t], f)[0] for f in feeds])
        return b.quant_act(t, calibrate_scales(values, bits, signed, 1, per=layout), bits, signed, axis=1)

    def conv(t, name):
        w = rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.3
        from soniq_tvm.builder import quantize_weights

        wq, ws = quantize_weights(w, bits, axis=1, signed=True, scale_axis=0)
        return b.conv(t, wq, ws, bits, w_axis=1, pads=(1, 1, 1, 1), name=name)

    skip = act(x, True)
    h = b.node("Relu", [conv(skip, "c1")])
    h = conv(act(h, False), "c2")
    h = b.node("Relu", [b.node("Add", [h, skip])])
    h = b.node("MaxPool", [act(h, False)], kernel_shape=[2, 2], strides=[2, 2])
    y = conv(act(h, False), "c3")
    b.output(y, "y")
    return b.build()


@pytest.mark.parametrize("layout,c", [("group", 8), ("channel", 8), ("channel", 12)])
def test_residual_add_and_max_pool_carry_per_channel_steps(layout, c, rng):
    """Two steps per tensor, eight (integer, at the limit) and twelve (float)."""
    model = _residual_block(layout, c, rng)
    feeds = {"x": rng.standard_normal((1, c, 8, 8)).astype(np.float32)}
    m = _compile_quietly(model) if c > MAX_SCALE_GROUPS else soniq_tvm.compile(model, "llvm")
    out = m.run(feeds)[0]
    agreement = compare("y", out, ort_reference(model, feeds)[0])
    assert agreement.identical >= 0.999 and agreement.max_steps <= 1, agreement
    report = verify(model, m, inputs=feeds)
    assert report.ok, report
    steps = {"group": 2, "channel": c}[layout]
    if steps <= MAX_SCALE_GROUPS:
        assert not m.plan.float_layers and all(l.scale_groups == steps for l in m.plan.layers)
    else:
        assert len(m.plan.float_layers) == 3


def _compile_quietly(model):
    with pytest.warns(FloatLayerWarning):
        return soniq_tvm.compile(model, "llvm")


def test_calibrate_scales_layouts(rng):
    bits = (2, 8, 2, 8, 8)
    v = rng.standard_normal((4, 5, 3, 3)) * np.array([1, 2, 3, 4, 5]).reshape(1, -1, 1, 1)
    assert isinstance(calibrate_scales(v, bits, True, per="tensor"), float)
    g = calibrate_scales(v, bits, True, per="group")
    assert g.shape == (5,) and g[0] == g[2] and g[1] == g[3] == g[4] and g[0] != g[1]
    ch = calibrate_scales(v, bits, True, per="channel")
    assert len(set(ch.tolist())) == 5
    with pytest.raises(ValueError, match="per="):
        calibrate_scales(v, bits, True, per="layer")


# ---- bad scale data: typed errors naming the tensor and channel ---------------------

def _with_scale(values, axis=1, bits=(2, 8, 2, 8)):
    b = QDQBuilder("bad_scale")
    x = b.input("x", [1, 4, 5, 5])
    xd = b.quant_act(x, np.array(values, np.float32), list(bits), signed=True, axis=axis)
    w = np.ones((3, 4, 1, 1), np.int8)
    b.output(b.conv(xd, w, np.full(3, W_STEP, np.float32), list(bits), w_axis=1), "y")
    return b


@pytest.mark.parametrize("bad", [0.0, -0.5, np.nan, np.inf])
def test_bad_scale_values_are_named(bad):
    b = _with_scale([0.1, 0.1, 0.1, 0.1])
    model = b.build()
    scale = next(i for i in model.graph.initializer if i.name.endswith("scale") and i.dims == [4])
    from onnx import numpy_helper

    arr = numpy_helper.to_array(scale).copy()
    arr[2] = bad
    scale.CopyFrom(numpy_helper.from_array(arr, scale.name))
    with pytest.raises(SoniqError) as e:
        soniq_tvm.compile(model, "llvm")
    assert e.value.tensor == scale.name and e.value.channel == 2, e.value
    assert "positive finite" in str(e.value)


def test_scale_length_matching_no_axis_is_named():
    model = _with_scale([0.1, 0.1, 0.1, 0.1]).build()
    scale = next(i for i in model.graph.initializer if i.name.endswith("scale") and i.dims == [4])
    from onnx import numpy_helper

    scale.CopyFrom(numpy_helper.from_array(np.full(5, 0.1, np.float32), scale.name))
    with pytest.raises(SoniqError, match="5 values but axis 1 of the input has 4 channels") as e:
        soniq_tvm.compile(model, "llvm")
    assert e.value.tensor == scale.name


def test_scale_axis_differing_from_soniq_axis_is_named():
    model = _with_scale([0.1, 0.1, 0.1, 0.1]).build()
    scale = next(i for i in model.graph.initializer if i.name.endswith("scale") and i.dims == [4])
    from onnx import numpy_helper

    scale.CopyFrom(numpy_helper.from_array(np.full(5, 0.1, np.float32), scale.name))
    for n in model.graph.node:  # the activation's Q/DQ run their steps along the width axis (5) instead
        if len(n.input) > 1 and n.input[1] == scale.name:
            for a in n.attribute:
                if a.name == "axis":
                    a.i = 3
    with pytest.raises(SoniqError, match="soniq.axis") as e:
        soniq_tvm.compile(model, "llvm")
    assert e.value.tensor == scale.name


# ---- the ResNet-shaped example with real steps: targets, saved, loaded fresh -----

@pytest.mark.parametrize("layout", ["group", "channel"])
def test_example_cnn_steps_on_every_target_and_in_a_fresh_process(layout, tmp_path):
    """The residual example CNN with one step per width (every layer two integer
    kernels) and per channel (more steps than kernels pay for: those layers float)
    compiles for AVX-512 and aarch64 (cross), and on the host saves, loads in a new
    process and matches ONNX Runtime."""
    import subprocess
    import sys
    import warnings

    from soniq_tvm import models

    proto = models.example_cnn(scales=layout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FloatLayerWarning)  # per channel: asserted on the plan below
        targets = ("llvm -mcpu=skylake-avx512", "llvm -mtriple=aarch64-linux-gnu -mattr=+neon")
        for target in targets if layout == "group" else targets[1:]:  # float layers: one cross target is enough
            plan = soniq_tvm.inspect(proto, target=target)
            assert plan.layers and (layout == "channel" or not plan.float_layers), target
        m = soniq_tvm.compile(proto, "llvm")
    if layout == "group":
        assert all(l.scale_groups == 2 for l in m.plan.layers if l.kind != "act-matmul" and l.name != "stem")
    else:
        assert m.plan.float_layers and all("scale groups" in l.reason for l in m.plan.float_layers)
    path = m.save(tmp_path / "cnn.soniq")
    feeds = models.example_inputs(proto, seed=5)
    np.save(tmp_path / "x.npy", feeds["x"])
    code = (f"import numpy as np, soniq_tvm; m = soniq_tvm.load({str(path)!r}); "
            f"np.save({str(tmp_path / 'y.npy')!r}, m.run({{'x': np.load({str(tmp_path / 'x.npy')!r})}})[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    y = np.load(tmp_path / "y.npy")
    np.testing.assert_array_equal(y, m.run(feeds)[0])
    agreement = compare("logits", y, ort_reference(proto, feeds)[0])
    assert agreement.identical >= 0.999 and agreement.max_steps <= 1, agreement
    assert verify(proto, m, inputs=feeds).ok


def test_unfolded_group_gather_reads_each_group_straight_from_the_source(rng):
    """A graph input cannot absorb the channel permutation: instead of one gather
    of the whole tensor and a slice per group, each group gathers its own channels."""
    from soniq_tvm.compiler import prepare

    k, n = 19, 7
    bits = two_level(k, 2, 8, 0.6, rng)
    b = QDQBuilder("gather_mm")
    x = b.input("x", [3, k])
    xd = b.quant_act(x, _steps("group2", bits, rng), bits, signed=True, axis=1)
    b.output(b.matmul(xd, _weights(rng, (k, n), bits, 0), np.full(n, W_STEP, np.float32), bits, w_axis=0), "y")
    model = b.build()

    def ops(mod, name):
        found = []
        soniq_tvm.tvm_shim.relax.analysis.post_order_visit(
            mod["main"].body, lambda e: found.append(e) if isinstance(e, soniq_tvm.tvm_shim.relax.Call)
            and getattr(e.op, "name", "") == name else None)
        return found

    before = prepare(model, "llvm", stop_after="split")[0].mod
    after = prepare(model, "llvm", stop_after="cleanup")[0].mod
    assert len(ops(before, "relax.take")) == 1 and len(ops(before, "relax.strided_slice")) == 2
    takes = ops(after, "relax.take")
    assert len(takes) == 2 and not ops(after, "relax.strided_slice")
    low = [c for c in range(k) if bits[c] == 2]
    assert sorted(len(soniq_tvm.tvm_shim.const_value(t.args[1])) for t in takes) == sorted([len(low), k - len(low)])
