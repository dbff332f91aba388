"""Applying a tuning database while compiling: only records that fit the target.

:class:`TunedSchedules` reads a database once and answers the compiler:

* ``knobs_for(op)`` (called by the pack pass for every integer kernel): the
  fastest (family, knobs) measured for this kernel's workload on a target with
  the same fingerprint, or ``None`` (the untuned choice stays);
* ``schedule_pass()`` (run by the build pipeline after TVM's legalisation and
  fusion, before the default schedules): applies the fastest MetaSchedule trace
  of every PrimFunc whose workload was tuned for this fingerprint, and leaves
  functions whose fastest measurement was the default schedule to it.

Records of the model's workloads measured for another fingerprint are skipped,
each with the reason (``mcpu znver3 != skylake-avx512``): reported as a
:class:`TuningWarning`, in the plan's notes and in the manifest, and, with
``strict=True``, raised as :class:`~soniq_tvm.errors.TuningDatabaseError`. So
are records that no longer fit the code (a family that is gone or now rejects
the kernel or its knobs).
"""
from __future__ import annotations

import json
import warnings
from collections import defaultdict

from ..errors import TuningDatabaseError
from .database import TuningDatabase
from .fingerprint import describe_fingerprint, differences, fingerprint, fingerprint_key
from .workloads import is_tunable_primfunc, ms_key, qop_key

__all__ = ["TunedSchedules", "TuningWarning"]


class TuningWarning(UserWarning):
    """Tuning records were found for the model but not applied (and why)."""


class TunedSchedules:
    """The records of ``database`` that fit ``target`` (a parsed target dict)."""

    def __init__(self, database, target: dict, *, strict: bool = False):
        from ..targets import to_tvm_target

        self.path = str(database)
        self.strict = strict
        self.target = target
        self.tvm_target = to_tvm_target(target)
        self.fp = fingerprint(target)
        self.fp_key = fingerprint_key(self.fp)
        with TuningDatabase(self.path, create=False) as db:
            self.workloads = {w.key: w for w in db.workloads()}
            records = db.records()
        self._fit = defaultdict(list)  # workload -> successful records for this fingerprint, fastest first
        self._foreign = defaultdict(dict)  # workload -> {fingerprint key: fingerprint}
        for r in records:
            if r.fingerprint_key == self.fp_key:
                if r.ok:
                    self._fit[r.workload].append(r)
            else:
                self._foreign[r.workload][r.fingerprint_key] = r.fingerprint
        for recs in self._fit.values():
            recs.sort(key=lambda r: r.latency_us)
        self.applied: list[dict] = []
        self.skipped: list[dict] = []
        self._seen: set[tuple[str, str]] = set()
        self._warned = 0

    # ---- integer kernels (pack phase) ------------------------------------------------
    def knobs_for(self, op) -> tuple[str, dict] | None:
        """(family name, knobs) for ``op``, or None to keep the untuned choice."""
        from .knobs import _effective
        from ..schedules import registry

        key = qop_key(op)
        where = op.layer + ("" if op.group < 0 else f"[g{op.group}]")
        why = None
        for rec in self._fit.get(key, []):
            cand = rec.candidate
            try:
                fam = registry.get(cand["family"])
            except KeyError:
                why = why or f"family {cand['family']!r} is not registered"
                continue
            knobs = dict(cand.get("knobs", {}))
            try:
                ok = fam.cost(op.with_(knobs=knobs), self.tvm_target) is not None
            except Exception:  # noqa: BLE001
                ok = False
            if not ok or _effective(fam, op, knobs, self.tvm_target) is None:
                why = why or f"family {fam.name} no longer accepts this kernel with knobs {knobs}"
                continue
            self._note_applied(key, where, "qop", rec, f"{fam.name} {knobs or '(default knobs)'}")
            return fam.name, knobs
        if why is not None:
            self._note_skipped(key, where, why)
        elif key in self._foreign:
            self._note_foreign(key, where)
        return None

    # ---- everything else (MetaSchedule, build phase) --------------------------------
    @property
    def has_ms(self) -> bool:
        return any(k.startswith("ms:") for k in list(self._fit) + list(self._foreign))

    def schedule_pass(self):
        """A module pass applying the fitting MetaSchedule records (see module doc)."""
        import tvm

        @tvm.transform.module_pass(opt_level=0, name="soniq.ApplyTunedSchedules")
        def _apply(mod, _ctx):
            return self._apply_ms(mod)

        return _apply

    def _apply_ms(self, mod):
        import tvm
        from tvm import relax
        from tvm.s_tir import meta_schedule as ms

        chosen = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc) or not is_tunable_primfunc(func):
                continue
            key = ms_key(func)
            recs = self._fit.get(key, [])
            if recs:
                best = recs[0]
                if best.candidate.get("schedule") == "default":
                    self._note_applied(key, gv.name_hint, "ms", best, "default schedule (fastest measured)")
                else:
                    chosen[key] = (gv.name_hint, best)
            elif key in self._foreign:
                self._note_foreign(key, gv.name_hint)
        if not chosen:
            return mod
        db = ms.database.MemoryDatabase()
        for key, (name, rec) in chosen.items():
            body = self.workloads[key].body
            wl = db.commit_workload(tvm.ir.load_json(body["mod"]))
            c = rec.candidate
            try:
                db.commit_tuning_record(ms.database.TuningRecord.from_json(
                    [c["trace"], [rec.latency_us * 1e-6], json.loads(str(self.tvm_target)), c["args_info"]], wl))
            except Exception as e:  # noqa: BLE001  (a trace from another TVM version, say)
                self._note_skipped(key, name, "the MetaSchedule trace does not replay: "
                                   + (str(e).strip().splitlines() or [""])[-1][:200])
        target = tvm.target.Target.current(allow_none=True) or self.tvm_target
        with target, db:
            out = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        scheduled = {gv.name_hint for gv, f in out.functions.items()
                     if isinstance(f, tvm.tirx.PrimFunc) and bool((f.attrs or {}).get("tirx.is_scheduled", False))}
        for key, (name, rec) in chosen.items():
            if name in scheduled:
                self._note_applied(key, name, "ms", rec, "MetaSchedule trace")
            else:
                self._note_skipped(key, name, "the MetaSchedule trace did not apply to this function")
        return out

    # ---- bookkeeping --------------------------------------------------------------------
    def _note_applied(self, key, where, kind, rec, what) -> None:
        if (key, where) in self._seen:
            return
        self._seen.add((key, where))
        self.applied.append({"workload": key, "kind": kind, "where": where, "schedule": what,
                             "latency_us": rec.latency_us})

    def _note_skipped(self, key, where, reason) -> None:
        if (key, where) in self._seen:
            return
        self._seen.add((key, where))
        self.skipped.append({"workload": key, "where": where, "reason": reason})

    def _note_foreign(self, key, where) -> None:
        reasons = []
        for fp in self._foreign[key].values():
            reasons.append(f"tuned for {describe_fingerprint(fp)}: " + "; ".join(differences(fp, self.fp)))
        self._note_skipped(key, where, " | ".join(reasons))

    def check(self) -> None:
        """Warn about skipped records; raise instead when ``strict``."""
        new = self.skipped[self._warned:]
        self._warned = len(self.skipped)
        if not new:
            return
        lines = [f"{s['where']}: {s['reason']}" for s in new]
        head = (f"{len(new)} kernel(s) have tuning records in {self.path} that were not applied "
                f"(this target: {describe_fingerprint(self.fp)})")
        if self.strict:
            raise TuningDatabaseError(head + ":\n  " + "\n  ".join(lines), file=self.path,
                                      hint="tune for this target, or compile with strict=False")
        shown = lines[:5] + ([f"... and {len(lines) - 5} more"] if len(lines) > 5 else [])
        warnings.warn(head + ":\n  " + "\n  ".join(shown), TuningWarning, stacklevel=3)

    def report(self) -> dict:
        return {"database": self.path, "fingerprint": self.fp, "applied": list(self.applied),
                "skipped": list(self.skipped)}

    def notes(self) -> tuple[str, ...]:
        n_q = sum(1 for a in self.applied if a["kind"] == "qop")
        n_m = sum(1 for a in self.applied if a["kind"] == "ms")
        out = [f"tuning database {self.path}: {n_q} integer kernel(s) and {n_m} other function(s) use tuned "
               f"schedules for {describe_fingerprint(self.fp)}"]
        if self.skipped:
            out.append(f"{len(self.skipped)} kernel(s) had records for other targets or stale records, skipped: "
                       + "; ".join(f"{s['where']} ({s['reason']})" for s in self.skipped[:3])
                       + (" ..." if len(self.skipped) > 3 else ""))
        return tuple(out)
