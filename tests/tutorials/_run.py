"""Runs a tutorial notebook top to bottom (its cells assert their results). One test
file per notebook: run_tests.sh hands whole files to its processes, so the notebooks
(a minute or two each) spread over them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# the suite runs two test processes on two cores: a notebook that trains with PyTorch
# starts a thread per core that spins against the other process (notebook 02 took 223 s
# in the suite, 56 s with one thread). TVM's thread pool would follow OMP_NUM_THREADS
# too: it is given its own setting, every core.
_ONE_TORCH_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS", str(os.cpu_count() or 1))}

TUTORIALS = Path(__file__).resolve().parents[2] / "tutorials"


def run_notebook(stem: str, workdir, one_torch_thread: bool = False) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(TUTORIALS / f"{stem}.ipynb", as_version=4)
    env = _ONE_TORCH_THREAD if one_torch_thread else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the kernel process only
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
