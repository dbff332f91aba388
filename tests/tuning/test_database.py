"""The database file: round trip, best-of, resumable keys, merge, and safety:
foreign, truncated and corrupt files are refused naming the file; two writing
processes do not corrupt it; a writer killed mid-way leaves it loadable."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from soniq_tvm.errors import SoniqError, TuningDatabaseError
from soniq_tvm.tuning.database import Record, TuningDatabase, Workload, candidate_key
from soniq_tvm.tuning.fingerprint import differences, fingerprint_key

from .conftest import REPO

pytestmark = pytest.mark.tune

FP_A = {"kind": "llvm", "arch": "x86_64", "mcpu": "znver3", "mattr": [], "features": ["avx2", "fma"], "gpu_arch": ""}
FP_B = {**FP_A, "mcpu": "skylake-avx512", "features": ["avx2", "avx512f", "fma"]}


def _rec(wl, fp, knobs, lat, err=None):
    return Record(wl, fp, {"family": "f", "knobs": knobs}, lat, err, {"host": "test"})


def test_round_trip_best_and_upsert(tmp_path):
    path = tmp_path / "t.db"
    with TuningDatabase(path) as db:
        db.add_workload(Workload("qop:1", "qop", "conv a", {"kind": "conv2d"}))
        db.add([_rec("qop:1", FP_A, {"R": 1}, 5.0), _rec("qop:1", FP_A, {"R": 2}, 3.0),
                _rec("qop:1", FP_A, {"R": 4}, None, "build: boom"), _rec("qop:1", FP_B, {"R": 8}, 1.0)])
        db.add([_rec("qop:1", FP_A, {"R": 1}, 2.0)])  # measured again, faster: kept
        db.add([_rec("qop:1", FP_A, {"R": 2}, 9.0)])  # measured again, slower: ignored
    with TuningDatabase(path, create=False) as db:
        assert len(db) == 4
        best = db.best("qop:1", fingerprint_key(FP_A))
        assert best.candidate == {"family": "f", "knobs": {"R": 1}} and best.latency_us == 2.0
        assert db.best("qop:1", fingerprint_key(FP_B)).latency_us == 1.0
        assert candidate_key({"family": "f", "knobs": {"R": 4}}) in db.measured("qop:1", fingerprint_key(FP_A))
        s = db.summary()
        assert s["workloads"] == {"qop": 1} and len(s["targets"]) == 2
        assert db.workload("qop:1").name == "conv a"


def test_merge_keeps_the_faster_measurement(tmp_path):
    a, b, c = (tmp_path / n for n in ("a.db", "b.db", "c.db"))
    with TuningDatabase(a) as db:
        db.add_workload(Workload("qop:1", "qop", "x", {}))
        db.add([_rec("qop:1", FP_A, {"R": 1}, 5.0)])
    with TuningDatabase(b) as db:
        db.add_workload(Workload("qop:1", "qop", "x", {}))
        db.add([_rec("qop:1", FP_A, {"R": 1}, 4.0), _rec("qop:1", FP_B, {"R": 2}, 7.0)])
    with TuningDatabase(c) as db:
        db.merge(a, b)
        assert len(db) == 2
        assert db.best("qop:1", fingerprint_key(FP_A)).latency_us == 4.0


def test_fingerprint_differences_name_the_field():
    diff = differences(FP_A, FP_B)
    assert "mcpu znver3 != skylake-avx512" in diff
    assert any(d.startswith("features:") and "avx512f" in d for d in diff)
    assert differences(FP_A, dict(FP_A)) == []
    assert fingerprint_key(FP_A) != fingerprint_key(FP_B)


@pytest.mark.parametrize("content, words", [
    (b"not a database at all\n" * 10, "not an SQLite file"),
    (b"SQLite format 3\x00" + b"\x00" * 10, "truncated"),
])
def test_foreign_or_truncated_file_names_it(tmp_path, content, words):
    path = tmp_path / "bad.db"
    path.write_bytes(content)
    with pytest.raises(TuningDatabaseError) as e:
        TuningDatabase(path)
    assert isinstance(e.value, SoniqError) and words in str(e.value) and str(path) in str(e.value)


def test_truncated_database_is_refused(tmp_path):
    path = tmp_path / "t.db"
    with TuningDatabase(path) as db:
        db.add_workload(Workload("qop:1", "qop", "x", {"pad": "x" * 20000}))
        db.add([_rec("qop:1", FP_A, {"R": i}, float(i)) for i in range(200)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TuningDatabaseError, match="truncated") as e:
        TuningDatabase(path, create=False)
    assert e.value.file == str(path)


def test_other_sqlite_database_and_newer_format_are_refused(tmp_path):
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t(x)")
    con.commit()
    con.close()
    with pytest.raises(TuningDatabaseError, match="not a soniq-tvm tuning database"):
        TuningDatabase(other)
    newer = tmp_path / "newer.db"
    TuningDatabase(newer).close()
    con = sqlite3.connect(newer)
    con.execute("UPDATE meta SET value = '99' WHERE key = 'version'")
    con.commit()
    con.close()
    with pytest.raises(TuningDatabaseError, match="newer soniq-tvm"):
        TuningDatabase(newer)


def test_missing_file_directory_and_empty_file(tmp_path):
    with pytest.raises(TuningDatabaseError, match="no tuning database"):
        TuningDatabase(tmp_path / "none.db", create=False)
    with pytest.raises(TuningDatabaseError, match="directory"):
        TuningDatabase(tmp_path)
    (tmp_path / "empty.db").write_bytes(b"")
    TuningDatabase(tmp_path / "empty.db").close()  # an empty file becomes a database


_WRITER = """
    import sys, time
    from soniq_tvm.tuning.database import Record, TuningDatabase, Workload
    fp = {{"kind": "llvm", "arch": "x86_64", "mcpu": "{mcpu}", "mattr": [], "features": [], "gpu_arch": ""}}
    db = TuningDatabase("{path}")
    db.add_workload(Workload("qop:1", "qop", "x", {{}}))
    for i in range({n}):
        db.add([Record("qop:1", fp, {{"family": "f", "knobs": {{"i": i, "w": j}}}}, float(i), None, {{}})
                for j in range(3)])
        print("wrote", i, flush=True)
        time.sleep({sleep})
"""


def test_two_processes_write_one_database(tmp_path):
    path = tmp_path / "shared.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER.format(mcpu=m, path=path, n=60, sleep=0).replace(
        "\n    ", "\n")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for m in ("a", "b")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()[-2000:]
    with TuningDatabase(path, create=False) as db:
        assert len(db) == 2 * 60 * 3
        assert len(db.summary()["targets"]) == 2


def test_killed_writer_leaves_a_loadable_database(tmp_path):
    path = tmp_path / "killed.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", _WRITER.format(mcpu="a", path=path, n=100000, sleep=0).replace(
        "\n    ", "\n")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(50):  # let it commit a few transactions, then kill it mid-stream
        p.stdout.readline()
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    with TuningDatabase(path, create=False) as db:
        n = len(db)
        assert n >= 50 * 3 and n % 3 == 0  # whole transactions only
