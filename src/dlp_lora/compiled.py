"""A compiled decode step: the model's one-token forward run by torch.compile over a static KV cache.

At batch 1 on CPU the eager decode step is mostly overhead, not arithmetic: ~10,000 small aten calls and
transformers' Python per token against 7 ms of int8 GEMMs (docs/performance.md). torch.compile (inductor)
fuses the small ops into a few C++ kernels and drops the Python; it needs every step to have the same
shapes, hence transformers' `StaticCache` (keys and values in fixed (B, heads, L, d) buffers) and a
full-length attention mask made once per call, where the eager loop grows both by a column per step.

The routing still lives in the fused layers' slot (nothing here knows about adapters): the compiled graph
reads the same prepared tensors as the eager one, and a new request with the same path and shapes reuses
the graph (dynamo guards on shapes, not on the routing's values). A new shape (batch size, cache length
bucket, a path or k not seen before) compiles again once, which takes tens of seconds on 2 cores.

Outputs equal the eager decoder's to float tolerance, not bit for bit: inductor reorders float sums.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable

import torch
from transformers import PreTrainedModel, StaticCache

__all__ = ["CompiledDecoder", "check_compile"]


def check_compile(device: torch.device | str) -> None:
    """Raise RuntimeError when torch.compile cannot build kernels for `device` here."""
    if torch.device(device).type == "cpu" and not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        raise RuntimeError(
            "compile=True needs a C++ compiler for torch.compile's CPU backend (g++, clang++ or "
            "c++ on PATH), found none; install one (e.g. `apt install g++`) or run without compile"
        )


class CompiledDecoder:
    """An `engine.Decoder` whose steps run compiled over a static cache; keep one per model and reuse it
    (the compiled graph and the cache survive between calls; a call resets the cache).

    length_step: the cache length is the prompt plus max_new_tokens rounded up to a multiple of it, so
    calls of different lengths share one compiled graph. backend: torch.compile's (tests use "eager" or a
    counting backend; "inductor" is the one that makes kernels).
    """

    def __init__(self, model: PreTrainedModel, length_step: int = 256, backend: str | Callable = "inductor") -> None:
        if length_step < 1:
            raise ValueError(f"length_step must be >= 1, got {length_step}")
        if backend == "inductor":
            check_compile(model.device)
        self.model = model
        self.length_step = length_step
        # dynamic=False: shapes are static by construction; a new batch size compiles once more.
        self._step = torch.compile(model, backend=backend, dynamic=False)
        self._cache: StaticCache | None = None
        self._shape: tuple[int, int] | None = None  # (batch, length) of the cache
        self._mask: torch.Tensor | None = None
        self._next = 0  # cache slot of the next token

    def prefill(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        """input_ids, mask, positions: (B, T) -> logits (B, V). Runs eagerly (prompt lengths vary)."""
        b, t = input_ids.shape
        length = -(-(t + max_new_tokens) // self.length_step) * self.length_step
        if self._shape != (b, length):
            self._cache, self._shape = StaticCache(config=self.model.config, max_cache_len=length), (b, length)
        else:
            self._cache.reset()
        # Columns past the prompt are 1: the causal mask (from cache_position) already hides unwritten slots.
        self._mask = torch.cat([mask, mask.new_ones(b, length - t)], dim=1)
        self._next = t
        out = self.model(
            input_ids=input_ids,
            attention_mask=self._mask,
            position_ids=positions,
            cache=self._cache,
            cache_position=torch.arange(t, device=input_ids.device),
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions: (B,) -> logits (B, V), compiled."""
        if self._next >= self._shape[1]:
            raise RuntimeError(f"the static cache holds {self._shape[1]} tokens; prefill with a larger max_new_tokens")
        out = self._step(
            input_ids=tokens[:, None],
            attention_mask=self._mask,
            position_ids=positions[:, None],
            cache=self._cache,
            cache_position=torch.tensor([self._next], device=tokens.device),
            use_cache=True,
        )
        self._next += 1
        return out.logits[:, -1]
