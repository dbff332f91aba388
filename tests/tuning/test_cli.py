"""``soniq-tvm tune`` (progress on stderr, killed, interrupted with Ctrl-C,
resumed) and ``soniq-tvm db show`` / ``db merge``."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from soniq_tvm.cli import main
from soniq_tvm.tuning.database import TuningDatabase

from .conftest import REPO

pytestmark = pytest.mark.tune

TUNE = ["tune", "--db", "t.db", "--trials", "40", "--ms-trials", "0", "--repeat", "1", "--min-repeat-ms", "2",
        "--split", "always"]


def _start(model, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # own process group, like a terminal job: Ctrl-C reaches the workers too
    return subprocess.Popen([sys.executable, "-m", "soniq_tvm.cli", TUNE[0], model, *TUNE[1:]], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _records(path) -> int:
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _wait_for_records(path, more_than: int, proc, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        n = _records(path)
        if n > more_than:
            return n
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError("no new records in time")


@pytest.mark.slow
def test_tune_killed_interrupted_and_resumed(tmp_path, model_path):
    """SONIQ_KILL_SEED picks the kill point (a loop over seeds runs it at many);
    a failure names the seed."""
    seed = int(os.environ.get("SONIQ_KILL_SEED", "0"))
    delay = random.Random(seed).uniform(0.0, 3.0)
    db = tmp_path / "t.db"
    # 1. killed outright at a random point after its first batch: every committed record survives
    p = _start(model_path, tmp_path)
    first = _wait_for_records(db, 0, p)
    time.sleep(delay)
    before = _records(db)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    with TuningDatabase(db, create=False) as d:
        assert len(d) >= max(first, before), f"SONIQ_KILL_SEED={seed}: records lost by the kill"
        after_kill = len(d)
    # 2. Ctrl-C once it has measured more: saves, says so, exits 130
    interrupted = after_kill
    if after_kill < 39:  # else the kill came so late that nothing is left to interrupt
        p = _start(model_path, tmp_path)
        _wait_for_records(db, after_kill, p)
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 130, err[-3000:]
        assert "interrupted" in err and "resume" in err
        assert "[tune]" in err  # the progress report went to stderr
        with TuningDatabase(db, create=False) as d:
            interrupted = len(d)
        assert interrupted > after_kill
    # 3. the same command again finishes the budget, measuring only what is missing
    p = _start(model_path, tmp_path)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert f"{40 - interrupted} trials measured, {interrupted} already there" in out
    with TuningDatabase(db, create=False) as d:
        assert len(d) == 40


def test_db_show_and_merge(tuned, tmp_path, capsys):
    db, _ = tuned
    assert main(["db", "show", db]) == 0
    out = capsys.readouterr().out
    assert "soniq-tune/1" in out and "target " in out and "qop" in out and "mcpu=" in out
    merged = tmp_path / "merged.db"
    assert main(["db", "merge", db, db, "-o", str(merged)]) == 0
    with TuningDatabase(db, create=False) as a, TuningDatabase(merged, create=False) as m:
        assert len(m) == len(a)
    bad = tmp_path / "bad.db"
    bad.write_text("{}\n")
    assert main(["db", "show", str(bad)]) == 2
    assert "bad.db" in capsys.readouterr().err
