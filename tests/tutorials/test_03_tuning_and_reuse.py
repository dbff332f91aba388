from __future__ import annotations

import pytest

from ._run import run_notebook


@pytest.mark.slow
def test_runs(tmp_path):
    run_notebook("03_tuning_and_reuse", tmp_path)
