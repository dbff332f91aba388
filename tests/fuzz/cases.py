"""Differential fuzzing of the integer kernel families: random ops, exact answers.

A *config* is one random conv2d or matmul group (kernel 1-7, stride 1-2, padding,
dilation, groups, odd channel counts; weight and activation widths 1..8, signed or
unsigned, an activation zero point) with the kernel family that runs it (each
applicable family in turn) and its target. Each config runs :data:`DATA_PER_CONFIG`
*cases*: fresh codes and weights, the first with every code at the ends of its range
(the worst case of each instruction's bound). Every case must

* equal :func:`soniq_tvm.qop.reference` (numpy, int64) bit for bit, and
* agree with ONNX Runtime (graph optimisations off) running the same layer as a QDQ
  model (``DequantizeLinear`` of the codes and of per-channel weights, then
  ``Conv``/``MatMul`` in float) within one step of an 8-bit quantizer of the layer's
  output range.

Everything is derived from ``(seed, index)``: a failure prints
``python -m tests.fuzz.cases SEED INDEX``, which re-runs that config alone and shows
the first differing values.
"""
from __future__ import annotations

import json
import sys

import numpy as np

DATA_PER_CONFIG = 8
SEED = 20261207


def make_config(seed: int, index: int, families: list[str], target=None) -> dict:
    """Config ``index`` of the run seeded ``seed`` (plain data, JSON-printable): its
    family is ``families[index % len]`` and its op one that family takes on
    ``target`` (the first of up to 400 random ops; families that take none of them
    are passed over)."""
    for k in range(len(families)):
        name = families[(index + k) % len(families)]
        for attempt in range(400):
            cfg = random_op(np.random.default_rng([seed, index, k, attempt]))
            cfg.update(seed=seed, index=index)
            if accepts(name, cfg, target):
                return dict(cfg, family=name)
    cfg = random_op(np.random.default_rng([seed, index]))
    return dict(cfg, seed=seed, index=index, family="int8-ref")


def random_op(rng) -> dict:
    """A random conv2d or matmul group: widths, signs, zero point, geometry."""
    wb, ab = (int(v) for v in rng.integers(1, 9, 2))
    a_signed, w_signed = bool(rng.random() < 0.5), bool(rng.random() < 0.85)
    if not w_signed and wb == 1:
        wb = 2
    lo, hi = (-(1 << (ab - 1)), (1 << (ab - 1)) - 1) if a_signed else (0, (1 << ab) - 1)
    zero = 0 if rng.random() < 0.6 else int(rng.integers(lo, hi + 1))
    cfg = {"wb": wb, "ab": ab, "a_signed": a_signed, "w_signed": w_signed, "a_zero": zero}
    if rng.random() < 0.6:
        k = 3 if rng.random() < 0.3 else int(rng.integers(1, 8))
        kh, kw = (k, k) if rng.random() < 0.8 else (k, int(rng.integers(1, 8)))
        stride = [1, 1] if rng.random() < 0.4 else [int(v) for v in rng.integers(1, 3, 2)]
        dil = [1, 1] if rng.random() < 0.8 or kh * kw == 1 else [int(v) for v in rng.integers(1, 3, 2)]
        pad = [int(rng.integers(0, max(1, (kh - 1) * dil[0]) + 1)), int(rng.integers(0, max(1, (kw - 1) * dil[1]) + 1))]
        pad = pad + [pad[0], pad[1]] if rng.random() < 0.7 else pad + [int(v) for v in rng.integers(0, 3, 2)]
        groups = 1 if rng.random() < 0.8 else int(rng.choice([2, 4]))
        c = groups * int(rng.integers(1, 24))
        o = groups * int(rng.integers(1, 24))
        if rng.random() < 0.1:  # depthwise
            groups = c = o = int(rng.integers(1, 40))
        h = max((kh - 1) * dil[0] + 1 - pad[0] - pad[2], 1) + int(rng.integers(0, 12))
        w = max((kw - 1) * dil[1] + 1 - pad[1] - pad[3], 1) + int(rng.integers(0, 12))
        cfg.update(kind="conv2d", x=[1, c, h, w], w=[o, c // groups, kh, kw], strides=stride, dilation=dil,
                   padding=[pad[0], pad[1], pad[2], pad[3]], groups=groups)
    else:
        lead = [int(v) for v in rng.integers(1, 20, int(rng.integers(1, 3)))]
        k, n = int(rng.integers(1, 160)), int(rng.integers(1, 70))
        cfg.update(kind="matmul", x=lead + [k], w=[k, n])
    return cfg


def qop(cfg: dict):
    from soniq_tvm.qop import QOp

    nin = cfg["x"][1] if cfg["kind"] == "conv2d" else cfg["w"][0]
    kw = {}
    if cfg["kind"] == "conv2d":
        kw = dict(strides=tuple(cfg["strides"]), dilation=tuple(cfg["dilation"]), padding=tuple(cfg["padding"]),
                  groups=cfg["groups"])
    return QOp(cfg["kind"], f"fuzz{cfg.get('index', 0)}", tuple(cfg["x"]), tuple(cfg["w"]), (cfg["wb"],) * nin,
               (cfg["ab"],) * nin, w_signed=cfg["w_signed"], a_signed=cfg["a_signed"],
               a_dtype="int8" if cfg["a_signed"] else "uint8", a_zero=cfg["a_zero"], **kw)


def accepts(name: str, cfg: dict, target=None) -> bool:
    from soniq_tvm.schedules import registry

    target = target or host_target()
    return registry.get(name).cost(qop(cfg), target) is not None


def host_target():
    from soniq_tvm import tvm_shim as tv

    return tv.Target({"kind": "llvm", "mcpu": tv.host_cpu(), "num-cores": 2})


def operands(op, rng, worst: bool):
    """Activation codes and weights of ``op``; ``worst``: every value at a range end."""
    from soniq_tvm.qop import weight_range

    wlo, whi = weight_range(op.w_bit, op.w_signed)
    alo, ahi = (-(1 << (op.a_bit - 1)), (1 << (op.a_bit - 1)) - 1) if op.a_signed else (0, (1 << op.a_bit) - 1)
    if worst:
        x = np.where(rng.random(op.x_shape) < 0.5, alo, ahi)
        w = np.where(rng.random(op.w_shape) < 0.5, wlo, whi)
    else:
        x = rng.integers(alo, ahi + 1, op.x_shape)
        w = rng.integers(wlo, whi + 1, op.w_shape)
    if op.bipolar:  # signed 1-bit weights are {-1, +1}
        w = np.where(w >= 0, 1, -1)
    return x.astype(op.a_dtype), w.astype(np.int64)


def ort_session(op, w, sx: float, sw: np.ndarray, x_dtype):
    """An ONNX Runtime session (no graph optimisations) of the layer as a QDQ model:
    input ``x`` (codes), ``DequantizeLinear`` of them and of the weights ``w``
    (per output channel steps ``sw``), then ``Conv``/``MatMul`` in float."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    wdt = np.int8 if op.w_signed or int(w.max(initial=0)) < 128 else np.uint8
    axis = 0 if op.kind == "conv2d" else 1
    inits = [numpy_helper.from_array(w.astype(wdt), "w_q"), numpy_helper.from_array(sw.astype(np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(sw.size, wdt), "w_z"),
             numpy_helper.from_array(np.array(sx, np.float32), "x_s"),
             numpy_helper.from_array(np.array(op.a_zero, x_dtype), "x_z")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wf"], axis=axis)]
    if op.kind == "conv2d":
        nodes.append(helper.make_node("Conv", ["xf", "wf"], ["y"], strides=list(op.strides), pads=list(op.padding),
                                      dilations=list(op.dilation), group=op.groups))
    else:
        nodes.append(helper.make_node("MatMul", ["xf", "wf"], ["y"]))
    xt = TensorProto.INT8 if np.dtype(x_dtype) == np.int8 else TensorProto.UINT8
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", xt, list(op.x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run_config(cfg: dict, target=None, execute: bool = True) -> list[str]:
    """Build ``cfg``'s kernel for ``target`` (default: this host) and, when
    ``execute``, run its cases; the failures, one line each (empty: all exact)."""
    import tvm

    from soniq_tvm import tvm_shim as tv
    from soniq_tvm.qop import reference
    from soniq_tvm.schedules import registry

    target = target or host_target()
    fam = registry.get(cfg["family"])
    op = registry.with_target_knobs(fam, qop(cfg), target).with_(family=fam.name)
    lib = tvm.compile(registry.kernel_primfunc(fam, op, target), target=target)
    if not execute:
        return []
    failures = []
    for d in range(DATA_PER_CONFIG):
        rng = np.random.default_rng([cfg["seed"], cfg["index"], d])
        x, w = operands(op, rng, worst=d == 0)
        packed = fam.pack(w, op)
        out = tvm.runtime.empty(op.out_shape, "int32")
        lib["main"](tv.tensor(x), *[tv.tensor(p) for p in packed], out)
        got, expect = out.numpy().astype(np.int64), reference(x, w, op)
        where = f"case {cfg['index']}.{d} ({fam.name}, {op.kind} w{op.w_bit} a{op.a_bit}, {str(target)})"
        if not np.array_equal(got, expect):
            i = np.argwhere(got != expect)[0]
            failures.append(f"{where}: {int((got != expect).sum())} of {got.size} differ from the integer "
                            f"reference, first at {tuple(int(v) for v in i)}: {got[tuple(i)]} vs {expect[tuple(i)]}")
            continue
        sx = float(2.0 ** rng.integers(-8, 0))
        sw = (rng.uniform(0.5, 2.0, op.w_shape[0] if op.kind == "conv2d" else op.w_shape[1]) / 64).astype(np.float32)
        ours = got.astype(np.float64) * sx * (sw.reshape(-1, 1, 1) if op.kind == "conv2d" else sw)
        theirs = ort_session(op, w, sx, sw, x.dtype).run(None, {"x": x})[0].astype(np.float64)
        step = max(float(np.abs(theirs).max(initial=0.0)), 1e-30) / 127
        if theirs.shape != ours.shape or np.abs(ours - theirs).max(initial=0.0) > step:
            failures.append(f"{where}: ONNX Runtime differs by more than one output step ({step:.3g})")
    return failures


def make_group_config(seed: int, index: int) -> dict:
    """A conv or matmul layer whose input channels carry 2-4 activation steps (scale
    groups, gathered from a wider input in random order), each group with its own
    widths, zero point and channel count: the scale-group kernel's input."""
    rng = np.random.default_rng([seed, 1 << 20, index])
    ng = int(rng.integers(2, 5))
    a_signed = bool(rng.random() < 0.3)
    groups = []
    for _ in range(ng):
        wb, ab = int(rng.integers(2, 9)), int(rng.integers(1, 8))
        lo, hi = (-(1 << (ab - 1)), (1 << (ab - 1)) - 1) if a_signed else (0, (1 << ab) - 1)
        groups.append({"channels": int(rng.integers(1, 40)), "wb": wb, "ab": ab,
                       "a_zero": 0 if rng.random() < 0.5 else int(rng.integers(lo, hi + 1))})
    total = sum(g["channels"] for g in groups)
    cfg = {"seed": seed, "index": index, "a_signed": a_signed, "groups": groups,
           "source": total + int(rng.integers(0, 9)), "outputs": int(rng.integers(1, 50))}
    if rng.random() < 0.6:
        k = int(rng.choice([1, 3, 3, 5, 7]))
        pad = int(rng.integers(0, k // 2 + 1))
        cfg.update(kind="conv2d", k=k, stride=int(rng.integers(1, 3)), pad=pad,
                   hw=[int(v) for v in rng.integers(max(1, k - 2 * pad), 20, 2)])
    else:
        cfg.update(kind="matmul", lead=[int(v) for v in rng.integers(1, 24, int(rng.integers(1, 3)))])
    return cfg


def run_group_config(cfg: dict, family: str, target=None) -> list[str]:
    """The scale-group kernel of ``cfg`` on ``family`` against numpy doing the same
    float operations (``float32(acc_g) * factor_g`` added in group order), bit for
    bit; ``["n/a"]`` when the groups cannot share a kernel there."""
    import tvm

    from soniq_tvm import tvm_shim as tv
    from soniq_tvm.qop import QOp, reference
    from soniq_tvm.schedules import registry
    from soniq_tvm.schedules.cpu.groups import scale_group_conv, scale_group_matmul

    target = target or host_target()
    fam = registry.get(family)
    rng = np.random.default_rng([cfg["seed"], 2 << 20, cfg["index"]])
    dt = "int8" if cfg["a_signed"] else "uint8"
    conv = cfg["kind"] == "conv2d"
    src = cfg["source"]
    x_shape = (1, src) + tuple(cfg["hw"]) if conv else tuple(cfg["lead"]) + (src,)
    columns = rng.permutation(src)[:sum(g["channels"] for g in cfg["groups"])]
    x = rng.integers(0, 2, x_shape)
    parts, expect, col = [], None, 0
    for gi, g in enumerate(cfg["groups"]):
        k, cols = g["channels"], columns[col:col + g["channels"]]
        col += k
        lo, hi = (-(1 << (g["ab"] - 1)), (1 << (g["ab"] - 1)) - 1) if cfg["a_signed"] else (0, (1 << g["ab"]) - 1)
        sub = rng.integers(lo, hi + 1, x_shape[:1] + (k,) + x_shape[2:] if conv else x_shape[:-1] + (k,))
        if conv:
            x[:, cols] = sub
        else:
            x[..., cols] = sub
        o = cfg["outputs"]
        if conv:
            op = QOp("conv2d", "fz", (1, k) + tuple(cfg["hw"]), (o, k, cfg["k"], cfg["k"]), (g["wb"],) * k,
                     (g["ab"],) * k, a_signed=cfg["a_signed"], a_dtype=dt, a_zero=g["a_zero"], group=gi,
                     strides=(cfg["stride"],) * 2, padding=(cfg["pad"],) * 4)
        else:
            op = QOp("matmul", "fz", x_shape[:-1] + (k,), (k, o), (g["wb"],) * k, (g["ab"],) * k,
                     a_signed=cfg["a_signed"], a_dtype=dt, a_zero=g["a_zero"], group=gi)
        if fam.cost(op, target) is None:
            return ["n/a"]
        op = registry.with_target_knobs(fam, op, target).with_(family=fam.name)
        op = op.with_(knobs=fam.knobs(op))
        w = rng.integers(-(1 << (g["wb"] - 1)), 1 << (g["wb"] - 1), op.w_shape)
        packed = fam.pack(w, op)
        factor = (rng.uniform(0.5, 2.0, o) * 2.0 ** float(rng.integers(-12, 4))).astype(np.float32)
        factor = factor.reshape(1, o, 1, 1) if conv else factor
        parts.append((op, packed[0], packed[1], factor))
        xg = np.take(x, cols, axis=1 if conv else -1).astype(dt)
        term = reference(xg, w, op).astype(np.float32) * factor
        expect = term if expect is None else expect + term
    x = x.astype(dt)
    built = (scale_group_conv if conv else scale_group_matmul)(parts, columns=columns, x_shape=x.shape)
    if built is None:
        return ["n/a"]
    func, consts = built
    lib = tvm.compile(func, target=target)
    out = tvm.runtime.empty(expect.shape, "float32")
    lib["main"](tv.tensor(x), *[tv.tensor(c) for c in consts], out)
    got = out.numpy()
    bad = got.view(np.int32) != expect.view(np.int32)
    if bad.any():
        return [f"scale groups {cfg['index']} ({family}, {cfg['kind']}, {len(parts)} groups): {int(bad.sum())} of "
                f"{bad.size} outputs differ from numpy's float sum of the exact group results"]
    return []


def run_act_config(seed: int, index: int, target=None) -> list[str]:
    """An attention activation x activation matmul (random batch, rows, reduction,
    columns and operand signs; full-range codes, the first data set at the range
    ends) against numpy, bit for bit; ``["n/a"]`` when the target has no kernel."""
    import tvm

    from soniq_tvm import tvm_shim as tv
    from soniq_tvm.schedules.cpu import actdot

    target = target or host_target()
    rng = np.random.default_rng([seed, 3 << 20, index])
    dts = ["int8", "uint8"]
    spec = actdot.ActMatmul(int(rng.integers(1, 7)), int(rng.integers(1, 41)), int(rng.integers(1, 200)),
                            int(rng.integers(1, 71)), dts[int(rng.integers(2))], dts[int(rng.integers(2))])
    func = actdot.act_matmul(spec, target)
    if func is None:
        return ["n/a"]
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    failures = []
    for d in range(2):
        a_info, b_info = np.iinfo(spec.a_dtype), np.iinfo(spec.b_dtype)
        if d == 0:
            a = np.where(rng.random((spec.batch, spec.m, spec.k)) < 0.5, a_info.min, a_info.max)
            b = np.where(rng.random((spec.batch, spec.k, spec.n)) < 0.5, b_info.min, b_info.max)
        else:
            a = rng.integers(a_info.min, int(a_info.max) + 1, (spec.batch, spec.m, spec.k))
            b = rng.integers(b_info.min, int(b_info.max) + 1, (spec.batch, spec.k, spec.n))
        a, b = a.astype(spec.a_dtype), b.astype(spec.b_dtype)
        out = tvm.runtime.empty((spec.batch, spec.m, spec.n), "int32")
        lib["main"](tv.tensor(a), tv.tensor(b), out)
        if not np.array_equal(out.numpy(), actdot.reference(a, b)):
            failures.append(f"act matmul {index}.{d} {spec}: differs from the integer reference")
    return failures


STEP_LAYOUTS = ("tensor", "group", "channel")


def run_model_config(seed: int, index: int) -> list[str]:
    """One annotated layer through the whole compiler: a conv or matmul whose
    channels take a random pair of widths (1..8, a random fraction low, bits along
    the input or the output channels), signed or unsigned activations with a zero
    point, activation steps per tensor, per width group or per channel, compiled
    with ``split="auto"`` or ``"always"``. :func:`soniq_tvm.verify` must pass: every
    kernel bit for bit against the file's integers, the output against ONNX Runtime."""
    from soniq_tvm import compile as soniq_compile
    from soniq_tvm.annotation import bit_range
    from soniq_tvm.builder import QDQBuilder
    from soniq_tvm.verify import verify

    rng = np.random.default_rng([seed, 4 << 20, index])
    lo_b, hi_b = sorted(int(v) for v in rng.choice(np.arange(1, 9), 2, replace=False))
    a_signed = bool(rng.random() < 0.4)
    if a_signed and lo_b == 1:
        lo_b = 2  # signed 1-bit activations have no Max/Min form
    conv = bool(rng.random() < 0.6)
    cin, cout = int(rng.integers(2, 33)), int(rng.integers(2, 33))
    bits_in = [int(b) for b in np.where(rng.random(cin) < rng.uniform(0.2, 0.9), lo_b, hi_b)]
    w_axis_out = bool(rng.random() < 0.3)
    wbits = [int(b) for b in np.where(rng.random(cout) < 0.5, lo_b, hi_b)] if w_axis_out else bits_in
    if a_signed and min(wbits) == 1:
        wbits = [max(b, 2) for b in wbits]
    layout = STEP_LAYOUTS[int(rng.integers(3))]
    base = 2.0 ** -float(rng.integers(3, 7))
    widths = np.asarray(bits_in)
    if layout == "tensor":
        steps = np.full(cin, base, np.float32)
    elif layout == "group":
        steps = np.where(widths == lo_b, base * 4, base).astype(np.float32)
    else:
        steps = (base * rng.uniform(0.5, 2.0, cin)).astype(np.float32)
    zero = 0 if a_signed or rng.random() < 0.5 else int(rng.integers(0, (1 << min(bits_in)) - 1 + 1))
    b = QDQBuilder("fuzz_layer")
    if conv:
        k = int(rng.choice([1, 3, 5]))
        stride = int(rng.integers(1, 3))
        hw = [int(v) for v in rng.integers(k, 12, 2)]
        x = b.input("x", [1, cin, *hw])
        xd = b.quant_act(x, steps, bits_in, signed=a_signed, axis=1, zero_point=zero)
        w = np.zeros((cout, cin, k, k), np.int64)
        axis_bits = wbits if w_axis_out else bits_in
        for c, wb in enumerate(axis_bits):
            lo, hi = bit_range(wb, True)
            vals = rng.integers(lo, hi + 1, w[c].shape if w_axis_out else w[:, c].shape)
            vals = np.where(vals >= 0, 1, -1) if wb == 1 else vals
            if w_axis_out:
                w[c] = vals
            else:
                w[:, c] = vals
        y = b.conv(xd, w.astype(np.int8), (2.0 ** -6 * rng.uniform(0.5, 2, cout)).astype(np.float32), axis_bits,
                   w_axis=0 if w_axis_out else 1, strides=(stride, stride), pads=(k // 2,) * 4)
        shape = (1, cin, *hw)
    else:
        lead = [int(v) for v in rng.integers(1, 9, int(rng.integers(1, 3)))]
        x = b.input("x", [*lead, cin])
        xd = b.quant_act(x, steps, bits_in, signed=a_signed, axis=len(lead), zero_point=zero)
        w = np.zeros((cin, cout), np.int64)
        axis_bits = wbits if w_axis_out else bits_in
        for c, wb in enumerate(axis_bits):
            lo, hi = bit_range(wb, True)
            vals = rng.integers(lo, hi + 1, cin if w_axis_out else cout)
            vals = np.where(vals >= 0, 1, -1) if wb == 1 else vals
            if w_axis_out:
                w[:, c] = vals
            else:
                w[c] = vals
        y = b.matmul(xd, w.astype(np.int8), (2.0 ** -6 * rng.uniform(0.5, 2, cout)).astype(np.float32), axis_bits,
                     w_axis=1 if w_axis_out else 0)
        shape = (*lead, cin)
    b.output(y, "y")
    model = b.build()
    split = ("auto", "always")[int(rng.integers(2))]
    x = (rng.standard_normal(shape) * 4 * float(steps.max())).astype(np.float32)
    m = soniq_compile(model, target="llvm", split=split)
    report = verify(model, m, inputs={"x": x})
    where = (f"model {index} ({'conv' if conv else 'matmul'} {cin}->{cout}, widths {lo_b}/{hi_b} along "
             f"{'outputs' if w_axis_out else 'inputs'}, steps per {layout}, zero point {zero}, split={split})")
    bad = [str(c) for c in report.layers if c.what == "kernel" and not c.ok]
    if bad or not report.ok:
        return [f"{where}: " + ("; ".join(bad) if bad else str(report).splitlines()[-1])]
    return []


def fuzzed_families(target=None) -> list[str]:
    """The fast families that take some random op on ``target`` (default: this host);
    the two reference families are the yardstick, not fuzzed."""
    from soniq_tvm.schedules import registry

    names = []
    for f in registry.families():
        if f.name in ("int8-ref", "bitplane-ref"):
            continue
        if any(accepts(f.name, random_op(np.random.default_rng([7, i])), target) for i in range(150)):
            names.append(f.name)
    return names


def reproducer(cfg: dict) -> str:
    return f"python -m tests.fuzz.cases {cfg['seed']} {cfg['index']}  # {json.dumps(cfg, sort_keys=True)}"


if __name__ == "__main__":
    seed, index = int(sys.argv[1]), int(sys.argv[2])
    cfg = make_config(seed, index, fuzzed_families())
    print(json.dumps(cfg, sort_keys=True))
    found = run_config(cfg)
    print("\n".join(found) if found else "exact: every case equals the integer reference and ONNX Runtime")
    sys.exit(1 if found else 0)
