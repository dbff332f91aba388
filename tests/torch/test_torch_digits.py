"""Accuracy parity on real data: scikit-learn's handwritten digits (1,797 8x8 images,
fixed split). One fixed seed of the recipe in examples/digits_qat.py: the fp32 CNN,
then SONIQ QAT with the palettes {2,8} and {1,4} at >= 8x weight compression."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from ._models import load_example  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.slow]

ONE_IMAGE = 1 / 540  # the test split has 540 images


def test_digits_soniq_matches_fp32_at_8x_compression():
    ex = load_example()
    torch.manual_seed(0)
    results = ex.run_seed(0, ex.load_digits_split())
    fp32 = results["fp32"]["acc"]
    assert fp32 >= 0.98, f"fp32 baseline only {fp32:.4f}"
    for name in ("{2,8}", "{1,4}"):
        r = results[name]
        assert r["bits"] <= 4.0, f"{name}: {r['bits']:.3f} bits/weight is below 8x compression"
        assert r["compression"] >= 8.0
        # parity: at most two test images worse than fp32 on this one seed
        # (measured: fp32 99.07%, {2,8} 99.26%, {1,4} 99.44%)
        assert r["acc"] >= fp32 - 2 * ONE_IMAGE - 1e-9, f"{name}: {r['acc']:.4f} vs fp32 {fp32:.4f}"
