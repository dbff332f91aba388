"""The soniq-tvm command line: inspect, compile, run, verify, and its errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from soniq_tvm import models
from soniq_tvm.annotation import save_model
from soniq_tvm.cli import main


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "cnn.onnx"
    save_model(models.example_cnn(), str(path))
    return path


def test_inspect_prints_plan(onnx_file, capsys):
    assert main(["inspect", str(onnx_file)]) == 0
    out = capsys.readouterr().out
    assert "stem" in out and "packed" in out and "gathers" in out


def test_inspect_json(onnx_file, capsys):
    assert main(["inspect", str(onnx_file), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    from soniq_tvm.annotation import read_annotations

    proto = models.example_cnn()
    sizes = {i.name: int(np.prod(i.dims)) for i in proto.graph.initializer}
    weights = sum(sizes[a.input] for a in read_annotations(proto).values() if a.kind == "weight")
    assert plan["layers"] and plan["bytes_after"] > 0 and plan["bytes_before"] == weights


def test_compile_run_verify(onnx_file, tmp_path, capsys):
    out = tmp_path / "cnn.soniq"
    assert main(["compile", str(onnx_file), "--target", "llvm -num-cores=2", "-o", str(out)]) == 0
    x = models.example_inputs(models.example_cnn())["x"]
    np.save(tmp_path / "x.npy", x)
    assert main(["run", str(out), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npz")]) == 0
    y = np.load(tmp_path / "y.npz")["logits"]
    assert y.shape == (1, 10) and np.isfinite(y).all()
    assert main(["verify", str(onnx_file), str(out)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["run", str(out), "--profile", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(l for l in lines if l.strip().startswith("us/run"))) + 1:]
    assert len(table) == 4 and "total of" in table[-1], lines  # 3 slowest + total
    assert float(table[0].split()[0]) >= float(table[1].split()[0]) >= float(table[2].split()[0]) > 0


def test_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.onnx" in err and "Traceback" not in err
    assert main(["compile", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o"), "--target", "llvm -bad=1"]) == 2


def test_console_script_is_installed(onnx_file):
    exe = os.path.join(os.path.dirname(sys.executable), "soniq-tvm")
    res = subprocess.run([exe, "inspect", str(onnx_file)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "head" in res.stdout


def test_compile_with_foreign_database_is_an_error(onnx_file, tmp_path, capsys):
    bad = tmp_path / "bad.db"
    bad.write_text("not a tuning database")
    assert main(["compile", str(onnx_file), "-o", str(tmp_path / "m.soniq"), "--db", str(bad)]) == 2
    assert "bad.db" in capsys.readouterr().err
