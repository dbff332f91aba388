"""End to end: a database tuned by one process in one directory, copied to
another and used there by a second process with zero tuning; records for
another mcpu are not applied (warning, or an error in strict mode); the
MetaSchedule side tuned and applied."""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings

import numpy as np
import pytest

from soniq_tvm.errors import TuningDatabaseError
from soniq_tvm.tuning.database import TuningDatabase

from .conftest import FAST, run_py, small_model

pytestmark = pytest.mark.tune


def _other_mcpu() -> str:
    from soniq_tvm.targets import parse_target

    return "znver3" if parse_target("llvm")["mcpu"] == "skylake-avx512" else "skylake-avx512"


def test_database_copied_to_another_machine_gives_the_same_schedules(tuned, model_path, tmp_path):
    db_a, from_a = tuned
    assert from_a["measured"] > 0 and all(from_a["best"].values())
    b = tmp_path / "machine_b"
    b.mkdir()
    shutil.copy(db_a, b / "copied.db")
    digest = hashlib.sha256((b / "copied.db").read_bytes()).hexdigest()
    proc = run_py(f"""
        import json, time, soniq_tvm
        t0 = time.time()
        m = soniq_tvm.compile({model_path!r}, "llvm", database="copied.db", strict=True, split="always")
        print("RESULT" + json.dumps({{"tuning": m.manifest["tuning"], "seconds": time.time() - t0}}))
        """, b)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[6:])
    applied = {a["workload"]: a["schedule"] for a in out["tuning"]["applied"] if a["kind"] == "qop"}
    assert set(applied) == set(from_a["best"]) and not out["tuning"]["skipped"]
    for key, cand in from_a["best"].items():  # B uses exactly what A measured fastest
        assert applied[key] == f"{cand['family']} {cand['knobs'] or '(default knobs)'}"
    # B tuned nothing: the file is byte for byte what A wrote
    assert hashlib.sha256((b / "copied.db").read_bytes()).hexdigest() == digest


def test_records_for_another_mcpu_are_not_applied(tuned, model_path):
    import soniq_tvm
    from soniq_tvm.tuning import TuningWarning

    db, _ = tuned
    other = _other_mcpu()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = soniq_tvm.inspect(model_path, f"llvm -mcpu={other}", database=db, split="always")
    msgs = [str(w.message) for w in caught if issubclass(w.category, TuningWarning)]
    assert msgs and f"!= {other}" in msgs[0] and db in msgs[0]
    assert any("skipped" in n for n in plan.notes)
    with pytest.raises(TuningDatabaseError) as e:
        soniq_tvm.inspect(model_path, f"llvm -mcpu={other}", database=db, strict=True, split="always")
    assert e.value.file == db and f"!= {other}" in str(e.value)


@pytest.mark.slow
def test_metaschedule_tasks_are_tuned_and_applied(tmp_path, model_path):
    import dataclasses

    import soniq_tvm
    from soniq_tvm.tuning import MeasureConfig, fingerprint, fingerprint_key

    db = tmp_path / "ms.db"
    r = soniq_tvm.tune(model_path, "llvm", str(db), trials=8, ms_trials=6, progress=False, split="always",
                       measure=MeasureConfig(**FAST))
    ms_tasks = [t for t in r.tasks if t.kind == "ms"]
    assert ms_tasks and r.measured <= 8 + 2
    fpk = fingerprint_key(fingerprint("llvm"))
    with TuningDatabase(db) as d:
        ms_recs = [x for x in d.records(fingerprint=fpk) if x.workload.startswith("ms:")]
        assert any(x.candidate.get("schedule") == "default" for x in ms_recs)
        traces = [x for x in ms_recs if "trace" in x.candidate and x.ok]
        assert traces, [x.error for x in ms_recs]
        # make a trace the fastest, so compile must replay it rather than keep the default
        d.add([dataclasses.replace(traces[0], latency_us=1e-3)])
    x = {"x": np.random.default_rng(2).standard_normal((1, 8, 8, 8)).astype(np.float32)}
    m = soniq_tvm.compile(model_path, "llvm", database=str(db), split="always")
    kinds = [a["schedule"] for a in m.manifest["tuning"]["applied"] if a["kind"] == "ms"]
    assert "MetaSchedule trace" in kinds, m.manifest["tuning"]
    np.testing.assert_allclose(m.run(x)[0], soniq_tvm.compile(small_model(), "llvm", split="always").run(x)[0], rtol=1e-6,
                               atol=1e-6)


def test_per_group_steps_tuned_and_the_database_reused(tmp_path):
    """A conv whose input has one step per width (two scale groups, each its own
    integer kernel) tunes; a compile with the database applies a record to every
    kernel workload and gives bit for bit the untuned module's output."""
    import soniq_tvm
    from soniq_tvm.builder import QDQBuilder
    from soniq_tvm.tuning import MeasureConfig
    from tests.helpers import _codes, _weights

    rng = np.random.default_rng(4)
    bits = [2, 8] * 4
    b = QDQBuilder("grouped_steps")
    x = b.input("x", [1, 8, 8, 8])
    steps = np.array([0.2 if w == 2 else 0.01 for w in bits], np.float32)
    xd = b.quant_act(x, steps, bits, signed=False, axis=1)
    b.output(b.conv(xd, _weights(rng, (16, 8, 3, 3), bits, 1), np.full(16, 2.0 ** -6, np.float32), bits,
                    w_axis=1, pads=(1, 1, 1, 1)), "y")
    path = tmp_path / "steps.onnx"
    import onnx

    onnx.save(b.build(), str(path))
    db = tmp_path / "steps.db"
    r = soniq_tvm.tune(str(path), "llvm", str(db), trials=4, ms_trials=0, progress=False,
                       measure=MeasureConfig(**FAST))
    assert r.measured > 0
    tuned = soniq_tvm.compile(str(path), "llvm", database=str(db), strict=True)
    applied = [a for a in tuned.manifest["tuning"]["applied"] if a["kind"] == "qop"]
    assert len(applied) >= 2 and not tuned.manifest["tuning"]["skipped"]  # both scale groups
    assert tuned.plan.layers[0].scale_groups == 2
    feeds = {"x": (_codes(rng, (1, 8, 8, 8), bits, 1, False) * steps.reshape(1, -1, 1, 1)).astype(np.float32)}
    plain = soniq_tvm.compile(str(path), "llvm")
    got, want = tuned.run(feeds)[0], plain.run(feeds)[0]
    if _fused(tuned) == _fused(plain):
        np.testing.assert_array_equal(got, want)
    else:  # a tuned family or tile may leave apart the groups the untuned module runs in one
        # kernel (AVX2 int16): the same exact integers, the float sum once fused into an FMA
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def _fused(m) -> list:
    return [n for n in m.plan.notes if "scale groups in one kernel" in n]
