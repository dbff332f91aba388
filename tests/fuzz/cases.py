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

DATA_PER_CONFIG = 4
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


def ort_output(op, x, w, sx: float, sw: np.ndarray) -> np.ndarray:
    """ONNX Runtime (no graph optimisations) on the layer as a QDQ model."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    wdt = np.int8 if op.w_signed or int(w.max(initial=0)) < 128 else np.uint8
    axis = 0 if op.kind == "conv2d" else 1
    inits = [numpy_helper.from_array(w.astype(wdt), "w_q"), numpy_helper.from_array(sw.astype(np.float32), "w_s"),
             numpy_helper.from_array(np.zeros(sw.size, wdt), "w_z"),
             numpy_helper.from_array(np.array(sx, np.float32), "x_s"),
             numpy_helper.from_array(np.array(op.a_zero, x.dtype), "x_z")]
    nodes = [helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xf"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wf"], axis=axis)]
    if op.kind == "conv2d":
        nodes.append(helper.make_node("Conv", ["xf", "wf"], ["y"], strides=list(op.strides), pads=list(op.padding),
                                      dilations=list(op.dilation), group=op.groups))
    else:
        nodes.append(helper.make_node("MatMul", ["xf", "wf"], ["y"]))
    xt = TensorProto.INT8 if x.dtype == np.int8 else TensorProto.UINT8
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", xt, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


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
        theirs = ort_output(op, x, w, sx, sw).astype(np.float64)
        step = max(float(np.abs(theirs).max(initial=0.0)), 1e-30) / 127
        if theirs.shape != ours.shape or np.abs(ours - theirs).max(initial=0.0) > step:
            failures.append(f"{where}: ONNX Runtime differs by more than one output step ({step:.3g})")
    return failures


def fuzzed_families(target=None) -> list[str]:
    """The fast families that take some random op on ``target`` (default: this host);
    the two reference families are the yardstick, not fuzzed."""
    from soniq_tvm.schedules import registry

    names = []
    for f in registry.families():
        if f.name in ("int8-ref", "bitplane-ref"):
            continue
        if any(accepts(f.name, random_op(np.random.default_rng([7, i])), target) for i in range(400)):
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
