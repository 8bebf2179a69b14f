"""Paired bootstrap intervals for scores measured on the same examples (pure numpy, no model).

Two methods scored on one set of examples are compared example by example: resampling the examples
(with replacement) and recomputing the mean difference gives the spread that another draw of test
examples would show. A difference whose 95% interval contains 0 is reported as no difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Interval", "bootstrap_mean", "paired_difference", "stratified_mean_difference"]


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval (same units as the scores)."""

    estimate: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies entirely above or below 0 (a difference beyond noise)."""
        return self.low > 0 or self.high < 0

    def fmt(self, digits: int = 1) -> str:
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def _as_matrix(scores: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected a non-empty 1-D sequence of per-example scores, got shape {a.shape}")
    return a


def _interval(estimate: float, draws: np.ndarray, n: int, level: float) -> Interval:
    lo, hi = np.quantile(draws, [(1 - level) / 2, 1 - (1 - level) / 2])
    return Interval(float(estimate), float(lo), float(hi), n)


def bootstrap_mean(scores: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> Interval:
    """Mean of per-example scores (N,) with a percentile bootstrap interval."""
    a = _as_matrix(scores)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    return _interval(a.mean(), a[idx].mean(1), a.size, level)


def paired_difference(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Interval:
    """mean(a - b) over the same N examples, with a paired percentile bootstrap interval."""
    x, y = _as_matrix(a), _as_matrix(b)
    if x.shape != y.shape:
        raise ValueError(f"paired scores must cover the same examples; got {x.size} and {y.size}")
    return bootstrap_mean(x - y, level, resamples, seed)


def stratified_mean_difference(
    a: dict[str, Sequence[float]],
    b: dict[str, Sequence[float]],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Difference of task-averaged scores: mean over tasks of mean(a[t] - b[t]).

    Each task's examples are resampled within the task (tasks are fixed, examples vary), so a task with
    few examples keeps its weight of 1/T but contributes its own noise. a and b map task -> (N_t,) scores
    on the same examples; use it with b all zeros for a plain task-averaged score.
    """
    if set(a) != set(b) or not a:
        raise ValueError(f"both sides must score the same non-empty task set; got {sorted(a)} and {sorted(b)}")
    rng = np.random.default_rng(seed)
    draws = np.zeros(resamples)
    point = 0.0
    for task in sorted(a):
        x, y = _as_matrix(a[task]), _as_matrix(b[task])
        if x.shape != y.shape:
            raise ValueError(f"task {task!r}: paired scores must cover the same examples; got {x.size} and {y.size}")
        d = x - y
        point += d.mean()
        draws += d[rng.integers(0, d.size, size=(resamples, d.size))].mean(1)
    n = sum(len(v) for v in a.values())
    return _interval(point / len(a), draws / len(a), n, level)


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count half) of `scores` for `labels` in {0, 1}; nan without both labels."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if not pos.size or not neg.size:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


def bootstrap_auc(
    labels: Sequence[int], scores: Sequence[float], level: float = 0.95, resamples: int = 1000, seed: int = 0
) -> Interval:
    """How well `scores` (N,) rank the examples with label 1 above those with 0 (0.5: not at all, as a model
    answering from the label prior alone), with a percentile bootstrap interval over examples."""
    y, x = np.asarray(labels), _as_matrix(scores)
    if y.shape != x.shape or not set(np.unique(y)) <= {0, 1}:
        raise ValueError(f"expected {x.size} labels in {{0, 1}}, got {y.size}: {sorted(set(y.tolist()))[:5]}")
    rng = np.random.default_rng(seed)
    draws = np.array([_auc(y[i], x[i]) for i in rng.integers(0, y.size, size=(resamples, y.size))])
    return _interval(_auc(y, x), draws[~np.isnan(draws)], y.size, level)
