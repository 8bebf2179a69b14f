"""Router probabilities -> Routing: which adapters each prompt uses, and with which weights.

Semantics: for each row independently, sort the adapters by probability (descending, ties by lower
index), keep a prefix of that order whose length the strategy decides (top-1 always kept, optionally
capped by `max_k`), and weight the kept adapters (renormalised probabilities or a softmax over them).
`plain_select_row` states this per row in plain Python; `select_with` computes it for a whole batch
with tensor ops, and the tests check the two agree.

Classes without an adapter (`no_adapter`, e.g. the router's `none` class: "no task fits, use the base
model alone") are selected like any other class, then: a row whose top-1 is such a class gets all-zero
weights (the base model alone); elsewhere such a class's kept weight is dropped, not renormalised away,
so that share of the mixture stays with the base model.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import exp
from typing import Literal

import torch

from ..config import SelectionConfig
from ..types import Routing

__all__ = ["select", "select_with", "plain_select_row"]

# Slack on "cumulative mass reaches p": float32 cumsums of probabilities that sum to exactly p
# (e.g. [0.5, 0.1] with p=0.6) land a few ulps below p and would keep one adapter too many.
_MASS_TOL = 1e-6


def select(
    probs: torch.Tensor,
    strategy: Literal["top_p", "top_k", "threshold"] = "top_p",
    p: float = 0.6,
    k: int = 2,
    threshold: float = 0.1,
    max_k: int | None = None,
    weighting: Literal["renorm", "softmax"] = "renorm",
    no_adapter: Sequence[int] = (),
) -> Routing:
    """Keyword form of :func:`select_with`; probs (B, N) -> Routing with indices/weights (B, kmax)."""
    cfg = SelectionConfig(strategy=strategy, p=p, k=k, threshold=threshold, max_k=max_k, weighting=weighting)
    return select_with(probs, cfg, no_adapter)


def select_with(probs: torch.Tensor, cfg: SelectionConfig, no_adapter: Sequence[int] = ()) -> Routing:
    """Select adapters for every row of probs (B, N) at once.

    Returns a Routing whose indices/weights are (B, kmax), kmax the largest kept count in the batch;
    slots past a row's own count carry weight 0. Kept adapters come heaviest first. Weights are float32
    (float64 when probs are float64). no_adapter: class indices with no adapter (module docstring); their
    slots keep their index with weight 0, so a caller maps class indices to its adapters before fusing.
    """
    probs = _checked(probs)
    base = _checked_classes(no_adapter, probs.shape[1])
    if probs.shape[0] == 0:
        return Routing(indices=torch.zeros(0, 1, dtype=torch.long), weights=torch.zeros(0, 1, dtype=probs.dtype))
    vals, order = probs.sort(dim=1, descending=True, stable=True)
    counts = _kept_counts(vals, cfg)
    kmax = int(counts.max())
    vals, order = vals[:, :kmax], order[:, :kmax]
    keep = torch.arange(kmax, device=probs.device).unsqueeze(0) < counts.unsqueeze(1)  # (B, kmax)
    weights = _weights(vals, keep, cfg.weighting)
    if base:
        is_base = torch.isin(order, torch.tensor(base, device=order.device))  # (B, kmax)
        # A base top-1 zeroes the row (base model alone); a base class further down only loses its share.
        weights = weights.masked_fill(is_base | is_base[:, :1], 0.0)
    return Routing(indices=order.contiguous(), weights=weights.contiguous())


def _checked_classes(no_adapter: Sequence[int], num: int) -> list[int]:
    if isinstance(no_adapter, (str, bytes)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in no_adapter
    ):
        raise TypeError(f"no_adapter must be a sequence of class indices (int), got {no_adapter!r}")
    bad = [i for i in no_adapter if not 0 <= i < num]
    if bad:
        raise ValueError(f"no_adapter indices {bad} are outside the router's {num} classes")
    return sorted(set(no_adapter))


def _checked(probs: torch.Tensor) -> torch.Tensor:
    """Validate a (B, N) probability matrix; returns it as float32/float64 for stable sums."""
    if not isinstance(probs, torch.Tensor):
        raise TypeError(f"probs must be a torch.Tensor (B, N), got {type(probs).__name__}")
    if probs.dim() != 2 or probs.shape[1] == 0:
        raise ValueError(f"probs must be 2-D (B, N) with N >= 1, got shape {tuple(probs.shape)}")
    if not torch.is_floating_point(probs):
        raise TypeError(f"probs must be a float tensor, got {probs.dtype}")
    # Half precision softmax rows can sum to 1 +- a few 1e-3; judge them by a looser tolerance.
    atol = 1e-2 if probs.dtype in (torch.float16, torch.bfloat16) else 1e-3
    probs = probs.detach() if probs.dtype == torch.float64 else probs.detach().float()
    if not torch.isfinite(probs).all():
        raise ValueError("probs contain NaN or inf; expected probabilities (softmax output)")
    if (probs < 0).any():
        raise ValueError(
            f"probs contain negative values (min {float(probs.min()):.4g}); expected probabilities (softmax output)"
        )
    sums = probs.sum(dim=1)
    bad = (sums - 1).abs() > atol
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"row {row} of probs sums to {float(sums[row]):.6g}, not 1; "
            "expected probabilities (softmax output), not logits"
        )
    return probs


def _kept_counts(vals: torch.Tensor, cfg: SelectionConfig) -> torch.Tensor:
    """Kept count per row (B,) long in [1, N], from probabilities sorted descending (B, N)."""
    num = vals.shape[1]
    if cfg.strategy == "top_p":
        # Positions whose cumulative mass is still short of p, plus the one that reaches it.
        counts = (vals.cumsum(dim=1) < cfg.p - _MASS_TOL).sum(dim=1) + 1
        # Rounding can leave a row short of p=1.0; never keep adapters the router gave zero mass.
        counts = torch.minimum(counts, (vals > 0).sum(dim=1))
    elif cfg.strategy == "top_k":
        counts = torch.full((vals.shape[0],), cfg.k, dtype=torch.long, device=vals.device)
    else:
        counts = (vals >= cfg.threshold).sum(dim=1)
    upper = num if cfg.max_k is None else min(num, cfg.max_k)
    return counts.clamp(min=1, max=upper)


def _weights(vals: torch.Tensor, keep: torch.Tensor, weighting: str) -> torch.Tensor:
    """Weights (B, k) over the kept entries of vals (B, k); zero where keep is False."""
    if weighting == "softmax":
        # Softmax over kept probabilities only: masked slots get -inf, hence exactly 0.
        return vals.masked_fill(~keep, float("-inf")).softmax(dim=1)
    kept = vals * keep
    return kept / kept.sum(dim=1, keepdim=True)


def plain_select_row(
    probs_row: Sequence[float] | torch.Tensor, cfg: SelectionConfig, no_adapter: Sequence[int] = ()
) -> list[tuple[int, float]]:
    """Reference semantics for one row (N,): the kept (index, weight) pairs, heaviest first.

    Plain Python, one row at a time; only used to check :func:`select_with` in tests.
    """
    probs = [float(x) for x in (probs_row.tolist() if isinstance(probs_row, torch.Tensor) else probs_row)]
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    if cfg.strategy == "top_p":
        count, mass = 0, 0.0
        for i in order:
            count, mass = count + 1, mass + probs[i]
            if mass >= cfg.p - _MASS_TOL:
                break
        count = min(count, sum(1 for x in probs if x > 0))
    elif cfg.strategy == "top_k":
        count = cfg.k
    else:
        count = sum(1 for x in probs if x >= cfg.threshold)
    count = max(1, min(count, len(probs), cfg.max_k or len(probs)))
    kept = [probs[i] for i in order[:count]]
    if cfg.weighting == "softmax":
        top = max(kept)
        exps = [exp(x - top) for x in kept]
        weights = [e / sum(exps) for e in exps]
    else:
        weights = [x / sum(kept) for x in kept]
    if order[0] in no_adapter:
        weights = [0.0] * count
    weights = [0.0 if i in no_adapter else w for i, w in zip(order, weights)]
    return list(zip(order[:count], weights))
