"""Intervals for evaluation numbers: percentile bootstrap of a mean, and of a paired difference.

Seeded, so the same numbers give the same interval on every run (a gate that
decides twice on the same answers decides the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self, digits: int = 4) -> dict:
        return {"mean": round(self.mean, digits), "low": round(self.low, digits), "high": round(self.high, digits),
                "n": self.n}


def bootstrap_mean(values: Sequence[float], confidence: float = 0.95, seed: int = 0) -> Interval:
    """The mean of `values` with a percentile-bootstrap interval (a point interval for fewer than 2 values)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to average")
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, mean, mean, int(x.size))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(RESAMPLES, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(mean, float(low), float(high), int(x.size))


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, seed: int = 0) -> Interval:
    """Mean of a[i] - b[i] with its bootstrap interval (the same prompts answered by two models)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in size: {len(a)} and {len(b)}")
    return bootstrap_mean([x - y for x, y in zip(a, b)], confidence, seed)
