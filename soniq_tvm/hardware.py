"""What the code needs and what this machine has, without importing TVM.

Compiled CPU code may use instructions the loading machine lacks (an AVX-512
artifact on an AVX2 host): running it would kill the process with SIGILL. The
compiler records the ISA features a module needs
(:func:`soniq_tvm.targets.required_features`, at compile time, with LLVM's help);
the loader compares them with :func:`host_features` and refuses with a clear error
instead. This module imports nothing of the package (targets depend on it, not the
other way round).
"""
from __future__ import annotations

import os

import functools
import platform

__all__ = ["host_arch", "host_features", "missing_features", "target_arch", "TRACKED"]

# LLVM feature name -> /proc/cpuinfo flag (x86). Features worth refusing on.
TRACKED = {
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt", "avx": "avx", "avx2": "avx2",
    "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512bitalg": "avx512_bitalg", "avx512vbmi": "avx512vbmi", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
}


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


@functools.lru_cache(maxsize=1)
def host_features() -> frozenset[str]:
    """LLVM names of the tracked features this CPU reports (x86 Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return frozenset()
    have = set(flags)
    return frozenset(llvm for llvm, linux in TRACKED.items() if linux in have)


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def physical_cores() -> int:
    """Cores this process may run on, one per physical core (SMT siblings count once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    cores, cpu, seen_any = set(), None, False
    try:
        with open("/proc/cpuinfo") as f:
            info = {}
            for line in f.read().splitlines() + [""]:
                if not line.strip():
                    if "processor" in info and int(info["processor"]) in allowed:
                        seen_any = True
                        cores.add((info.get("physical id", "0"), info.get("core id", info["processor"])))
                    info = {}
                    continue
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return len(cores) if seen_any and cores else max(1, len(allowed))


def use_all_cores() -> int:
    """Make TVM's thread pool use every physical core unless ``TVM_NUM_THREADS``
    says otherwise (TVM's own default is half the logical CPUs, one thread on a
    2-core machine without SMT). Must run before the pool starts; returns the count."""
    n = os.environ.get("TVM_NUM_THREADS")
    if n is None:
        n = str(physical_cores())
        os.environ["TVM_NUM_THREADS"] = n
    return int(n)


def target_arch(target: dict) -> str:
    triple = target.get("mtriple", "")
    if triple:
        return triple.split("-")[0].replace("arm64", "aarch64")
    return host_arch() if target.get("kind") == "llvm" else target.get("kind", "")


def missing_features(required: list[str]) -> list[str]:
    have = host_features()
    return [f for f in required if f not in have]


def host_safe_mattr(mcpu_features: list[str]) -> list[str]:
    """``-feature`` entries for tracked features LLVM assumes for the host CPU
    but /proc/cpuinfo does not report (masked by a hypervisor)."""
    have = host_features()
    if not have:
        return []
    return [f"-{f}" for f in mcpu_features if f in TRACKED and f not in have]
