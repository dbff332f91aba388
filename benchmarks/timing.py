"""Median-of-many wall-clock timing of a zero-argument callable.

Every peer is timed the same way, in the same process, one after the other:
``warmup`` untimed calls, then ``repeats`` timed calls of one run each
(``time.perf_counter``). The median is the headline; p10/p90 show the spread,
which on a shared 2-core machine is not small. A ``budget_s`` caps the timed
phase of slow peers: timing stops early (after at least ``min_repeats`` runs)
once the budget is spent, and the number of runs actually taken is reported.
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
