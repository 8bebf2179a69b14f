"""Calibration of router probabilities: temperature scaling, expected calibration error, reliability bins.

Temperature scaling (Guo et al., 2017) divides every logit by one scalar T > 0 fitted to minimise the
negative log-likelihood of held-out labels. It never changes the argmax (so top-1 accuracy is unchanged);
it makes the probabilities honest, which is what top-p selection sums.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["fit_temperature", "expected_calibration_error", "reliability_bins"]


def _checked(scores: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ValueError(f"{what} must be (B, N) with B >= 1, got shape {tuple(scores.shape)}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"labels must be ({scores.shape[0]},), got shape {tuple(labels.shape)}")


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """T > 0 minimising cross_entropy(logits / T, labels), for logits (B, N) and labels (B,) long.

    Optimised over log T with L-BFGS (one convex-enough scalar problem), in float64 for a stable answer.
    """
    _checked(logits, labels, "logits")
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> list[dict]:
    """Top-1 confidence bins over (0, 1]: per bin its range, count, mean confidence and accuracy."""
    _checked(probs, labels, "probs")
    conf, pred = probs.max(dim=1)
    right = (pred == labels).double()
    edges = torch.linspace(0, 1, num_bins + 1, dtype=torch.float64)
    # Bin i holds confidences in (edges[i], edges[i+1]]; a confidence of exactly 0 cannot occur (top-1 >= 1/N).
    which = (torch.bucketize(conf.double(), edges, right=False) - 1).clamp(0, num_bins - 1)
    out = []
    for i in range(num_bins):
        rows = which == i
        n = int(rows.sum())
        out.append(
            {
                "lo": float(edges[i]),
                "hi": float(edges[i + 1]),
                "count": n,
                "confidence": float(conf[rows].double().mean()) if n else None,
                "accuracy": float(right[rows].mean()) if n else None,
            }
        )
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    """ECE: sum over confidence bins of (bin share) * |accuracy - mean confidence|, for probs (B, N)."""
    bins = reliability_bins(probs, labels, num_bins)
    total = probs.shape[0]
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"])
