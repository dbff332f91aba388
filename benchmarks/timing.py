"""Median-of-many wall-clock timing of a zero-argument callable.

Every peer is timed the same way, in the same process, one after the other:
``warmup`` untimed calls, then ``repeats`` timed calls of one run each
(``time.perf_counter``). The median is the headline; p10/p90 show the spread,
which on a shared 2-core machine is not small. A ``budget_s`` caps the timed
phase of slow peers: timing stops early (after at least ``min_repeats`` runs)
once the budget is spent, and the number of runs actually taken is reported.

:func:`paired_ratio` compares two callables *interleaved*: in each round a few
calls of one, then of the other (which goes first alternates), and the ratio of
the two medians of that round; the result is the median over rounds. A slow drift
of the machine (other tenants, clock changes over minutes) moves both sides of a
round alike, so the paired ratio holds where the ratio of two medians taken a
minute apart does not.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Latency statistics of one peer, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def measure(
    fn: Callable[[], object],
    repeats: int = 50,
    warmup: int = 3,
    budget_s: float | None = None,
    min_repeats: int = 3,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then up to ``repeats`` timed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    samples = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if budget_s is not None and len(samples) >= min_repeats and spent > budget_s:
            break
    ms = np.asarray(samples) * 1e3
    p10, med, p90 = np.percentile(ms, [10, 50, 90])
    return Timing(float(med), float(p10), float(p90), len(samples))


# idle seconds between two runtimes: a thread pool keeps spinning after its last
# call (TVM's for over 50 ms), and a runtime timed inside that window shares the two
# cores with it (ORT INT8's GEMV ran 3x slower; 0.2 s was always enough)
SETTLE_S = 0.25


def settle() -> None:
    time.sleep(SETTLE_S)


def paired_ratio(fn: Callable[[], object], ref_fn: Callable[[], object], rounds: int = 15,
                 per_round: int = 7, warm: int = 2, settle_s: float = SETTLE_S) -> tuple[float, float, float]:
    """Median, p10 and p90 over ``rounds`` of (median time of ``fn``) / (median time
    of ``ref_fn``). Each round runs both sides, the first of the two alternating;
    a side is ``settle_s`` of sleep (the other runtime's thread pool stops spinning,
    see :data:`SETTLE_S`), ``warm`` untimed calls (its own pool wakes up) and
    ``per_round`` timed calls."""
    if rounds < 1 or per_round < 1:
        raise ValueError(f"rounds and per_round must be >= 1, got {rounds}, {per_round}")

    def median_s(f) -> float:
        time.sleep(settle_s)
        for _ in range(warm):
            f()
        samples = []
        for _ in range(per_round):
            t0 = time.perf_counter()
            f()
            samples.append(time.perf_counter() - t0)
        return float(np.median(samples))

    ratios = []
    for r in range(rounds):
        if r % 2:
            t_ref = median_s(ref_fn)
            t = median_s(fn)
        else:
            t = median_s(fn)
            t_ref = median_s(ref_fn)
        ratios.append(t / t_ref)
    p10, med, p90 = np.percentile(ratios, [10, 50, 90])
    return float(med), float(p10), float(p90)
