from __future__ import annotations

import pytest

from ._run import run_notebook


@pytest.mark.slow
def test_runs(tmp_path):
    run_notebook("02_qat_to_deployment", tmp_path, one_torch_thread=True)  # it trains: see _run
