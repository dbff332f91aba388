"""Target parsing: legacy CLI strings, dicts and ``tvm.target.Target``.

TVM 0.27 accepts only dicts (or JSON); users still write
``"llvm -mcpu=skylake-avx512 -mattr=+avx512f"``. :func:`parse_target` turns every
accepted form into a target dict, checking each option against the target kind's
schema so that a typo is an error naming it. ``"llvm"`` alone means this host's
CPU (its ``mcpu`` is filled in) so that untuned code uses the host's vector units.
"""
from __future__ import annotations

import json
import shlex

from . import hardware
from .errors import TargetError

__all__ = ["parse_target", "to_tvm_target", "describe", "required_features"]

_ALIASES = {"x86": "llvm", "cpu": "llvm", "arm": "llvm"}


def parse_target(target) -> dict:
    """A normalised target dict from a string, JSON string, dict or Target."""
    from tvm.target import Target, TargetKind

    if isinstance(target, Target):
        d = dict(json.loads(json.dumps(_target_to_dict(target))))
    elif isinstance(target, dict):
        d = dict(target)
    elif isinstance(target, str):
        text = target.strip()
        if not text:
            raise TargetError("empty target string", hint='try "llvm" or "llvm -mcpu=znver3"')
        if text.startswith("{"):
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                raise TargetError(f"target JSON is not valid: {e}") from None
        else:
            d = _from_cli(text, TargetKind)
    else:
        raise TargetError(f"target must be a string, dict or tvm.target.Target, not {type(target).__name__}")
    kind = d.get("kind")
    if not _kind_exists(kind, TargetKind):
        raise TargetError(f"unknown target kind {kind!r}", hint="use llvm (CPUs) or cuda")
    schema = TargetKind.options_from_name(kind)
    for key in d:
        if key not in schema and key not in ("kind", "host", "tag"):
            raise TargetError(f"target kind {kind!r} has no option {key!r}",
                              hint=f"valid options: {', '.join(sorted(schema))}")
    if kind == "llvm" and "mcpu" not in d and "mtriple" not in d:
        d["mcpu"] = _host_cpu()
        masked = _masked_host_features(d)
        if masked:
            d["mattr"] = list(d.get("mattr", [])) + masked
    if kind == "llvm" and "num-cores" not in d and "mtriple" not in d:
        d["num-cores"] = _host_cores()
    if kind == "cuda" and "arch" not in d:
        raise TargetError("cuda target without arch", hint='add -arch, e.g. "cuda -arch=sm_80"')
    if kind == "cuda" and "host" not in d:
        d["host"] = {"kind": "llvm", "mcpu": _host_cpu()}
    to_tvm_target(d)  # validates values (unknown mcpu, bad types)
    return d


def _from_cli(text: str, TargetKind) -> dict:
    kind, *rest = shlex.split(text)
    kind = _ALIASES.get(kind, kind)
    if not _kind_exists(kind, TargetKind):
        raise TargetError(f"unknown target kind {kind!r} in {text!r}", hint="use llvm (CPUs) or cuda")
    schema = TargetKind.options_from_name(kind)
    d: dict = {"kind": kind}
    for tok in rest:
        if not tok.startswith("-"):
            raise TargetError(f"target option {tok!r} in {text!r} does not start with '-'")
        key, eq, val = tok.lstrip("-").partition("=")
        if key not in schema:
            raise TargetError(f"target kind {kind!r} has no option {key!r} (in {text!r})",
                              hint=f"valid options: {', '.join(sorted(schema))}")
        ty = str(schema[key])
        if not eq:
            d[key] = True
        elif ty.startswith("Array") or ty.startswith("ffi.Array"):
            d[key] = [v for v in val.split(",") if v]
        elif ty in ("int", "int64_t", "IntImm"):
            try:
                d[key] = int(val)
            except ValueError:
                raise TargetError(f"target option {key!r} needs an integer, got {val!r}") from None
        elif ty == "bool":
            d[key] = val.lower() in ("1", "true", "yes")
        else:
            d[key] = val
    return d


def _kind_exists(kind, TargetKind) -> bool:
    if not isinstance(kind, str):
        return False
    try:
        TargetKind.options_from_name(kind)
    except Exception:  # noqa: BLE001  (TVM: "Back optional access")
        return False
    return True


def to_tvm_target(d: dict):
    """``tvm.target.Target`` of a parsed dict (with its host for GPU kinds)."""
    from tvm.target import Target

    body = {k: v for k, v in d.items() if k != "host"}
    try:
        if "host" in d:
            return Target(body, host=d["host"])
        return Target(body)
    except Exception as e:  # noqa: BLE001  (TVM raises several error types)
        raise TargetError(f"TVM rejects target {json.dumps(d)}: {str(e).splitlines()[0]}") from None


def _target_to_dict(target) -> dict:
    d = json.loads(str(target)) if str(target).startswith("{") else {"kind": target.kind.name}
    d.pop("tag", None)
    d.pop("keys", None)
    for k in [k for k in d if k.startswith("feature.")]:
        d.pop(k)
    return d


def _host_cpu() -> str:
    from . import tvm_shim

    return tvm_shim.host_cpu()


def _masked_host_features(d: dict) -> list[str]:
    """Features LLVM assumes for the host CPU model that this (virtual) CPU lacks."""
    from . import tvm_shim

    return hardware.host_safe_mattr(tvm_shim.llvm_cpu_features(to_tvm_target(d)))


def _host_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def required_features(target: dict) -> list[str]:
    """The ISA features (of :data:`hardware.TRACKED`) an llvm target dict enables,
    as LLVM sees its ``mcpu`` + ``mattr`` (needs TVM: compile time only)."""
    if target.get("kind") != "llvm" or hardware.target_arch(target) != "x86_64":
        return []
    from . import tvm_shim

    enabled = set(tvm_shim.llvm_cpu_features(to_tvm_target(target)))
    return sorted(f for f in hardware.TRACKED if f in enabled)


def describe(d: dict) -> str:
    """One line: ``llvm mcpu=znver3 mattr=+avx2``."""
    parts = [d["kind"]] + [f"{k}={','.join(v) if isinstance(v, list) else v}"
                           for k, v in sorted(d.items()) if k not in ("kind", "host")]
    return " ".join(parts)
