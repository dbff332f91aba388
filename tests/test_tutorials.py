"""Every tutorial notebook has its test (tests/tutorials/test_<notebook>.py runs it)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def test_there_are_tutorials():
    assert NOTEBOOKS, "tutorials/ has no notebook"


def test_every_notebook_is_run_by_a_test():
    missing = [p.stem for p in NOTEBOOKS if not (ROOT / "tests" / "tutorials" / f"test_{p.stem}.py").is_file()]
    assert not missing, f"no tests/tutorials/test_<name>.py for {missing}"
