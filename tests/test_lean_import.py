"""`import soniq_tvm` stays cheap: no torch, onnxruntime, matplotlib, not even TVM."""
from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_is_lean():
    mods = _modules_after("import soniq_tvm")
    for heavy in ("torch", "onnxruntime", "matplotlib", "tvm", "onnx"):
        assert heavy not in mods, f"import soniq_tvm pulled in {heavy}"


def test_lazy_api_resolves():
    mods = _modules_after("import soniq_tvm\nsoniq_tvm.parse_target\nsoniq_tvm.SoniqError")
    assert "soniq_tvm.targets" in mods and "onnxruntime" not in mods
