"""``soniq_tvm.plot``: the precision map's numbers are the file's annotations."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from soniq_tvm import InputError
from soniq_tvm.annotation import read_annotations
from soniq_tvm.models import example_cnn
from soniq_tvm.plot import precision_grid, precision_map


def test_grid_rows_are_the_annotated_widths():
    model = example_cnn(seed=0, palette=(2, 8), low_fraction=0.75)
    names, grid = precision_grid(model)
    weights = [a for a in read_annotations(model).values() if a.kind == "weight"]
    assert names == [a.node for a in weights]
    for row, a in zip(grid, weights):
        np.testing.assert_array_equal(row[: len(a.bits)], a.bits)
        assert np.isnan(row[len(a.bits):]).all()
    assert set(np.unique(grid[~np.isnan(grid)])) <= {2.0, 8.0} and (grid == 2).sum() > (grid == 8).sum()
    with pytest.raises(InputError, match="kind"):
        precision_grid(model, kind="bias")


def test_map_draws_the_grid():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    model = example_cnn(seed=1, palette=(3, 6), low_fraction=0.5)
    fig = precision_map(model, kind="activation")
    ax = fig.axes[0]
    names, grid = precision_grid(model, kind="activation")
    shown = ax.images[0].get_array()
    np.testing.assert_array_equal(np.ma.filled(shown, np.nan), grid)
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert sorted(fig.axes[1].get_yticks()) == sorted({int(b) for b in grid[~np.isnan(grid)]})  # a tick per width


def test_importing_the_module_does_not_import_matplotlib():
    code = "import sys, soniq_tvm.plot; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
