"""The host's primitive peaks, measured with TVM kernels: ``python -m benchmarks.peak``.

Each kernel is hand-written low-level TIR compiled for this CPU; its inner loop
keeps a tile of accumulators in registers and streams L1-resident operands, so it
measures the arithmetic units, not memory. All run on 2 threads (``T.parallel``
over 2 independent tiles, ``TVM_NUM_THREADS=2``).

* fp32 FMA: 12 independent vector chains ``acc = acc * a + b`` (one FMA = 1 MAC).
* exact int8 dot, AVX2: a 4x3-vector register-blocked GEMM micro-kernel,
  ``vpmaddubsw`` (u8 x s8 -> s16 pairs) + ``vpmaddwd`` with ones (-> s32) + add,
  the guide's ``dot_8x4_avx2`` sequence. Exact while activations are < 128 (the
  s16 pair sum cannot saturate); checked against NumPy.
* exact int8 dot, AVX512-VNNI: the same micro-kernel with ``vpdpbusd`` on zmm
  (u8 full range), when the host has it.
* 1-bit MACs: XOR + popcount over uint64 words (64 bipolar MACs per word;
  ``dot = 64 * words - 2 * popcount``), vectorized over output columns. Built for
  AVX2 (no vector popcount: LLVM's nibble-lookup expansion) and for the host ISA
  (``vpopcntq`` with AVX512-VPOPCNTDQ), when the host has it.
* clock: a dependent chain of ``xor`` + ``add`` (1 cycle each on any x86 core)
  gives the clock the cores actually run at, which under a hypervisor can differ
  from ``cpu MHz`` in /proc/cpuinfo.

Accumulator tiles are declared with ``scope="global"``: TVM 0.27 lowers a small
constant-size allocation to a stack ``alloca`` (which LLVM promotes to registers)
only for that scope; a ``"local"`` buffer goes through ``TVMBackendAllocWorkspace``
and every accumulator update becomes a store (the VNNI kernel ran at half speed).

Figures are MACs: GMAC/s over both threads, GOP/s = 2 x GMAC/s, and MACs per
cycle per core, at the /proc/cpuinfo clock and at the measured clock.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np


THREADS = 2
AVX2_CPU = "x86-64-v3"  # AVX2 + FMA + BMI2 + POPCNT, no AVX-512
CALL_S = 0.2  # target duration of one timed kernel call


@dataclasses.dataclass(frozen=True)
class PeakResult:
    kernel: str
    isa: str
    gmacs: float  # over THREADS threads
    mac_per_cycle_nominal: float  # per core, at /proc/cpuinfo "cpu MHz"
    mac_per_cycle_measured: float  # per core, at the measured clock
    exact: bool | None  # checked against NumPy (None: not an exactness claim)


# --------------------------------------------------------------------------- kernels
def _fma_kernel(lanes: int, chains: int = 12):
    from tvm.script import tirx as T

    P, W = THREADS, chains * lanes

    @T.prim_func
    def fma_peak(X: T.Buffer((P, W), "float32"), n: T.int32):
        for p in T.parallel(P):
            acc = T.decl_buffer((W,), "float32", scope="global")
            for j in T.unroll(chains):
                for v in T.vectorized(lanes):
                    acc[j * lanes + v] = X[p, j * lanes + v]
            for _it in range(n):
                for j in T.unroll(chains):
                    for v in T.vectorized(lanes):
                        acc[j * lanes + v] = acc[j * lanes + v] * T.float32(0.999999) + T.float32(1e-6)
            for j in T.unroll(chains):
                for v in T.vectorized(lanes):
                    X[p, j * lanes + v] = acc[j * lanes + v]

    return fma_peak, W  # MACs per iteration per thread


def _int8_kernel(vnni: bool, mr: int = 4, nb: int = 3, ksteps: int = 256):
    """C[p, m, col] += sum_k A[p, m, k] * B[k, col], B packed [k/4, col-vector, col, 4]."""
    from tvm.script import tirx as T

    P = THREADS
    lanes = 16 if vnni else 8  # int32 accumulator lanes per vector
    vb = lanes * 4  # bytes per operand vector
    K, N = ksteps * 4, nb * lanes
    pmaddubsw = "llvm.x86.avx2.pmadd.ub.sw"
    pmaddwd = "llvm.x86.avx2.pmadd.wd"
    vpdpbusd = "llvm.x86.avx512.vpdpbusd.512"

    if vnni:

        @T.prim_func
        def int8_dot(A: T.Buffer((P, mr, K), "uint8"), B: T.Buffer((P, ksteps, nb * vb), "int8"),
                     C: T.Buffer((P, mr, N), "int32"), n: T.int32):
            for p in T.parallel(P):
                acc = T.decl_buffer((mr * N,), "int32", scope="global")
                for i in T.unroll(mr * nb):
                    for v in T.vectorized(lanes):
                        acc[i * lanes + v] = 0
                for _it in range(n):
                    for ks in range(ksteps):
                        for m in T.unroll(mr):
                            for j in T.unroll(nb):
                                acc[T.ramp((m * nb + j) * lanes, 1, lanes)] = T.call_llvm_pure_intrin(
                                    T.llvm_lookup_intrinsic_id(vpdpbusd),
                                    acc[T.ramp((m * nb + j) * lanes, 1, lanes)],
                                    T.reinterpret(T.broadcast(T.reinterpret(
                                        A.vload([p, m, ks * 4], "uint8x4"), dtype="int32"), lanes),
                                        dtype="uint8x64"),
                                    B.vload([p, ks, j * vb], "int8x64"),
                                    dtype="int32x16")
                for i in T.unroll(mr * nb):  # constant indices keep acc in registers
                    for v in T.vectorized(lanes):
                        C[p, i // nb, (i % nb) * lanes + v] = acc[i * lanes + v]

    else:

        @T.prim_func
        def int8_dot(A: T.Buffer((P, mr, K), "uint8"), B: T.Buffer((P, ksteps, nb * vb), "int8"),
                     C: T.Buffer((P, mr, N), "int32"), n: T.int32):
            for p in T.parallel(P):
                acc = T.decl_buffer((mr * N,), "int32", scope="global")
                for i in T.unroll(mr * nb):
                    for v in T.vectorized(lanes):
                        acc[i * lanes + v] = 0
                for _it in range(n):
                    for ks in range(ksteps):
                        for m in T.unroll(mr):
                            for j in T.unroll(nb):
                                acc[T.ramp((m * nb + j) * lanes, 1, lanes)] = acc[
                                    T.ramp((m * nb + j) * lanes, 1, lanes)
                                ] + T.call_llvm_pure_intrin(
                                    T.llvm_lookup_intrinsic_id(pmaddwd),
                                    T.call_llvm_pure_intrin(
                                        T.llvm_lookup_intrinsic_id(pmaddubsw),
                                        T.reinterpret(T.broadcast(T.reinterpret(
                                            A.vload([p, m, ks * 4], "uint8x4"), dtype="int32"), lanes),
                                            dtype="uint8x32"),
                                        B.vload([p, ks, j * vb], "int8x32"),
                                        dtype="int16x16"),
                                    T.broadcast(T.int16(1), 16),
                                    dtype="int32x8")
                for i in T.unroll(mr * nb):  # constant indices keep acc in registers
                    for v in T.vectorized(lanes):
                        C[p, i // nb, (i % nb) * lanes + v] = acc[i * lanes + v]

    def data(rng):
        a_hi = 256 if vnni else 128  # pmaddubsw: u8 < 128 keeps the s16 pair sum exact
        a = rng.integers(0, a_hi, (P, mr, K), dtype=np.uint8)
        b = rng.integers(-128, 128, (P, K, N), dtype=np.int8)
        # pack B[k, col] as [k/4, col-vector j, col-in-vector, k%4]
        bp = b.reshape(P, ksteps, 4, nb, lanes).transpose(0, 1, 3, 4, 2).reshape(P, ksteps, nb * vb)
        expect = np.einsum("pmk,pkn->pmn", a.astype(np.int64), b.astype(np.int64)).astype(np.int32)
        out = np.zeros((P, mr, N), np.int32)
        return [a, np.ascontiguousarray(bp), out], expect

    return int8_dot, mr * N * K, data


def _popcount_kernel(lanes: int, mr: int = 4, nb: int = 2, words: int = 64):
    """C[p, m, col] = sum_w popcount(A[p, m, w] ^ W[p, w, col]) over uint64 words."""
    from tvm.script import tirx as T

    P, N = THREADS, nb * lanes

    @T.prim_func
    def xor_popcount(A: T.Buffer((P, mr, words), "uint64"), Wt: T.Buffer((P, words, N), "uint64"),
                     C: T.Buffer((P, mr, N), "uint64"), n: T.int32):
        for p in T.parallel(P):
            acc = T.decl_buffer((mr * N,), "uint64", scope="global")
            for i in T.unroll(mr * nb):
                for v in T.vectorized(lanes):
                    acc[i * lanes + v] = T.uint64(0)
            for _it in range(n):
                for w in range(words):
                    for m in T.unroll(mr):
                        for j in T.unroll(nb):
                            for v in T.vectorized(lanes):
                                acc[(m * nb + j) * lanes + v] = acc[(m * nb + j) * lanes + v] + T.popcount(
                                    A[p, m, w] ^ Wt[p, w, j * lanes + v])
            for i in T.unroll(mr * nb):  # constant indices keep acc in registers
                for v in T.vectorized(lanes):
                    C[p, i // nb, (i % nb) * lanes + v] = acc[i * lanes + v]

    def data(rng):
        a = rng.integers(0, 2**64, (P, mr, words), dtype=np.uint64)
        w = rng.integers(0, 2**64, (P, words, N), dtype=np.uint64)
        x = a[:, :, :, None] ^ w[:, None, :, :]  # [P, mr, words, N]
        expect = np.bitwise_count(x).sum(axis=2, dtype=np.uint64)
        return [a, w, np.zeros((P, mr, N), np.uint64)], expect

    return xor_popcount, mr * N * words * 64, data


def _clock_kernel(steps: int = 16):
    from tvm.script import tirx as T

    P = THREADS

    @T.prim_func
    def xor_add_chain(Y: T.Buffer((P, steps), "uint64"), out: T.Buffer((P,), "uint64"), n: T.int32):
        for p in T.parallel(P):
            x = T.decl_buffer((1,), "uint64", scope="global")
            x[0] = Y[p, 0]
            for _it in range(n):
                for k in T.unroll(steps):
                    x[0] = (x[0] ^ Y[p, k]) + T.uint64(1)
            out[p] = x[0]

    return xor_add_chain, 2 * steps  # cycles per iteration (xor 1 + add 1)


# --------------------------------------------------------------------------- harness
def _target(mcpu: str):
    import tvm

    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": THREADS})


def _timed(fn: Callable[[int], None], per_iter_work: float, calls: int = 7) -> float:
    """Best work per second of ``fn(n)`` over ``calls`` calls, ``n`` sized so a call takes ~CALL_S.

    A peak is a capability, so the fastest call counts (other processes on a shared
    machine only ever slow a call down).
    """
    n = 1000
    while True:
        t0 = time.perf_counter()
        fn(n)
        dt = time.perf_counter() - t0
        if dt > CALL_S / 4 or n > 1 << 30:
            break
        n *= 4
    n = max(1, int(n * CALL_S / dt))
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return per_iter_work * n / best


def _host_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def nominal_mhz() -> float | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.partition(":")[2])
    except (OSError, ValueError):
        pass
    return None


def measure_clock_hz(host_cpu: str) -> float:
    import tvm

    func, cycles_per_iter = _clock_kernel()
    f = tvm.compile(func, target=_target(host_cpu))["xor_add_chain"]
    y = tvm.runtime.tensor(np.arange(THREADS * 16, dtype=np.uint64).reshape(THREADS, 16))
    out = tvm.runtime.empty((THREADS,), "uint64")
    # the threads run their chains side by side: wall time = n * cycles_per_iter / clock
    return _timed(lambda n: f(y, out, n), cycles_per_iter)


def run_peaks(log: Callable[[str], None] = print) -> dict:
    os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))  # TVM defaults to half the cores
    import tvm

    host = tvm.target.codegen.llvm_get_system_cpu()
    flags = _host_flags()
    clock_hz = measure_clock_hz(host)
    mhz = nominal_mhz()
    log(f"host mcpu {host}; clock: /proc/cpuinfo {mhz} MHz, measured {clock_hz / 1e6:.0f} MHz; "
        f"load average {os.getloadavg()[0]:.2f} (other processes lower every figure)")
    rng = np.random.default_rng(0)
    results: list[PeakResult] = []

    def record(kernel: str, isa: str, macs_per_s: float, exact: bool | None) -> None:
        per_core = macs_per_s / THREADS
        r = PeakResult(kernel, isa, macs_per_s / 1e9,
                       per_core / (mhz * 1e6) if mhz else float("nan"), per_core / clock_hz, exact)
        results.append(r)
        log(f"  {kernel} [{isa}]: {r.gmacs:.1f} GMAC/s")

    # fp32 FMA
    fma_cases = [("AVX2 ymm", AVX2_CPU, 8)]
    if "avx512f" in flags:
        fma_cases.append((f"AVX-512 zmm ({host})", host, 16))
    for isa, cpu, lanes in fma_cases:
        func, macs = _fma_kernel(lanes)
        f = tvm.compile(func, target=_target(cpu))["fma_peak"]
        x = tvm.runtime.tensor(np.ones((THREADS, macs), np.float32))
        record("fp32 FMA", isa, _timed(lambda n: f(x, n), THREADS * macs), None)

    # exact int8 dot
    int8_cases = [("AVX2 vpmaddubsw+vpmaddwd", AVX2_CPU, False)]
    if "avx512_vnni" in flags:
        int8_cases.append(("AVX512-VNNI vpdpbusd zmm", host, True))
    for isa, cpu, vnni in int8_cases:
        func, macs, data = _int8_kernel(vnni)
        f = tvm.compile(func, target=_target(cpu))["int8_dot"]
        arrays, expect = data(rng)
        args = [tvm.runtime.tensor(a) for a in arrays]
        f(*args, 1)
        exact = bool(np.array_equal(args[-1].numpy(), expect))
        record("int8 dot (exact)", isa, _timed(lambda n: f(*args, n), THREADS * macs), exact)

    # 1-bit MACs
    pop_cases = [("AVX2 xor+popcount (nibble LUT)", AVX2_CPU, 4)]
    if "avx512_vpopcntdq" in flags:
        pop_cases.append(("AVX512 xor+vpopcntq zmm", host, 8))
    for isa, cpu, lanes in pop_cases:
        func, macs, data = _popcount_kernel(lanes)
        f = tvm.compile(func, target=_target(cpu))["xor_popcount"]
        arrays, expect = data(rng)
        args = [tvm.runtime.tensor(a) for a in arrays]
        f(*args, 1)
        exact = bool(np.array_equal(args[-1].numpy(), expect))
        record("1-bit MAC", isa, _timed(lambda n: f(*args, n), THREADS * macs), exact)

    return {
        "host_mcpu": host,
        "threads": THREADS,
        "cpu_mhz_proc": mhz,
        "cpu_mhz_measured": clock_hz / 1e6,
        "peaks": [dataclasses.asdict(r) for r in results],
    }


def format_peaks(res: dict) -> str:
    header = ("kernel", "ISA", "GMAC/s", "GOP/s", "MAC/cyc/core @proc", "MAC/cyc/core @meas", "exact")
    rows = [
        (p["kernel"], p["isa"], f"{p['gmacs']:.1f}", f"{2 * p['gmacs']:.1f}",
         f"{p['mac_per_cycle_nominal']:.1f}", f"{p['mac_per_cycle_measured']:.1f}",
         "" if p["exact"] is None else ("yes" if p["exact"] else "NO"))
        for p in res["peaks"]
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    title = (f"{res['threads']} threads, mcpu {res['host_mcpu']}; clock {res['cpu_mhz_proc']} MHz "
             f"(/proc/cpuinfo), {res['cpu_mhz_measured']:.0f} MHz (measured); 1 MAC = 2 ops")
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peak", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    res = run_peaks()
    print()
    print(format_peaks(res))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
