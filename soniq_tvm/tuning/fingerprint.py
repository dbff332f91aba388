"""Target fingerprints: which hardware a tuning record was measured for.

MetaSchedule's own database looks records up by workload alone (a record tuned
for a CUDA GPU is returned for an x86 query). Ours does not: every record carries
the fingerprint of the target it was measured on, and ``compile`` applies only
records whose fingerprint equals the target's. The fingerprint holds what decides
which code is generated and how fast it runs:

* ``kind`` (llvm, cuda) and ``arch`` (x86_64, aarch64; the CPU architecture);
* ``mcpu`` and the sorted ``mattr`` list, as the target states them;
* ``features``: the ISA features the target actually enables
  (:func:`soniq_tvm.targets.required_features`, LLVM's view of ``mcpu`` + ``mattr``);
* ``gpu_arch``: the CUDA ``arch`` (``sm_80``), empty for CPUs.

``num-cores`` is left out on purpose: a record from a 2-core machine still
describes a valid, usually good, schedule on a 4-core one of the same CPU.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import time

from soniq_tvm import hardware

__all__ = ["FIELDS", "fingerprint", "fingerprint_key", "differences", "describe_fingerprint", "machine_info"]

FIELDS = ("kind", "arch", "mcpu", "mattr", "features", "gpu_arch")


def fingerprint(target) -> dict:
    """The fingerprint of ``target`` (any form :func:`soniq_tvm.targets.parse_target`
    accepts, or an already parsed target dict). Needs TVM (LLVM's feature list)."""
    from .. import targets
    from ..targets import parse_target

    t = target if isinstance(target, dict) and "kind" in target and _is_parsed(target) else parse_target(target)
    kind = t["kind"]
    host = t.get("host") if kind != "llvm" else None
    return {
        "kind": kind,
        "arch": hardware.target_arch(t) if kind == "llvm" else hardware.target_arch(host or {"kind": "llvm"}),
        "mcpu": str(t.get("mcpu", "")),
        "mattr": sorted(str(a) for a in t.get("mattr", []) or []),
        "features": sorted(targets.required_features(t)),
        "gpu_arch": str(t.get("arch", "")) if kind != "llvm" else "",
    }


def _is_parsed(t: dict) -> bool:
    # parse_target fills mcpu (or mtriple) for llvm and arch for cuda
    return t["kind"] != "llvm" or "mcpu" in t or "mtriple" in t


def fingerprint_key(fp: dict) -> str:
    """A short stable id of a fingerprint (16 hex digits of its SHA-256)."""
    text = json.dumps({k: fp.get(k) for k in FIELDS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(record: dict, target: dict) -> list[str]:
    """Why a record measured on ``record`` does not fit ``target`` (empty: it fits)."""
    out = []
    for k in FIELDS:
        a, b = record.get(k), target.get(k)
        if a == b:
            continue
        if isinstance(a, list) or isinstance(b, list):
            a, b = set(a or []), set(b or [])
            parts = []
            if a - b:
                parts.append("record has " + ",".join(sorted(a - b)))
            if b - a:
                parts.append("target has " + ",".join(sorted(b - a)))
            out.append(f"{k}: " + "; ".join(parts))
        else:
            out.append(f"{k} {a or '(none)'} != {b or '(none)'}")
    return out


def describe_fingerprint(fp: dict) -> str:
    """One line, e.g. ``llvm x86_64 mcpu=znver3 (avx2,fma,...)``."""
    parts = [fp.get("kind", "?"), fp.get("arch", "")]
    if fp.get("mcpu"):
        parts.append(f"mcpu={fp['mcpu']}")
    if fp.get("gpu_arch"):
        parts.append(f"arch={fp['gpu_arch']}")
    if fp.get("mattr"):
        parts.append("mattr=" + ",".join(fp["mattr"]))
    text = " ".join(p for p in parts if p)
    if fp.get("features"):
        text += f" [{len(fp['features'])} ISA features]"
    return text


def machine_info() -> dict:
    """Where a measurement ran: host name, CPU model, cores, OS, versions."""
    cpu = hardware.cpu_model()
    info = {
        "host": socket.gethostname(),
        "cpu": cpu or platform.processor(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        from importlib.metadata import version

        info["tvm"] = version("apache-tvm")
    except Exception:  # noqa: BLE001
        pass
    return info
