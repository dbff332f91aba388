"""The knob search: candidates from the families' knob spaces, the budget split,
records applied by the pack pass, wrong kernels caught before they are stored."""
from __future__ import annotations

import numpy as np
import pytest

from soniq_tvm.tuning.database import Record, TuningDatabase, Workload

from .conftest import FAST, small_model

pytestmark = pytest.mark.tune


@pytest.fixture(scope="module")
def host():
    from soniq_tvm.targets import parse_target, to_tvm_target

    t = parse_target("llvm")
    return t, to_tvm_target(t)


@pytest.fixture(scope="module")
def tasks(host):
    from soniq_tvm.compiler import prepare
    from soniq_tvm.tuning import workloads

    result, tgt, *_ = prepare(small_model(), host[0], split="always")
    knob, ms = workloads.extract(result, host[1])
    return knob, ms


def test_workloads_of_the_model(tasks):
    knob, ms = tasks
    assert sorted((t.op.w_bit, t.op.a_bit) for t in knob) == [(2, 2), (8, 8)]
    assert all(t.weight == 1 and t.key.startswith("qop:") for t in knob)
    assert ms and all(t.key.startswith("ms:") for t in ms)  # the float epilogue


def test_candidates_cover_the_knob_space(tasks, host, fake_families):
    from soniq_tvm.schedules import registry
    from soniq_tvm.tuning.knobs import candidates

    op = tasks[0][0].op
    cands = candidates(op, host[1], seed=0)
    assert cands[0].get("default") and cands[0]["family"] == registry.select(op, host[1]).name
    ours = [c["knobs"] for c in cands if c["family"] == "test-knobs"]
    assert {"u": 3, "v": 1} not in ours  # rejected by the family's own knobs()
    assert {} in ours  # its default ...
    assert {"u": 1, "v": 0} not in ours  # ... and not again as the setting equal to it
    assert len(ours) == 1 + 8 - 2
    assert cands == candidates(op, host[1], seed=0)  # a rerun plans the same list
    first_non_default = next(i for i, c in enumerate(cands) if c["knobs"])
    assert all(not c["knobs"] for c in cands[:first_non_default])  # defaults of every family first


def test_budget_is_split_by_work_within_the_spaces():
    from types import SimpleNamespace as NS

    from soniq_tvm.tuning.tuner import _allocate

    ts = [NS(key="a", size=100.0), NS(key="b", size=10.0), NS(key="c", size=1.0)]
    spaces, mins = {"a": 50, "b": 5, "c": 3}, {"a": 2, "b": 2, "c": 2}
    assert _allocate(ts, spaces, mins, 2) == {"a": 1, "b": 1, "c": 0}
    assert _allocate(ts, spaces, mins, 6) == {"a": 2, "b": 2, "c": 2}
    alloc = _allocate(ts, spaces, mins, 30)
    assert sum(alloc.values()) == 30 and alloc["a"] > alloc["b"] >= alloc["c"] and alloc["b"] <= 5
    assert _allocate(ts, spaces, mins, 1000) == spaces


def _fake_records(db_path, tasks, fp, knobs, faster: bool):
    from soniq_tvm.tuning import workloads

    with TuningDatabase(db_path) as db:
        for t in tasks:
            db.add_workload(Workload(t.key, "qop", t.name, workloads.qop_body(t.op)))
            db.add([Record(t.key, fp, {"family": t.default_family, "knobs": {}, "default": True}, 2.0),
                    Record(t.key, fp, {"family": "test-knobs", "knobs": knobs}, 1.0 if faster else 3.0)])


def test_records_for_this_target_are_applied_by_the_pack_pass(tmp_path, tasks, host, fake_families):
    import soniq_tvm
    from soniq_tvm.compiler import prepare
    from soniq_tvm.passes.pipeline import _soniq_layers
    from soniq_tvm.tuning import TunedSchedules, fingerprint

    db = tmp_path / "fake.db"
    _fake_records(db, tasks[0], fingerprint(host[0]), {"u": 4, "v": 1}, faster=True)
    tuned = TunedSchedules(db, host[0])
    result, *_ = prepare(small_model(), host[0], tuned=tuned, split="always")
    ops = _soniq_layers(result.mod)
    assert ops and all(op.family == "test-knobs" and op.knobs == {"u": 4, "v": 1} for op in ops)
    assert len(tuned.applied) == len(ops) and not tuned.skipped

    m = soniq_tvm.compile(small_model(), host[0], database=str(db), split="always")
    assert {a["schedule"] for a in m.manifest["tuning"]["applied"] if a["kind"] == "qop"} == {
        "test-knobs {'u': 4, 'v': 1}"}
    assert any("use tuned schedules" in n for n in m.plan.notes)
    x = {"x": np.random.default_rng(1).standard_normal((1, 8, 8, 8)).astype(np.float32)}
    np.testing.assert_array_equal(m.run(x)[0], soniq_tvm.compile(small_model(), host[0], split="always").run(x)[0])


def test_stale_records_are_skipped_with_the_reason(tmp_path, tasks, host, fake_families):
    from soniq_tvm.compiler import prepare
    from soniq_tvm.tuning import TunedSchedules, fingerprint

    db = tmp_path / "stale.db"
    _fake_records(db, tasks[0], fingerprint(host[0]), {"u": 3, "v": 1}, faster=True)  # now an invalid setting
    tuned = TunedSchedules(db, host[0])
    prepare(small_model(), host[0], tuned=tuned, split="always")
    # the invalid fastest record is passed over; the next fastest (the default) applies
    assert all(a["schedule"].endswith("(default knobs)") for a in tuned.applied)


def test_a_wrong_kernel_is_caught_before_it_is_used(tmp_path, tasks, host, fake_families):
    from soniq_tvm.tuning import fingerprint, fingerprint_key
    from soniq_tvm.tuning.progress import Progress
    from soniq_tvm.tuning.tuner import _verify_best

    task = tasks[0][0]
    fp = fingerprint(host[0])
    with TuningDatabase(tmp_path / "w.db") as db:
        db.add_workload(Workload(task.key, "qop", task.name, {}))
        db.add([Record(task.key, fp, {"family": "test-wrong", "knobs": {}}, 0.5),
                Record(task.key, fp, {"family": "test-knobs", "knobs": {"u": 2}}, 1.0)])
        _verify_best(task, db, fingerprint_key(fp), host[1], Progress(0, 0, enabled=False))
        best = db.best(task.key, fingerprint_key(fp))
        assert best.candidate["family"] == "test-knobs"  # checked, correct: kept
        wrong = [r for r in db.records(task.key) if r.candidate["family"] == "test-wrong"][0]
        assert wrong.latency_us is None and "wrong result" in wrong.error


@pytest.mark.slow
def test_tune_measures_the_fake_family_knobs(tmp_path, model_path, fake_families):
    import soniq_tvm
    from soniq_tvm.tuning import MeasureConfig, fingerprint, fingerprint_key

    db = tmp_path / "k.db"
    r = soniq_tvm.tune(model_path, "llvm", str(db), trials=40, ms_trials=0, progress=False, split="always",
                       measure=MeasureConfig(**FAST))
    assert not r.interrupted and r.measured == sum(t.planned for t in r.tasks) <= 40
    fpk = fingerprint_key(fingerprint("llvm"))
    with TuningDatabase(db, create=False) as d:
        for t in r.tasks:
            recs = d.records(t.key, fpk)
            fams = {x.candidate["family"] for x in recs}
            assert "test-knobs" in fams and len(recs) == t.planned
            assert all(x.ok for x in recs), [x.error for x in recs if not x.ok]
            assert not any(x.candidate["knobs"] == {"u": 3, "v": 1} for x in recs)
    again = soniq_tvm.tune(model_path, "llvm", str(db), trials=40, ms_trials=0, progress=False, split="always",
                           measure=MeasureConfig(**FAST))
    assert again.measured == 0 and again.resumed == r.measured  # nothing left to do


def test_metaschedule_statistics_stay_text_under_jupyter():
    """Under Jupyter MetaSchedule prints its statistics as a pandas table, and pandas
    is no dependency: tune_ms answers 'not IPython' through this override while it
    runs. Tutorial 03 tunes MetaSchedule tasks inside a Jupyter kernel: it is the
    end-to-end check (it crashed with "No module named 'pandas'" before)."""
    import tvm  # noqa: F401  (registers MetaSchedule's global functions)
    import tvm.s_tir.meta_schedule  # noqa: F401
    import tvm_ffi

    from soniq_tvm import tvm_shim as tv

    name = "s_tir.meta_schedule.using_ipython"
    before = tvm_ffi.get_global_func(name)()
    with tv.global_func_override(name, lambda: True):
        assert tvm_ffi.get_global_func(name)() is True
    assert tvm_ffi.get_global_func(name)() == before
