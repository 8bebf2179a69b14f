"""Values shared between modules. No behaviour beyond validation of their own shape."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ArrowRouting", "Routing"]


@dataclass(frozen=True)
class Routing:
    """The adapters each batch row uses and their weights: the only thing router and fusion share.

    indices: (B, k) long, adapter indices in bank order; padding slots repeat any valid index with weight 0.
    weights: (B, k) float, >= 0; a row of zeros means "base model" for that row.
    """

    indices: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        if self.indices.dim() != 2 or self.weights.shape != self.indices.shape:
            raise ValueError(
                f"Routing expects indices and weights of one shape (B, k); got {tuple(self.indices.shape)} "
                f"and {tuple(self.weights.shape)}"
            )
        if self.indices.dtype != torch.long:
            raise TypeError(f"Routing.indices must be torch.long, got {self.indices.dtype}")
        if not torch.is_floating_point(self.weights):
            raise TypeError(f"Routing.weights must be a float tensor, got {self.weights.dtype}")
        if not torch.isfinite(self.weights).all() or (self.weights < 0).any():
            raise ValueError("Routing.weights must be finite and >= 0")

    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]

    def to_dense(self, num_adapters: int) -> torch.Tensor:
        """(B, N) weight matrix; duplicate indices in a row add up."""
        if self.indices.numel() and (self.indices.min() < 0 or self.indices.max() >= num_adapters):
            raise ValueError(f"Routing index out of range for {num_adapters} adapters")
        dense = torch.zeros(self.batch_size, num_adapters, dtype=self.weights.dtype, device=self.weights.device)
        return dense.scatter_add_(1, self.indices, self.weights)

    @staticmethod
    def from_dense(weights: torch.Tensor, min_k: int = 1) -> Routing:
        """Routing that keeps every nonzero entry of a (B, N) matrix, padded to the row with most (and to at
        least min_k entries, at most N: a fixed k keeps a compiled graph's shapes)."""
        if weights.dim() != 2:
            raise ValueError(f"dense weights must be (B, N), got shape {tuple(weights.shape)}")
        k = max(int((weights != 0).sum(1).max()) if weights.numel() else 0, min(min_k, weights.shape[1]), 1)
        # Sorting by weight puts the nonzeros first; padding slots then carry weight 0.
        vals, idx = weights.sort(dim=1, descending=True, stable=True)
        return Routing(indices=idx[:, :k].contiguous(), weights=vals[:, :k].contiguous())

    def row(self, b: int) -> list[tuple[int, float]]:
        """(adapter index, weight) pairs of row b with nonzero weight, heaviest first."""
        pairs = [(int(i), float(w)) for i, w in zip(self.indices[b], self.weights[b]) if w > 0]
        return sorted(pairs, key=lambda p: -p[1])


@dataclass(frozen=True)
class ArrowRouting:
    """Arrow's training-free routing (arXiv 2405.11157, as PEFT's `create_arrow_model` computes it): in every
    fused layer, every token goes to the `top_k` experts whose prototype (the top right singular vector of
    the expert's B A in that layer) best matches it, |x . p| / temperature softmaxed over those k.

    experts: bank indices of the task adapters routed among; general: bank indices of general adapters
    whose mean A and mean B are subtracted from each expert's (GenKnowSub; () for none); seed: of the
    power iteration's start vector (PEFT's `rng_seed`); iters: power-iteration steps (PEFT's 15).
    """

    experts: tuple[int, ...]
    top_k: int = 3
    temperature: float = 1.0
    general: tuple[int, ...] = ()
    seed: int = 0
    iters: int = 15

    def __post_init__(self) -> None:
        if not self.experts or len(set(self.experts)) != len(self.experts):
            raise ValueError(f"Arrow needs distinct expert adapters, got {self.experts}")
        if not 1 <= self.top_k <= len(self.experts):
            raise ValueError(f"arrow top_k must be in [1, {len(self.experts)}] (the experts), got {self.top_k}")
        if not self.temperature > 0:
            raise ValueError(f"arrow temperature must be > 0, got {self.temperature}")
        if set(self.general) & set(self.experts):
            raise ValueError(f"general adapters {self.general} must not be experts {self.experts}")
        if self.iters < 1:
            raise ValueError(f"arrow iters must be >= 1, got {self.iters}")
