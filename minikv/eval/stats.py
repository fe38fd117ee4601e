"""Uncertainty of per-sample means: percentile bootstrap intervals, and paired differences between configs.

With 20 samples per cell a mean alone hides how much it would move on another 20; the percentile
bootstrap (Efron & Tibshirani 1993, ch. 13) resamples the per-sample values with replacement and takes the
2.5th and 97.5th percentiles of the resampled means. The seed is fixed so a table is reproducible. Configs
run on the same samples, so a difference between two configs is best judged *paired*: resampling the
per-sample differences removes the between-sample spread both configs share.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("the mean of no values is undefined")
    return sum(values) / len(values)


def bootstrap_ci(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``: (low, high). One value gives (v, v)."""
    values = list(values)
    n = len(values)
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - confidence) / 2
    return means[int(tail * (resamples - 1))], means[int(round((1 - tail) * (resamples - 1)))]


def summarize(values: Sequence[float]) -> dict[str, float | list[float]]:
    """Mean and its bootstrap interval, as stored in the results JSON: {"mean", "ci": [low, high]}."""
    low, high = bootstrap_ci(values)
    return {"mean": mean(values), "ci": [low, high]}


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> dict[str, float | list[float]]:
    """Mean of the per-sample differences ``values - baseline`` and its bootstrap interval (same samples)."""
    if len(values) != len(baseline):
        raise ValueError(f"paired values need the same samples: got {len(values)} and {len(baseline)}")
    return summarize([v - b for v, b in zip(values, baseline)])
