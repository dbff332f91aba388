"""The tuning database: one SQLite file of measured schedules, keyed by hardware.

Layout (format ``soniq-tune``, version 1)::

    meta(key PRIMARY KEY, value)            format, version, created, writer
    workloads(key PRIMARY KEY, kind, name, body)
        kind "qop": one integer kernel, body = its QOp as JSON without the fields
                    that do not change the computation (layer, group, family,
                    knobs, packed_bytes); key "qop:<sha256 of body>"
        kind "ms":  one non-integer PrimFunc tuned by MetaSchedule, body =
                    {"hash": structural hash, "mod": IRModule JSON}; key "ms:<hash>"
    records(id, workload, fingerprint_key, fingerprint, candidate_key, candidate,
            latency_us, error, machine, created)
        candidate: {"family": name, "knobs": {...}} for qop workloads;
                   {"trace": ..., "args_info": ...} (a MetaSchedule trace) or
                   {"schedule": "default"} (the untuned default, measured as the
                   baseline) for ms workloads
        latency_us: median measured latency, NULL when building or running failed
        UNIQUE(workload, fingerprint_key, candidate_key): a candidate measured
        twice keeps its best latency

Why SQLite: every write is one transaction, so a tuning run killed at any point
leaves a loadable file with every record committed so far; several processes
may write into one file at once (SQLite's file lock serialises them). The
rollback journal (not WAL) keeps the database a single self-contained file once
no writer is active, so it can be copied to another machine as is.

Opening checks the file before trusting it: an empty or missing file becomes a
new database (when ``create``), anything else must be SQLite, complete (its
header's page count fits the file size), pass ``PRAGMA quick_check`` and carry
our ``meta.format``; otherwise :class:`~soniq_tvm.errors.TuningDatabaseError`
names the file and says what is wrong. Pure Python: no TVM needed here.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field

from ..errors import TuningDatabaseError
from .fingerprint import describe_fingerprint, fingerprint_key

__all__ = ["TuningDatabase", "Record", "Workload", "FORMAT", "VERSION", "candidate_key"]

FORMAT = "soniq-tune"
VERSION = 1
_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS workloads(
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    workload TEXT NOT NULL REFERENCES workloads(key),
    fingerprint_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    candidate_key TEXT NOT NULL,
    candidate TEXT NOT NULL,
    latency_us REAL,
    error TEXT,
    machine TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE(workload, fingerprint_key, candidate_key));
CREATE INDEX IF NOT EXISTS records_by_workload ON records(workload, fingerprint_key);
"""


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def candidate_key(candidate: dict) -> str:
    """Stable id of a candidate (20 hex digits of the SHA-256 of its canonical JSON)."""
    return hashlib.sha256(_canonical(candidate).encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Workload:
    key: str
    kind: str  # "qop" | "ms"
    name: str  # human-readable: layer names or the PrimFunc name
    body: dict


@dataclass(frozen=True)
class Record:
    workload: str
    fingerprint: dict
    candidate: dict
    latency_us: float | None
    error: str | None = None
    machine: dict = field(default_factory=dict)
    created: float = 0.0
    id: int | None = None

    @property
    def ok(self) -> bool:
        return self.latency_us is not None

    @property
    def fingerprint_key(self) -> str:
        return fingerprint_key(self.fingerprint)

    @property
    def candidate_key(self) -> str:
        return candidate_key(self.candidate)


class TuningDatabase:
    """A tuning database file. ``create``: a missing or empty file becomes a new
    database; otherwise it must exist. Use as a context manager or ``close()``."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        self.path = os.fspath(path)
        self._conn = None
        new = _check_file(self.path, create)
        try:
            self._conn = sqlite3.connect(self.path, timeout=120.0, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=DELETE")
            if new:
                self._init_schema()
            else:
                ok = self._conn.execute("PRAGMA quick_check").fetchone()[0]
                if ok != "ok":
                    raise TuningDatabaseError(f"the database is corrupt (SQLite: {ok})", file=self.path)
            self._check_meta()
        except sqlite3.DatabaseError as e:
            self.close()
            raise TuningDatabaseError(f"cannot read the database: {e} (truncated or corrupt?)",
                                      file=self.path) from None
        except TuningDatabaseError:
            self.close()
            raise

    # ---- set-up ---------------------------------------------------------------
    def _init_schema(self) -> None:
        with self._write():
            for stmt in _SCHEMA.strip().split(";"):
                if stmt.strip():
                    self._conn.execute(stmt)
            from .. import __version__

            for k, v in (("format", FORMAT), ("version", str(VERSION)), ("created", str(time.time())),
                         ("writer", f"soniq-tvm {__version__}")):
                self._conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (k, v))

    def _check_meta(self) -> None:
        try:
            rows = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError:
            raise TuningDatabaseError("an SQLite file but not a soniq-tvm tuning database (no 'meta' table)",
                                      file=self.path) from None
        if rows.get("format") != FORMAT:
            raise TuningDatabaseError(
                f"an SQLite file but not a soniq-tvm tuning database (format {rows.get('format')!r})",
                file=self.path)
        version = int(rows.get("version", "0"))
        if version > VERSION:
            raise TuningDatabaseError(f"written by a newer soniq-tvm (format version {version}, this one "
                                      f"reads {VERSION})", file=self.path, hint="upgrade soniq-tvm")
        self.meta = rows

    class _Tx:
        def __init__(self, conn):
            self.conn = conn

        def __enter__(self):
            self.conn.execute("BEGIN IMMEDIATE")
            return self.conn

        def __exit__(self, exc_type, exc, tb):
            self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
            return False

    def _write(self):
        return TuningDatabase._Tx(self._conn)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---- writing --------------------------------------------------------------
    def add_workload(self, workload: Workload) -> None:
        with self._write() as c:
            c.execute("INSERT OR IGNORE INTO workloads(key, kind, name, body) VALUES (?, ?, ?, ?)",
                      (workload.key, workload.kind, workload.name, _canonical(workload.body)))

    def add(self, records) -> int:
        """Commit ``records`` in one transaction (all or none); returns how many."""
        rows = [(r.workload, fingerprint_key(r.fingerprint), _canonical(r.fingerprint), candidate_key(r.candidate),
                 _canonical(r.candidate), r.latency_us, r.error, _canonical(r.machine), r.created or time.time())
                for r in records]
        if not rows:
            return 0
        with self._write() as c:
            c.executemany(
                "INSERT INTO records(workload, fingerprint_key, fingerprint, candidate_key, candidate, latency_us,"
                " error, machine, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(workload, fingerprint_key, candidate_key) DO UPDATE SET"
                " latency_us=excluded.latency_us, error=excluded.error, machine=excluded.machine,"
                " created=excluded.created"
                " WHERE excluded.latency_us IS NOT NULL"
                " AND (records.latency_us IS NULL OR excluded.latency_us < records.latency_us)", rows)
        return len(rows)

    def mark_failed(self, record: Record, error: str) -> None:
        """Turn a measured record into a failed one (e.g. its kernel computed a wrong result)."""
        with self._write() as c:
            c.execute("UPDATE records SET latency_us = NULL, error = ? WHERE workload = ? AND fingerprint_key = ?"
                      " AND candidate_key = ?", (error[:300], record.workload, record.fingerprint_key,
                                                 record.candidate_key))

    def merge(self, *others: "str | os.PathLike | TuningDatabase") -> int:
        """Copy every workload and record of ``others`` into this database (a
        candidate present in both keeps the lower latency); returns records copied."""
        n = 0
        for other in others:
            src = other if isinstance(other, TuningDatabase) else TuningDatabase(other, create=False)
            try:
                for w in src.workloads():
                    self.add_workload(w)
                recs = src.records()
                n += self.add(recs)
            finally:
                if src is not other:
                    src.close()
        return n

    # ---- reading --------------------------------------------------------------
    def workloads(self, kind: str | None = None) -> list[Workload]:
        q, args = "SELECT key, kind, name, body FROM workloads", ()
        if kind:
            q, args = q + " WHERE kind = ?", (kind,)
        return [Workload(k, kd, n, json.loads(b)) for k, kd, n, b in self._conn.execute(q + " ORDER BY key", args)]

    def workload(self, key: str) -> Workload | None:
        row = self._conn.execute("SELECT key, kind, name, body FROM workloads WHERE key = ?", (key,)).fetchone()
        return None if row is None else Workload(row[0], row[1], row[2], json.loads(row[3]))

    def records(self, workload: str | None = None, fingerprint: str | None = None) -> list[Record]:
        """Records, optionally of one workload key and/or one fingerprint key."""
        q = ("SELECT id, workload, fingerprint, candidate, latency_us, error, machine, created FROM records")
        cond, args = [], []
        if workload is not None:
            cond.append("workload = ?")
            args.append(workload)
        if fingerprint is not None:
            cond.append("fingerprint_key = ?")
            args.append(fingerprint)
        if cond:
            q += " WHERE " + " AND ".join(cond)
        return [Record(w, json.loads(fp), json.loads(c), lat, err, json.loads(m), t, i)
                for i, w, fp, c, lat, err, m, t in self._conn.execute(q + " ORDER BY id", args)]

    def measured(self, workload: str, fingerprint: str) -> set[str]:
        """Candidate keys already measured (successfully or not) for a workload on a fingerprint."""
        return {k for (k,) in self._conn.execute(
            "SELECT candidate_key FROM records WHERE workload = ? AND fingerprint_key = ?", (workload, fingerprint))}

    def best(self, workload: str, fingerprint: str) -> Record | None:
        """The fastest successful record of a workload on a fingerprint."""
        ok = [r for r in self.records(workload, fingerprint) if r.ok]
        return min(ok, key=lambda r: r.latency_us) if ok else None

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def summary(self) -> dict:
        """What is in the file: workloads by kind, and per fingerprint the records,
        failures, workloads covered and machines they were measured on."""
        kinds = dict(self._conn.execute("SELECT kind, COUNT(*) FROM workloads GROUP BY kind").fetchall())
        per_fp = {}
        for r in self.records():
            k = r.fingerprint_key
            s = per_fp.setdefault(k, {"fingerprint": r.fingerprint, "describe": describe_fingerprint(r.fingerprint),
                                      "records": 0, "failed": 0, "workloads": set(), "machines": set()})
            s["records"] += 1
            s["failed"] += 0 if r.ok else 1
            s["workloads"].add(r.workload)
            if r.machine:
                s["machines"].add(f"{r.machine.get('host', '?')} ({r.machine.get('cpu', '?')})")
        for s in per_fp.values():
            s["workloads"] = len(s["workloads"])
            s["machines"] = sorted(s["machines"])
        return {"path": self.path, "format": self.meta.get("format"), "version": int(self.meta.get("version", 0)),
                "writer": self.meta.get("writer", ""), "workloads": kinds, "records": len(self),
                "targets": per_fp}

    def best_table(self, fingerprint: str | None = None) -> list[dict]:
        """One row per (workload, fingerprint): name, kind, best latency, trials, best candidate."""
        names = {w.key: (w.kind, w.name) for w in self.workloads()}
        groups = {}
        for r in self.records(fingerprint=fingerprint):
            groups.setdefault((r.workload, r.fingerprint_key), []).append(r)
        rows = []
        for (wk, fk), recs in sorted(groups.items(), key=lambda kv: names.get(kv[0][0], ("", ""))[1]):
            ok = [r for r in recs if r.ok]
            best = min(ok, key=lambda r: r.latency_us) if ok else None
            default = [r for r in ok if _is_default(r.candidate)]
            kind, name = names.get(wk, ("?", wk))
            rows.append({"workload": wk, "kind": kind, "name": name, "fingerprint": fk, "trials": len(recs),
                         "failed": len(recs) - len(ok), "best_us": best.latency_us if best else None,
                         "default_us": min(r.latency_us for r in default) if default else None,
                         "best": _short(best.candidate) if best else ""})
        return rows


def _is_default(candidate: dict) -> bool:
    return candidate.get("schedule") == "default" or candidate.get("default") is True


def _short(candidate: dict) -> str:
    if "family" in candidate:
        knobs = ",".join(f"{k}={v}" for k, v in sorted(candidate.get("knobs", {}).items()))
        return f"{candidate['family']}({knobs or 'default knobs'})"
    if candidate.get("schedule") == "default":
        return "default schedule"
    return "MetaSchedule trace"


def _check_file(path: str, create: bool) -> bool:
    """Validate ``path`` before SQLite touches it; True if it is to be created."""
    if os.path.isdir(path):
        raise TuningDatabaseError("is a directory; a tuning database is a single file", file=path,
                                  hint="MetaSchedule work_dirs are not read; pass the .db file soniq-tvm tune wrote")
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        if not create:
            raise TuningDatabaseError("no tuning database here" if not os.path.exists(path)
                                      else "the file is empty, not a tuning database", file=path)
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise TuningDatabaseError(f"directory {parent} does not exist", file=path)
        return True
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(100)
    if not head.startswith(_MAGIC):
        raise TuningDatabaseError("not a soniq-tvm tuning database (not an SQLite file)", file=path,
                                  hint="soniq-tvm tune writes one; MetaSchedule JSON files are not read")
    if len(head) < 100:
        raise TuningDatabaseError(f"the database is truncated ({size} bytes, shorter than its header)", file=path)
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    pages = int.from_bytes(head[28:32], "big")
    valid_count = head[24:28] == head[92:96]  # the in-header page count is valid only then
    if valid_count and pages and size < page * pages:
        raise TuningDatabaseError(f"the database is truncated ({size} bytes, its header says "
                                  f"{page * pages})", file=path, hint="restore it from a copy, or delete it")
    return False
