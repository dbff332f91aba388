"""Per-family kernel throughput against the machine's primitive peaks:
``python -m benchmarks.kernels [--quick]``.

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
"""
from __future__ import annotations

import argparse
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
    return peaks


def _ops(op):
    from soniq_tvm.qop import QOp

    conv = QOp("conv2d", "conv3x3", (1, 64, 56, 56), (64, 64, 3, 3), (op[0],) * 64, (op[1],) * 64,
               padding=(1, 1, 1, 1))
    gemv = QOp("matmul", "gemv4096", (1, 4096), (4096, 4096), (op[0],) * 4096, (op[1],) * 4096)
    return conv, gemv


def bench_family(fam, op, target, rng, number=10):
    import tvm

    from soniq_tvm import tvm_shim as tv
    from soniq_tvm.qop import reference, weight_range

    lo, hi = weight_range(op.w_bit, op.w_signed)
    w = rng.integers(lo, hi + 1, op.w_shape)
    if op.bipolar:
        w = np.where(w >= 0, 1, -1)
    x = rng.integers(-(1 << (op.a_bit - 1)), 1 << (op.a_bit - 1), op.x_shape).astype(op.a_dtype)
    packed = fam.pack(w, op)
    lib = tvm.compile(fam.primfunc(op, target), target=target)
    out = tvm.runtime.empty(op.out_shape, "int32")
    args = [tv.tensor(x), *[tv.tensor(p) for p in packed], out]
    lib["main"](*args)
    exact = bool(np.array_equal(out.numpy(), reference(x, w, op)))
    t = lib.mod.time_evaluator("main", tvm.cpu(), number=number, repeat=5, min_repeat_ms=50)(*args).median
    return t, exact


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer bit widths, no bitplane-ref baseline")
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
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
    runs = [("x86-avx2-dot", avx2, {}), ("cpu-bitserial", avx2, {})]
    if {"avx512f", "avx512bw", "avx512vnni"} <= hostf:
        runs.append(("x86-avx512-vnni", host, {}))
    if {"avx512vpopcntdq", "avx512vl"} <= hostf:
        runs.append(("cpu-bitserial", host, {"vl": 8}))
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
                o = op.with_(knobs=knobs) if knobs else op
                t, exact = bench_family(fam, o, target, rng)
                if name == "cpu-bitserial":
                    isa = "avx512" if knobs.get("vl") == 8 else "avx2"
                    mode, unit = f"bitserial-{isa}", op.a_bit * len(weight_planes(op))
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
