"""The bit budget: the penalty moves average bits toward it, snap meets it."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from soniq_tvm.torch import average_bits, bit_penalty, bit_report, prepare, quant_layers, snap  # noqa: E402
from soniq_tvm.torch.prepare import _weighted_bits  # noqa: E402

from ._models import fit, settled_cnn  # noqa: E402

pytestmark = pytest.mark.torch


def _data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _continuous_avg(q) -> float:
    return float(_weighted_bits(q, hard=False)[0].detach())


@pytest.mark.parametrize("weight_axis", ["in", "out"])
def test_penalty_moves_average_bits_to_the_budget(weight_axis):
    x, y = _data()
    q = prepare(settled_cnn(), palette=(2, 8), target_bits=3.0, init_bits=7.0, weight_axis=weight_axis)
    before = _continuous_avg(q)
    assert before == pytest.approx(7.0, abs=1e-3)
    assert bit_penalty(q).item() > 0
    fit(q, x, y, steps=60, penalty=True)
    after = _continuous_avg(q)
    assert after < 4.0, f"average bits went {before:.2f} -> {after:.2f}, budget 3.0"
    assert abs(after - 3.0) < abs(before - 3.0) / 3


def test_without_penalty_bits_do_not_fall():
    """Control: the same training without the penalty leaves precision high, so the
    fall above is the penalty's doing."""
    x, y = _data()
    q = prepare(settled_cnn(), palette=(2, 8), target_bits=3.0, init_bits=7.0)
    fit(q, x, y, steps=60, penalty=False)
    assert _continuous_avg(q) > 6.0


def test_penalty_is_a_hinge_and_vanishes_after_snap():
    q = prepare(settled_cnn(), palette=(2, 8), target_bits=6.0, init_bits=4.0)
    assert bit_penalty(q).item() == 0.0  # under budget: no push
    q(torch.rand(4, 1, 8, 8))
    snap(q)
    assert bit_penalty(q).item() == 0.0
    assert not any(p.requires_grad for _, layer in quant_layers(q) for p in
                   [pr.logit for pr in layer.precisions()])


@pytest.mark.parametrize("palette,target", [((2, 8), 3.5), ((1, 4), 2.5), ((2, 4, 8), 3.0)])
def test_snap_fits_the_budget(palette, target):
    x, y = _data()
    q = prepare(settled_cnn(), palette=palette, target_bits=target)
    fit(q, x, y, steps=20, penalty=True)
    report = snap(q)
    avg = average_bits(q)
    assert avg == pytest.approx(report["avg_bits"])
    assert avg <= target + 1e-9
    # "fit" spends the budget: the slack is less than one step up of the biggest channel
    biggest = max(layer.weights_per_channel() for _, layer in quant_layers(q))
    gap = max(b - a for a, b in zip(palette, palette[1:]))
    assert target - avg <= biggest * gap / report["weights"] + 1e-9
    for row in report["layers"].values():
        assert set(row["w_bits"]) <= set(palette)


def test_snap_keeps_the_learned_ranking():
    """Fitting the budget promotes the channels with the highest learned precision
    (within a layer; across layers a smaller channel may fill a gap a bigger one
    cannot)."""
    q = prepare(settled_cnn(), palette=(2, 8), target_bits=3.5)
    with torch.no_grad():
        for _, layer in quant_layers(q):
            layer.w_prec.logit.copy_(torch.linspace(-0.05, 0.05, layer.w_prec.channels))
    cont = {n: layer.w_prec.continuous().detach().clone() for n, layer in quant_layers(q)}
    snap(q)
    mixed = 0
    for n, layer in quant_layers(q):
        lows = [float(c) for c, b in zip(cont[n], layer.w_prec.bits) if b == 2]
        highs = [float(c) for c, b in zip(cont[n], layer.w_prec.bits) if b == 8]
        if lows and highs:
            mixed += 1
            assert min(highs) >= max(lows), n
    assert mixed >= 1


def test_nearest_snap_and_low_fraction():
    q = prepare(settled_cnn(), palette=(2, 8), low_fraction=0.75)
    assert q.soniq_config.target_bits == pytest.approx(3.5)
    q2 = prepare(settled_cnn(), palette=(2, 8), target_bits=3.5)
    snap(q2, budget="nearest")  # every continuous precision is 3.5: nearest is 2
    assert average_bits(q2) == 2.0
    report = bit_report(q2)
    assert report["compression"] == pytest.approx(16.0)


def test_bad_budget_arguments():
    with pytest.raises(ValueError, match="palette range"):
        prepare(settled_cnn(), palette=(2, 8), target_bits=9.0)
    with pytest.raises(ValueError, match="not both"):
        prepare(settled_cnn(), palette=(2, 8), target_bits=3.0, low_fraction=0.5)
    with pytest.raises(ValueError, match="palette"):
        prepare(settled_cnn(), palette=(4,), target_bits=4.0)
    q = prepare(settled_cnn(), palette=(2, 8), target_bits=3.0)
    snap(q)
    with pytest.raises(ValueError, match="already snapped"):
        snap(q)
