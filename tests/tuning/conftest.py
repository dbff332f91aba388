"""Shared set-up of the tuning tests: a tiny mixed-precision conv model, a fake
kernel family with knobs, and a database tuned once by a separate process.

Every test here is marked ``tune``; the whole directory runs in a few minutes on
2 cores because the workloads are tiny, the budgets a few trials and the timing
settings minimal (``FAST``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

# measurement settings for tests: one short repeat per candidate
FAST = dict(repeat=1, min_repeat_ms=2, build_timeout_s=300.0, run_timeout_s=120.0)


def small_model():
    """conv 8 -> 16 channels, 8x8, half the input channels at 2 bits, half at 8:
    two integer-kernel workloads (w2a2 and w8a8) plus the float epilogue."""
    from tests.helpers import conv_case

    rng = np.random.default_rng(0)
    bits = [2, 8] * 4
    return conv_case(rng, 8, 16, bits, bits, w_axis=1, hw=(8, 8)).model


@pytest.fixture(scope="session")
def model_path(tmp_path_factory) -> str:
    import onnx

    path = tmp_path_factory.mktemp("tune_model") / "conv.onnx"
    onnx.save(small_model(), str(path))
    return str(path)


def run_py(code: str, cwd, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process in ``cwd`` (the repo on its path)."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tuned(tmp_path_factory, model_path):
    """Process A, in directory A: tunes ``model_path`` (integer kernels, 10 trials)
    into ``A/tuned.db``; returns (db path, what A measured: {workload: best candidate})."""
    a = tmp_path_factory.mktemp("machine_a")
    proc = run_py(f"""
        import json, soniq_tvm
        from soniq_tvm.tuning import MeasureConfig, TuningDatabase
        r = soniq_tvm.tune({model_path!r}, "llvm", "tuned.db", trials=10, ms_trials=0, split="always", progress=False,
                           measure=MeasureConfig(**{FAST!r}))
        best = {{}}
        with TuningDatabase("tuned.db", create=False) as db:
            fp = [t for t in db.summary()["targets"]][0]
            for w in db.workloads():
                b = db.best(w.key, fp)
                best[w.key] = b.candidate if b else None
        print("RESULT" + json.dumps({{"measured": r.measured, "best": best}}))
        """, a)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return str(a / "tuned.db"), json.loads(line[len("RESULT"):])


class KnobbedReference:
    """A test family with knobs: the bit-plane reference kernel, tagged with knobs
    ``u`` in 1..4 and ``v`` in 0..1, the pair (3, 1) invalid. Never the untuned
    choice (its cost is huge)."""

    name = "test-knobs"

    def __init__(self):
        from soniq_tvm.schedules import registry

        self.base = registry.get("bitplane-ref")

    def cost(self, op, target):
        return None if self.base.cost(op, target) is None else 1e30

    def knob_space(self, op, target=None):
        return {"u": [1, 2, 3, 4], "v": [0, 1]}

    def knobs(self, op):
        k = {"u": 1, "v": 0, **{key: v for key, v in (op.knobs or {}).items() if key in ("u", "v")}}
        if (k["u"], k["v"]) == (3, 1):
            raise ValueError("u=3 with v=1 is not a valid setting")
        return k

    def pack(self, w, op):
        return self.base.pack(w, op)

    def primfunc(self, op, target=None):
        func = self.base.primfunc(op, target)
        tagged = op.with_(family=self.name, knobs=self.knobs(op))
        return func.with_attr("soniq.qop", tagged.to_json())

    def reference(self, x, packed, op):
        return self.base.reference(x, packed, op)


class WrongWeights(KnobbedReference):
    """Packs zeros instead of the weights: compiles and runs, computes nonsense."""

    name = "test-wrong"

    def knob_space(self, op, target=None):
        return {}

    def pack(self, w, op):
        return self.base.pack(np.zeros_like(w), op)


@pytest.fixture
def fake_families():
    from soniq_tvm.schedules import registry

    registry.families()  # built-ins first
    fams = [KnobbedReference(), WrongWeights()]
    for f in fams:
        registry.register(f)
    yield fams
    for f in fams:
        registry._FAMILIES.pop(f.name, None)
