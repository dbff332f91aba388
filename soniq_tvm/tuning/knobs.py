"""The search space of an integer kernel: (family, knobs) candidates.

A family builds a different PrimFunc for each knob setting (tile sizes, vector
width, int16 chunking) and may change its weight layout with them, so these
kernels are tuned by enumerating settings and measuring each, not by replaying
MetaSchedule traces. For one :class:`~soniq_tvm.qop.QOp`:

* every registered family whose ``cost`` accepts it on the target takes part
  (the ``*-ref`` reference families only when they are the untuned choice);
* a family with ``knob_space(op, target) -> {name: [values]}`` contributes its
  default (``knobs={}``) and every combination of the listed values that its
  ``knobs(op)`` accepts (families check combined constraints there), with
  duplicates of the default removed; a family without ``knob_space`` contributes
  its default only;
* the order: the untuned choice (:func:`~soniq_tvm.schedules.registry.select`)
  first, marked ``"default": True``, then the other families' defaults, then the
  remaining settings shuffled with a fixed seed, so a small budget samples the
  whole space evenly and a rerun plans the same list (resuming skips what is
  already in the database).
"""
from __future__ import annotations

import itertools
import random

__all__ = ["candidates", "build_candidate", "applicable_families"]

_MAX_PER_FAMILY = 4096  # cartesian products beyond this are sampled


def applicable_families(op, target) -> list:
    from ..schedules import registry

    fams = []
    for fam in registry.families():
        if fam.name == "int8-ref":  # not a packed family: the passes' placeholder kernel
            continue
        try:
            c = fam.cost(op, target)
        except Exception:  # noqa: BLE001  (a family that cannot judge the op does not take part)
            c = None
        if c is not None:
            fams.append((c, fam))
    return [f for _c, f in sorted(fams, key=lambda cf: cf[0])]


def _effective(fam, op, knobs: dict, target):
    """The knobs the family really uses for ``knobs`` on ``target`` (None: invalid
    setting); ``{}`` means the family's target defaults, as in the pack phase."""
    from ..schedules.registry import with_target_knobs

    trial = with_target_knobs(fam, op.with_(knobs=dict(knobs), family=fam.name), target)
    if hasattr(fam, "knobs"):
        try:
            eff = fam.knobs(trial)
        except Exception:  # noqa: BLE001  (the family's own validation: the setting is invalid)
            return None
        return tuple(sorted((k, v) for k, v in dict(eff).items()))
    return tuple(sorted(knobs.items()))


def candidates(op, target, seed: int = 0) -> list[dict]:
    """All candidates for ``op`` on ``target`` (a ``tvm.target.Target``), in search order."""
    from ..schedules import registry

    fams = applicable_families(op, target)
    if not fams:
        return []
    try:
        default_name = registry.select(op, target).name
    except Exception:  # noqa: BLE001
        default_name = fams[0].name
    # reference families are correctness fallbacks: searched only when they are the choice
    fams = [f for f in fams if not f.name.endswith("-ref") or f.name == default_name]
    firsts, rest = [], []
    rng = random.Random(seed)
    for fam in fams:
        seen = set()
        eff = _effective(fam, op, {}, target)
        base = {"family": fam.name, "knobs": {}}
        if fam.name == default_name:
            base["default"] = True
        if eff is not None:
            seen.add(eff)
            firsts.append(base)
        space = {}
        if hasattr(fam, "knob_space"):
            try:
                space = {k: list(v) for k, v in dict(fam.knob_space(op, target)).items() if list(v)}
            except Exception:  # noqa: BLE001  (a space the family cannot give for this op: defaults only)
                space = {}
        if not space:
            continue
        names = sorted(space)
        combos = list(itertools.product(*(space[n] for n in names)))
        if len(combos) > _MAX_PER_FAMILY:
            combos = rng.sample(combos, _MAX_PER_FAMILY)
        for combo in combos:
            knobs = dict(zip(names, combo))
            try:
                if fam.cost(op.with_(knobs=knobs), target) is None:
                    continue
            except Exception:  # noqa: BLE001
                continue
            eff = _effective(fam, op, knobs, target)
            if eff is None or eff in seen:
                continue
            seen.add(eff)
            rest.append({"family": fam.name, "knobs": _plain(knobs)})
    firsts.sort(key=lambda c: not c.get("default", False))
    rng.shuffle(rest)
    return firsts + rest


def _plain(knobs: dict) -> dict:
    out = {}
    for k, v in knobs.items():
        if hasattr(v, "item"):
            v = v.item()
        out[str(k)] = v
    return out


def build_candidate(op, candidate: dict, target):
    """The candidate's kernel as a module ``{"main": PrimFunc}`` ready to measure."""
    import tvm

    from ..schedules import registry

    fam = registry.get(candidate["family"])
    opk = registry.with_target_knobs(fam, op.with_(family=fam.name, knobs=dict(candidate.get("knobs", {}))), target)
    func = fam.primfunc(opk, target)
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
