"""Per-family kernel throughput against the machine's primitive peaks:
``python -m benchmarks.kernels [--quick] [--sections families,gemv,conv,depthwise,attention,winograd,resnet18]``.

Two workloads: a ResNet-like 3x3 conv (1x64x56x56 -> 64, pad 1) and a 4096x4096
GEMV, at several (w_bits, a_bits). Each applicable CPU family is compiled for the
target whose instructions it uses (AVX2: ``x86-64-v3``; VNNI and the vpopcntq
bit-serial kernel: this host, when it has them), timed with ``time_evaluator``
(median, 2 threads) and compared with

* the primitive's peak: ``benchmarks.peak`` (exact int8 dot, VNNI, 1-bit
  popcount) plus ``_kernel_prims`` (16-bit-sum ``vpmaddubsw``, int16 ``vpmaddwd``);
* the ``bitplane-ref`` family on the same op.

Bit-serial throughput is counted in bit-MACs (MACs x a_bits x weight planes), the
unit of its popcount primitive. A GEMV streams each weight once: it is bound by
memory bandwidth, not by the primitive, so its fraction of peak is low by nature.

Sections (``--sections``, all by default):

* ``families``: the table above (one timing per kernel, compiled one after another).
* ``gemv``: the decode GEMV (4096 x 4096, batch 1) at (w, a) = (2, 8), (4, 8),
  (1, 8), (8, 8) for the packed low-bit families, the lookup-table families
  (``x86-*-lut``: its %prim is against ``_lut_tir.primitive``, the same lookups and
  16-bit sums on L1-resident tables and weights, counted in byte lookups), int8-dot
  and ``bitplane-ref``,
  plus ONNX Runtime's INT8 QDQ MatMul (per-channel ``quantize_static``,
  ``ORT_ENABLE_ALL``, 2 threads) on the same shape. Every kernel and the packed
  low-bit primitive (``_kernel_prims.lowbit_kernel``) are timed **interleaved**, in
  rounds, and the medians reported: the machine is shared, so only ratios within
  one run mean much. GB/s is the kernel's packed weight bytes over its time.
* ``conv``: the 3x3 conv at low bit widths, low-bit family vs int8-dot vs
  bit-serial, interleaved the same way.
* ``depthwise``: ``cpu-depthwise`` vs ``bitplane-ref`` on a 3x3 depthwise conv
  (1 x 128 x 56 x 56, stride 1 and 2).
* ``attention``: the BERT-like encoder's score and context matmuls (4 heads,
  128 x 64 x 128 and 128 x 128 x 64, 8-bit codes) on the activation x activation
  dot-product kernel (``schedules/cpu/actdot.py``: VNNI, or int16 ``vpmaddwd``
  pairs on AVX2; both on a VNNI host) against the generic int32 ``Matmul`` rule
  it replaces, interleaved; %prim against the VNNI / ``avx2-wide`` primitive.
* ``winograd``: ResNet-18's stride-1 3x3 convs as the low group of a 75 %-low layer
  (2x2 and 4x4 bits), the int8-dot kernel against integer Winograd F(2x2, 3x3)
  (``schedules/cpu/winograd.py``), for the host (VNNI) and as an AVX2 build,
  interleaved; GOP/s and %peak count the direct convolution's MACs, with the cost
  model's figure beside each.
* ``resnet18``: every distinct ResNet-18 conv shape (stem, 3x3 stride 1 and 2, 1x1
  stride 2) at 8 bits on the int8-dot family, for the host and as an AVX2 build,
  interleaved, with its share of the int8 dot peak against #19's goals (85 % for the
  3x3 stride-1 convs, 70 % for the rest).
"""
from __future__ import annotations

import argparse
import itertools
import os

import numpy as np

THREADS = 2
AVX2_CPU = "x86-64-v3"


def primitive_peaks(log=print) -> dict[str, float]:
    """GMAC/s of each primitive, keyed by kernel mode (2 threads)."""
    import tvm

    from . import _kernel_prims as kp

    peaks: dict[str, float] = {}
    try:
        from .peak import run_peaks

        res = run_peaks(log=lambda s: None)
        for r in res["peaks"]:
            key = {("int8 dot (exact)", "AVX2"): "avx2-madd", ("int8 dot (exact)", "AVX512-VNNI"): "avx512-vnni",
                   ("1-bit MAC", "AVX2"): "bitserial-avx2", ("1-bit MAC", "AVX512"): "bitserial-avx512"}
            for (kern, isa), mode in key.items():
                if r["kernel"] == kern and r["isa"].startswith(isa):
                    peaks[mode] = r["gmacs"]
    except Exception as e:  # noqa: BLE001  (peak.py is optional)
        log(f"benchmarks.peak unavailable ({e}); measuring only the local primitives")
    target = tvm.target.Target({"kind": "llvm", "mcpu": AVX2_CPU, "num-cores": THREADS})
    rng = np.random.default_rng(0)
    for mode, fn, arrays in [
        ("avx2-sum16", kp.sum16_kernel, [rng.integers(0, 4, (kp.P, kp.MR, kp.KS * 4)).astype("uint8"),
                                         rng.integers(-2, 2, (kp.P, kp.KS, kp.NB * 32)).astype("int8"),
                                         np.zeros((kp.P, kp.MR, kp.NB * 16), "int16")]),
        ("avx2-wide", kp.wide_kernel, [rng.integers(-128, 128, (kp.P, kp.MR, kp.KS * 2)).astype("int16"),
                                       rng.integers(-128, 128, (kp.P, kp.KS, kp.NB * 16)).astype("int16"),
                                       np.zeros((kp.P, kp.MR, kp.NB * 8), "int32")]),
    ]:
        func, macs = fn()
        lib = tvm.compile(func.with_attr("global_symbol", "prim"), target=target)
        args = [tvm.runtime.tensor(a) for a in arrays]
        n = 4000
        t = lib.mod.time_evaluator("prim", tvm.cpu(), number=3, repeat=5)(*args, n).median
        peaks[mode] = THREADS * macs * n / t / 1e9
    from soniq_tvm.schedules.cpu import _isa

    hostf = _isa.host_features()
    for name, mcpu, need in LOWBIT_RUNS:
        if need <= hostf:
            mode, pcpu = PRIM_MODE[name]
            timer = _prim_timer(mode, pcpu)
            peaks[f"lowbit-{mode}"] = 1 / float(np.median([timer() for _ in range(5)])) / 1e9
    return peaks


def _ops(op):
    from soniq_tvm.qop import QOp

    conv = QOp("conv2d", "conv3x3", (1, 64, 56, 56), (64, 64, 3, 3), (op[0],) * 64, (op[1],) * 64,
               padding=(1, 1, 1, 1))
    gemv = QOp("matmul", "gemv4096", (1, 4096), (4096, 4096), (op[0],) * 4096, (op[1],) * 4096)
    return conv, gemv


def bench_family(fam, op, target, rng, number=10):
    import tvm

    lib, args, exact, _ = _compiled(fam, op, target, rng)
    t = lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=5, min_repeat_ms=50)(*args).median
    return t, exact


LOWBIT_RUNS = [  # (family, mcpu or None for the host, host features it needs to run)
    ("x86-avx512-lowbit", None, {"avx512f", "avx512bw", "avx512vnni"}),
    ("x86-avxvnni-lowbit", None, {"avxvnni"}),
    ("x86-avx2-lowbit", AVX2_CPU, {"avx2"}),
]
DOT_RUNS = [("x86-avx512-vnni", None, {"avx512f", "avx512bw", "avx512vnni"}), ("x86-avx2-dot", AVX2_CPU, {"avx2"})]
LUT_RUNS = [("x86-avx512-lut", None, {"avx512f", "avx512bw"}), ("x86-avx2-lut", AVX2_CPU, {"avx2"})]
PRIM_MODE = {"x86-avx512-lowbit": ("vnni512", None), "x86-avxvnni-lowbit": ("vnni256", "alderlake"),
             "x86-avx2-lowbit": ("madd256", AVX2_CPU)}


def _target(mcpu):
    import tvm

    from soniq_tvm import tvm_shim as tv

    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu or tv.host_cpu(), "num-cores": THREADS})


def _operands(op, rng):
    from soniq_tvm.qop import weight_range

    lo, hi = weight_range(op.w_bit, op.w_signed)
    w = rng.integers(lo, hi + 1, op.w_shape)
    if op.bipolar:
        w = np.where(w >= 0, 1, -1)
    x = rng.integers(-(1 << (op.a_bit - 1)), 1 << (op.a_bit - 1), op.x_shape).astype(op.a_dtype)
    return x, w


def _compiled(fam, op, target, rng):
    """Compile ``fam``'s kernel for ``op`` on random operands and run it once:
    ``(library, call arguments, exact against the numpy reference, packed weights)``."""
    import tvm

    from soniq_tvm import tvm_shim as tv
    from soniq_tvm.qop import reference

    x, w = _operands(op, rng)
    packed = fam.pack(w, op)
    lib = tvm.compile(fam.primfunc(op, target), target=target)
    out = tvm.runtime.empty(op.out_shape, "int32")
    args = [tv.tensor(x), *[tv.tensor(p) for p in packed], out]
    lib["main"](*args)
    return lib, args, bool(np.array_equal(out.numpy(), reference(x, w, op))), packed


def _kernel_timer(fam, op, target, rng, call_s=0.02):
    """Compile ``fam`` for ``op``; returns ``(timer, exact, packed weight bytes)``,
    ``timer()`` giving seconds per call (about ``call_s`` of calls per sample)."""
    import tvm

    lib, args, exact, packed = _compiled(fam, op, target, rng)
    ev = lib.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=1, min_repeat_ms=int(call_s * 1e3))
    return (lambda: ev(*args).mean), exact, int(packed[0].nbytes)


def _prim_timer(mode, mcpu):
    """Timer of the packed low-bit primitive: seconds per MAC (2 threads)."""
    import tvm

    from . import _kernel_prims as kp

    func, macs = kp.lowbit_kernel(mode, fields=4, mr=1, jp=2)
    lib = tvm.compile(func.with_attr("global_symbol", "prim"), target=_target(mcpu))
    vl = 16 if mode == "vnni512" else 8
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.integers(-128, 128, (kp.P, 1, 256 * 4)).astype("int8")),
            tvm.runtime.tensor(rng.integers(0, 256, (kp.P, 256, 2 * vl * 4)).astype("uint8")),
            tvm.runtime.tensor(np.zeros((kp.P, 8 * vl), "int32"))]
    n = 500
    ev = lib.mod.time_evaluator("prim", tvm.cpu(), number=3, repeat=1)
    return lambda: ev(*args, n).mean / (THREADS * macs * n)


def _lut_lookups(op) -> int:
    """Byte lookups of a lookup-table kernel: one per 4 weights and plane."""
    from soniq_tvm.schedules.cpu.lut import GROUP, planes

    return op.w_shape[1] * int(np.prod(op.x_shape[:-1])) * -(-op.w_shape[0] // GROUP) * planes(op)


def _lut_prim_timer(name, op):
    """Timer of the lookup-table primitive for ``op``'s unit kind (the first unit) and
    high-byte table: seconds per byte lookup (2 threads)."""
    import tvm

    from soniq_tvm.schedules import registry
    from soniq_tvm.schedules.cpu._lut_tir import primitive
    from soniq_tvm.schedules.cpu.lut import needs_high_table, units

    fam = registry.get(name)
    kind = units(op, fam.mode)[0][0]
    func, lookups = primitive(fam.mode.name, kind == "pair", needs_high_table(op), threads=THREADS)
    mcpu = dict((n, m) for n, m, _ in LUT_RUNS)[name]
    lib = tvm.compile(func.with_attr("global_symbol", "prim"), target=_target(mcpu))
    rng = np.random.default_rng(0)
    vb = fam.mode.vb
    args = [tvm.runtime.tensor(rng.integers(0, 256, (THREADS, 128, 4, 16)).astype("uint8")),
            tvm.runtime.tensor(rng.integers(0, 256, (THREADS, 128, 4 * vb)).astype("uint8")),
            tvm.runtime.tensor(np.zeros((THREADS, 4 * vb), "uint16"))]
    n = 200
    ev = lib.mod.time_evaluator("prim", tvm.cpu(), number=3, repeat=1)
    return lambda: ev(*args, n).mean / (THREADS * lookups * n)


def ort_int8_gemv_timer(k: int = 4096, n: int = 4096, workdir=None):
    """ONNX Runtime's INT8 QDQ MatMul ``[1, k] x [k, n]`` (float in and out): timer."""
    import tempfile
    import time
    from pathlib import Path

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from .peers import _ort_session, quantize_ort_int8

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    d = Path(workdir or tempfile.mkdtemp(prefix="soniq_ort_gemv_"))
    onnx.save(model, d / "gemv_fp32.onnx")
    calib = [{"x": rng.standard_normal((1, k)).astype(np.float32)} for _ in range(8)]
    q = quantize_ort_int8(d / "gemv_fp32.onnx", d / "gemv_int8.onnx", calib)
    sess = _ort_session(q, optimize=True)
    feed = {"x": calib[0]["x"]}
    sess.run(None, feed)

    def timer(reps=20):
        t0 = time.perf_counter()
        for _ in range(reps):
            sess.run(None, feed)
        t = (time.perf_counter() - t0) / reps
        time.sleep(0.2)  # ORT's worker threads spin after a run: let them stop before the next kernel
        return t

    return timer


def _interleave(timers: dict, rounds: int) -> dict:
    samples = {k: [] for k in timers}
    for _ in range(rounds):
        for k, fn in timers.items():
            samples[k].append(fn())
    return {k: float(np.median(v)) for k, v in samples.items()}


def _applicable(runs, hostf):
    return [(name, mcpu) for name, mcpu, need in runs if need <= hostf]


def gemv_section(rounds: int, log=print, pairs=((2, 8), (4, 8), (1, 8), (8, 8)), with_ref=True) -> list[dict]:
    """Interleaved GEMV table (see the module docstring); returns its rows."""
    from soniq_tvm.qop import QOp
    from soniq_tvm.schedules import registry
    from soniq_tvm.schedules.cpu import _isa

    hostf = _isa.host_features()
    rng = np.random.default_rng(0)
    k = n = 4096
    timers, meta = {}, {}
    for wb, ab in pairs:
        op = QOp("matmul", "gemv4096", (1, k), (k, n), (wb,) * k, (ab,) * k)
        for name, mcpu in _applicable(LOWBIT_RUNS + LUT_RUNS + DOT_RUNS, hostf):
            fam, target = registry.get(name), _target(mcpu)
            if fam.cost(op, target) is None:
                continue
            timer, exact, nbytes = _kernel_timer(fam, op, target, rng)
            timers[(name, wb, ab)] = timer
            meta[(name, wb, ab)] = (op, exact, nbytes, mcpu)
            if name.endswith("-lut"):  # per op: the primitive depends on the unit kind and table
                timers[("prim", name, wb, ab)] = _lut_prim_timer(name, op)
    for name in {key[0] for key in timers}:
        if name in PRIM_MODE:
            timers[("prim", name)] = _prim_timer(*PRIM_MODE[name])
    try:
        timers[("ort-int8",)] = ort_int8_gemv_timer(k, n)
    except Exception as e:  # noqa: BLE001  (ORT is a reference, not a requirement)
        log(f"ORT INT8 GEMV unavailable: {e}")
    med = _interleave(timers, rounds)
    if with_ref:  # bitplane-ref is ~1000x slower: one sample
        for wb, ab in pairs[:1]:
            op = QOp("matmul", "gemv4096", (1, k), (k, n), (wb,) * k, (ab,) * k)
            fam = registry.get("bitplane-ref")
            timer, exact, nbytes = _kernel_timer(fam, op, _target(None), rng, call_s=0.0)
            med[("bitplane-ref", wb, ab)] = timer()
            meta[("bitplane-ref", wb, ab)] = (op, exact, nbytes, None)
    base = med.get(("x86-avx512-vnni", 8, 8)) or med.get(("x86-avx2-dot", 8, 8))
    ort = med.get(("ort-int8",))
    log(f"GEMV 4096x4096, batch 1, {THREADS} threads, medians of {rounds} interleaved rounds")
    if ort:
        log(f"  ORT INT8 QDQ MatMul (ORT_ENABLE_ALL): {ort * 1e6:.1f} us, {2 * k * n / ort / 1e9:.1f} GOP/s")
    log(f"{'w,a':5} {'family':20} {'us':>8} {'GOP/s':>7} {'MB':>6} {'GB/s':>6} {'%prim':>6} {'x int8':>7} "
        f"{'x ORT':>6} exact")
    rows = []
    for key, t in med.items():
        if key[0] in ("prim", "ort-int8"):
            continue
        name, wb, ab = key
        op, exact, nbytes, _ = meta[key]
        gops = 2 * op.macs / t / 1e9
        if name.endswith("-lut"):  # prim: s per byte lookup
            prim = med.get(("prim", name, wb, ab))
            frac = 100 * prim * _lut_lookups(op) / t if prim else float("nan")
        else:  # prim: s per MAC
            prim = med.get(("prim", name))
            frac = 100 * prim * op.macs / t if prim else float("nan")
        row = {"w": wb, "a": ab, "family": name, "us": t * 1e6, "gops": gops, "weight_mb": nbytes / 1e6,
               "gbps": nbytes / t / 1e9, "pct_prim": frac, "x_int8": t / base if base else float("nan"),
               "x_ort": t / ort if ort else float("nan"), "exact": exact}
        rows.append(row)
        log(f"{wb},{ab:<3} {name:20} {row['us']:8.1f} {gops:7.1f} {row['weight_mb']:6.2f} {row['gbps']:6.1f} "
            f"{frac:5.0f}% {row['x_int8']:7.2f} {row['x_ort']:6.2f} {exact}")
    for name in sorted({key[1] for key in med if key[0] == "prim" and len(key) == 2}):
        log(f"  primitive {PRIM_MODE[name][0]} (load + AND + dot, L1): {2 / med[('prim', name)] / 1e9:.0f} GOP/s")
    for key in sorted(k for k in med if k[0] == "prim" and len(k) == 4):
        log(f"  primitive {key[1]} w{key[2]}a{key[3]} (nibbles + lookups + 16-bit sums, L1): "
            f"{1 / med[key] / 1e9:.0f} G lookups/s")
    return rows


def conv_section(rounds: int, log=print, pairs=((1, 4), (2, 4), (4, 4), (2, 8), (4, 8))) -> list[dict]:
    """3x3 conv (1x64x56x56 -> 64, pad 1): low-bit vs int8-dot vs bit-serial, interleaved."""
    from soniq_tvm.qop import QOp
    from soniq_tvm.schedules import registry
    from soniq_tvm.schedules.cpu import _isa

    hostf = _isa.host_features()
    rng = np.random.default_rng(0)
    runs = _applicable(LOWBIT_RUNS + DOT_RUNS, hostf) + [("cpu-bitserial", None)]
    timers, meta = {}, {}
    for wb, ab in pairs:
        op = QOp("conv2d", "conv3x3", (1, 64, 56, 56), (64, 64, 3, 3), (wb,) * 64, (ab,) * 64, padding=(1, 1, 1, 1))
        for name, mcpu in runs:
            fam, target = registry.get(name), _target(mcpu)
            o = registry.with_target_knobs(fam, op, target)  # the knobs the compiler's pack phase sets
            if fam.cost(o, target) is None:
                continue
            timer, exact, nbytes = _kernel_timer(fam, o, target, rng)
            timers[(name, wb, ab)], meta[(name, wb, ab)] = timer, (op, exact, nbytes)
    for name in {key[0] for key in timers}:
        if name in PRIM_MODE:
            timers[("prim", name)] = _prim_timer(*PRIM_MODE[name])
    med = _interleave(timers, rounds)
    log(f"3x3 conv 1x64x56x56 -> 64, medians of {rounds} interleaved rounds")
    log(f"{'w,a':5} {'family':20} {'us':>8} {'GOP/s':>7} {'%prim':>6} {'x int8':>7} exact")
    rows = []
    for key, t in med.items():
        if key[0] == "prim":
            continue
        name, wb, ab = key
        op, exact, _ = meta[key]
        ref = med.get(("x86-avx512-vnni", wb, ab)) or med.get(("x86-avx2-dot", wb, ab))
        prim = med.get(("prim", name))
        frac = 100 * prim * op.macs / t if prim else float("nan")
        rows.append({"w": wb, "a": ab, "family": name, "us": t * 1e6, "gops": 2 * op.macs / t / 1e9,
                     "pct_prim": frac, "x_int8": t / ref, "exact": exact})
        log(f"{wb},{ab:<3} {name:20} {t * 1e6:8.1f} {2 * op.macs / t / 1e9:7.1f} {frac:5.0f}% {t / ref:7.2f} {exact}")
    return rows


def depthwise_section(rounds: int, log=print) -> list[dict]:
    """``cpu-depthwise`` vs ``bitplane-ref`` (one sample) on 3x3 depthwise convs."""
    from soniq_tvm.qop import QOp
    from soniq_tvm.schedules import registry
    from soniq_tvm.schedules.cpu import _isa

    rng = np.random.default_rng(0)
    runs = [("cpu-depthwise", None)] + ([("cpu-depthwise", AVX2_CPU)] if "avx512f" in _isa.host_features() else [])
    rows = []
    for stride in (1, 2):
        op = QOp("conv2d", f"dw3x3s{stride}", (1, 128, 56, 56), (128, 1, 3, 3), (8,) * 128, (8,) * 128,
                 padding=(1, 1, 1, 1), groups=128, strides=(stride, stride))
        timers, meta = {}, {}
        for name, mcpu in runs:
            timers[(name, mcpu)], exact, _ = _kernel_timer(registry.get(name), op, _target(mcpu), rng)
            meta[(name, mcpu)] = exact
        med = _interleave(timers, rounds)
        ref_timer, ref_exact, _ = _kernel_timer(registry.get("bitplane-ref"), op, _target(None), rng, call_s=0.0)
        med[("bitplane-ref", None)], meta[("bitplane-ref", None)] = ref_timer(), ref_exact
        ref = med[("bitplane-ref", None)]
        for (name, mcpu), t in med.items():
            row = {"op": op.layer, "family": name, "mcpu": mcpu or "host", "us": t * 1e6,
                   "gops": 2 * op.macs / t / 1e9, "x_ref": ref / t, "exact": meta[(name, mcpu)]}
            rows.append(row)
            log(f"{op.layer:9} {name:14} {row['mcpu']:10} {t * 1e6:9.1f} us {row['gops']:7.1f} GOP/s "
                f"{row['x_ref']:6.1f}x bitplane-ref  exact={row['exact']}")
    return rows


def int8_peaks() -> dict[str, float]:
    """GMAC/s of the exact int8 dot primitive (``benchmarks.peak``, 2 threads), keyed
    by mode: ``avx512-vnni`` where the host has it, ``avx2-madd``."""
    from .peak import run_peaks

    peaks = {}
    for r in run_peaks(log=lambda s: None)["peaks"]:
        if r["kernel"] == "int8 dot (exact)":
            peaks["avx512-vnni" if r["isa"].startswith("AVX512-VNNI") else "avx2-madd"] = r["gmacs"]
    return peaks


RESNET_3X3 = [(64, 56), (128, 28), (256, 14), (512, 7)]  # ResNet-18's stride-1 3x3 convs: (channels, size)
WINOGRAD_RUNS = [("x86-avx512-vnni", "x86-avx512-winograd", None, {"avx512f", "avx512bw", "avx512vnni"}, "avx512-vnni"),
                 ("x86-avx2-dot", "x86-avx2-winograd", AVX2_CPU, {"avx2"}, "avx2-madd")]


def winograd_section(rounds: int, log=print, widths=((2, 2), (4, 4)), low: float = 0.75) -> list[dict]:
    """ResNet-18's stride-1 3x3 convs as the low group of a 75 %-low layer (3/4 of the
    input channels, every output channel) at low widths: the int8-dot kernel against
    integer Winograd, for this host (VNNI, where it has it) and as an AVX2 build,
    interleaved. GOP/s and %peak count the direct convolution's MACs, so Winograd's
    may pass 100 % of the primitive's peak."""
    from soniq_tvm.qop import QOp
    from soniq_tvm.schedules import registry
    from soniq_tvm.schedules.cpu import _isa

    hostf = _isa.host_features()
    rng = np.random.default_rng(0)
    peaks = int8_peaks()
    timers, meta = {}, {}
    for (c, hw), (wb, ab) in itertools.product(RESNET_3X3, widths):
        cin = int(c * low)
        op = QOp("conv2d", f"{cin}->{c}@{hw}", (1, cin, hw, hw), (c, cin, 3, 3), (wb,) * cin, (ab,) * cin,
                 padding=(1, 1, 1, 1))
        for dot, wino, mcpu, need, mode in WINOGRAD_RUNS:
            if not need <= hostf:
                continue
            target = _target(mcpu)
            for name in (dot, wino):
                fam = registry.get(name)
                timer, exact, _ = _kernel_timer(fam, registry.with_target_knobs(fam, op, target), target, rng)
                timers[(name, op.layer, wb, ab)] = timer
                meta[(name, op.layer, wb, ab)] = (op, exact, mode, fam.cost(op, target))
    med = _interleave(timers, rounds)
    log(f"ResNet-18 3x3 convs, {int(low * 100)} % low group, medians of {rounds} interleaved rounds "
        "(GOP/s: direct-conv MACs)")
    log(f"{'conv':14} {'w,a':5} {'family':20} {'us':>8} {'GOP/s':>7} {'%peak':>6} {'x dot':>6} {'cost':>9} exact")
    rows = []
    for (name, layer, wb, ab), t in med.items():
        op, exact, mode, cost = meta[(name, layer, wb, ab)]
        dot = next(d for d, w, *_ in WINOGRAD_RUNS if name in (d, w))
        ref = med[(dot, layer, wb, ab)]
        gops = 2 * op.macs / t / 1e9
        pct = 100 * gops / (2 * peaks[mode]) if mode in peaks else float("nan")
        rows.append({"conv": layer, "w": wb, "a": ab, "family": name, "us": t * 1e6, "gops": gops, "pct_peak": pct,
                     "x_dot": t / ref, "cost": cost, "exact": exact})
        log(f"{layer:14} {wb},{ab:<3} {name:20} {t * 1e6:8.1f} {gops:7.1f} {pct:5.0f}% {t / ref:6.2f} {cost:9.0f} "
            f"{exact}")
    return rows


# ResNet-18's distinct conv shapes: (name, cin, cout, input size, kernel, stride, padding)
RESNET_CONVS = [("stem 7x7/2", 3, 64, 224, 7, 2, 3),
                ("3x3 @56", 64, 64, 56, 3, 1, 1), ("3x3/2 56->28", 64, 128, 56, 3, 2, 1),
                ("1x1/2 56->28", 64, 128, 56, 1, 2, 0), ("3x3 @28", 128, 128, 28, 3, 1, 1),
                ("3x3/2 28->14", 128, 256, 28, 3, 2, 1), ("1x1/2 28->14", 128, 256, 28, 1, 2, 0),
                ("3x3 @14", 256, 256, 14, 3, 1, 1), ("3x3/2 14->7", 256, 512, 14, 3, 2, 1),
                ("1x1/2 14->7", 256, 512, 14, 1, 2, 0), ("3x3 @7", 512, 512, 7, 3, 1, 1)]
RESNET_GOALS = {"3x3": 85.0, "other": 70.0}  # #19: % of the int8 dot peak


def resnet18_section(rounds: int, log=print, bits: int = 8, convs=RESNET_CONVS) -> list[dict]:
    """Every distinct ResNet-18 conv at 8 bits on the int8-dot family of this host
    (VNNI) and of an AVX2 build, interleaved: us, GOP/s and share of the int8 dot
    peak (``benchmarks.peak``, same process) against #19's goals (3x3 stride-1
    convs 85 %, the stem, strided and 1x1 convs 70 %)."""
    from soniq_tvm.qop import QOp
    from soniq_tvm.schedules import registry
    from soniq_tvm.schedules.cpu import _isa

    hostf = _isa.host_features()
    rng = np.random.default_rng(0)
    peaks = int8_peaks()
    timers, meta = {}, {}
    for name, cin, cout, hw, k, stride, pad in convs:
        op = QOp("conv2d", name, (1, cin, hw, hw), (cout, cin, k, k), (bits,) * cin, (bits,) * cin,
                 padding=(pad,) * 4, strides=(stride, stride))
        for dot, _wino, mcpu, need, mode in WINOGRAD_RUNS:
            if not need <= hostf:
                continue
            target = _target(mcpu)
            fam = registry.get(dot)
            o = registry.with_target_knobs(fam, op, target)
            if fam.cost(o, target) is None:
                continue
            timer, exact, _ = _kernel_timer(fam, o, target, rng)
            timers[(dot, name)], meta[(dot, name)] = timer, (op, exact, mode)
    med = _interleave(timers, rounds)
    log(f"ResNet-18 convs at {bits} bits, int8-dot families, medians of {rounds} interleaved rounds, "
        f"{THREADS} threads; peak: " + ", ".join(f"{m} {2 * g:.0f} GOP/s" for m, g in peaks.items()))
    log(f"{'conv':14} {'family':16} {'us':>8} {'GOP/s':>7} {'%peak':>6} {'goal':>5} exact")
    rows = []
    for (fam, name), t in med.items():
        op, exact, mode = meta[(fam, name)]
        gops = 2 * op.macs / t / 1e9
        pct = 100 * gops / (2 * peaks[mode]) if mode in peaks else float("nan")
        goal = RESNET_GOALS["3x3" if name.startswith("3x3 @") else "other"]
        rows.append({"conv": name, "family": fam, "us": t * 1e6, "gops": gops, "pct_peak": pct, "goal": goal,
                     "exact": exact})
        log(f"{name:14} {fam:16} {t * 1e6:8.1f} {gops:7.1f} {pct:5.0f}% {goal:4.0f}% {exact}")
    return rows


ATTENTION = [(4, 128, 64, 128, "int8"), (4, 128, 128, 64, "uint8")]  # (heads, m, k, n, a codes)


def _generic_int32_matmul(bt, m, k, n, target):
    """The int32 batched matmul as the graph holds it without a dot-product
    kernel, scheduled by the default ``Matmul`` rule."""
    import tvm
    from tvm import te

    from soniq_tvm import tvm_shim as tv
    from soniq_tvm.schedules.cpu.generic import default_rules

    a = te.placeholder((bt, m, k), "int32", name="A")
    b = te.placeholder((bt, k, n), "int32", name="B")
    r = te.reduce_axis((0, k), "k")
    c = te.compute((bt, m, n), lambda t, i, j: te.sum(a[t, i, r] * b[t, r, j], axis=r), name="matmul")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b, c]).with_attr("global_symbol", "main")})
    with target:
        mod = tv.dlight.ApplyDefaultSchedule(*default_rules())(mod)
    return tvm.compile(mod, target=target)


def attention_section(rounds: int, log=print) -> list[dict]:
    """Act-dot kernel vs the generic int32 matmul on attention shapes: on this
    host's instruction (VNNI or AVX2) and, on a VNNI host, on AVX2 too."""
    import tvm

    from soniq_tvm import tvm_shim as tv
    from soniq_tvm.schedules.cpu import _isa, actdot

    hostf = _isa.host_features()
    targets = [None] + ([AVX2_CPU] if "avx512vnni" in hostf else [])
    if "avx2" not in hostf:
        log("attention: this host has no AVX2, nothing to time")
        return []
    peaks = primitive_peaks(log=lambda s: None)
    rng = np.random.default_rng(0)
    rows = []
    log(f"{'shape':18} {'kernel':26} {'us':>8} {'GMAC/s':>8} {'%prim':>6} {'x generic':>9} exact")
    for bt, m, k, n, ad in ATTENTION:
        spec = actdot.ActMatmul(bt, m, k, n, ad, "int8")
        info = np.iinfo(ad)
        a = rng.integers(info.min, int(info.max) + 1, (bt, m, k)).astype(ad)
        b = rng.integers(-128, 128, (bt, k, n)).astype("int8")
        ref = actdot.reference(a, b)
        timers, meta = {}, {}
        for mcpu in targets:
            target = _target(mcpu)
            mode = actdot.mode_for(spec, target).name
            runs = {f"actdot {mode}": (tvm.compile(tvm.IRModule({"main": actdot.act_matmul(spec, target)}),
                                                   target=target), [tv.tensor(a), tv.tensor(b)], mode),
                    f"generic int32 {mcpu or 'host'}": (_generic_int32_matmul(bt, m, k, n, target),
                                                        [tv.tensor(a.astype("int32")),
                                                         tv.tensor(b.astype("int32"))], mode)}
            for name, (lib, args, mode_name) in runs.items():
                out = tvm.runtime.empty((bt, m, n), "int32")
                lib["main"](*args, out)
                meta[name] = (bool(np.array_equal(out.numpy(), ref)), mode_name, f"generic int32 {mcpu or 'host'}")
                timers[name] = (lambda lib=lib, args=args, out=out:
                                lib.mod.time_evaluator("main", tvm.cpu(), number=200, repeat=1)(*args, out).median)
        med = _interleave(timers, rounds)
        for name, t in med.items():
            exact, mode_name, generic = meta[name]
            gmacs = spec.macs / t / 1e9
            peak = peaks.get(mode_name) if name.startswith("actdot") else None
            row = {"shape": f"{bt}x{m}x{k}x{n} {ad}", "kernel": name, "us": t * 1e6, "gmacs": gmacs,
                   "pct_prim": 100 * gmacs / peak if peak else None, "x_generic": t / med[generic], "exact": exact}
            rows.append(row)
            pct = f"{row['pct_prim']:5.0f}%" if peak else "     -"
            log(f"{row['shape']:18} {name:26} {t * 1e6:8.2f} {gmacs:8.1f} {pct} {row['x_generic']:9.2f} {exact}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer bit widths, no bitplane-ref baseline")
    ap.add_argument("--sections", default="families,gemv,conv,depthwise,attention,winograd,resnet18",
                    help="comma-separated: families, gemv, conv, depthwise, attention, winograd, resnet18")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the gemv/conv/depthwise tables")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
    sections = set(args.sections.split(","))
    rounds = 5 if args.quick else args.rounds
    if "gemv" in sections:
        gemv_section(rounds, with_ref=not args.quick)
    if "conv" in sections:
        conv_section(rounds)
    if "depthwise" in sections:
        depthwise_section(max(3, rounds // 3))
    if "attention" in sections:
        attention_section(rounds)
    if "winograd" in sections:
        winograd_section(rounds)
    if "resnet18" in sections:
        resnet18_section(rounds)
    if "families" not in sections:
        return 0
    import tvm

    from soniq_tvm import tvm_shim as tv
    from soniq_tvm.schedules import registry
    from soniq_tvm.schedules.cpu import _isa
    from soniq_tvm.schedules.cpu.bitserial import weight_planes

    peaks = primitive_peaks()
    print("primitive peaks (GOP/s, 2 threads): " + ", ".join(f"{k} {2 * v:.0f}" for k, v in peaks.items()))
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": AVX2_CPU, "num-cores": THREADS})
    host = tvm.target.Target({"kind": "llvm", "mcpu": tv.host_cpu(), "num-cores": THREADS})
    hostf = _isa.host_features()
    runs = [("x86-avx2-dot", avx2, {}), ("cpu-bitserial", avx2, {}), ("x86-avx2-lowbit", avx2, {})]
    if {"avx512f", "avx512bw", "avx512vnni"} <= hostf:
        runs += [("x86-avx512-vnni", host, {}), ("x86-avx512-lowbit", host, {})]
    if "avxvnni" in hostf:
        runs.append(("x86-avxvnni-lowbit", host, {}))
    if {"avx512vpopcntdq", "avx512vl"} <= hostf:
        runs.append(("cpu-bitserial", host, {}))
    pairs = [(8, 8), (4, 4), (1, 1)] if args.quick else [(8, 8), (7, 8), (4, 8), (4, 4), (2, 2), (1, 2), (1, 1)]
    rng = np.random.default_rng(0)
    print(f"{'op':9} {'w,a':5} {'family':16} {'mode/isa':14} {'us':>9} {'GOP/s':>8} {'peak':>6} {'%peak':>6} "
          f"{'x ref':>6} exact")
    for wa in pairs:
        for op in _ops(wa):
            ref_t = None
            if not args.quick and wa == (4, 4):
                ref_t, _ = bench_family(registry.get("bitplane-ref"), op, avx2, rng, number=1)
                print(f"{op.layer:9} {wa[0]},{wa[1]:<3} {'bitplane-ref':16} {'-':14} {ref_t * 1e6:9.0f} "
                      f"{2 * op.macs / ref_t / 1e9:8.1f}")
            for name, target, knobs in runs:
                fam = registry.get(name)
                if fam.cost(op, target) is None:
                    continue
                # no knobs: those the compiler's pack phase sets for this target (e.g. pixel lanes, zmm)
                o = registry.with_target_knobs(fam, op.with_(knobs=knobs) if knobs else op, target)
                t, exact = bench_family(fam, o, target, rng)
                if name == "cpu-bitserial":
                    isa = "avx512" if target is host else "avx2"
                    mode, unit = f"bitserial-{isa}", op.a_bit * len(weight_planes(op))
                elif name.endswith("-lowbit"):
                    mode, unit = f"lowbit-{fam.mode.name}", 1
                else:
                    mode, unit = fam.mode(op).name, 1
                gops = 2 * op.macs / t / 1e9
                peak = 2 * peaks.get(mode, float("nan"))
                frac = 100 * gops * unit / peak
                speedup = f"{ref_t / t:6.0f}" if ref_t else "     -"
                print(f"{op.layer:9} {wa[0]},{wa[1]:<3} {name:16} {mode:14} {t * 1e6:9.0f} {gops:8.1f} {peak:6.0f} "
                      f"{frac:5.0f}% {speedup} {exact}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
