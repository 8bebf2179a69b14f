"""Reuse of scored prompts' KV caches: the options of one multiple-choice question share their context.

lm-evaluation-harness (and any client that scores answers by log-likelihood) sends one request per option:
the context with the option appended, `echo`, at most one new token. Computed alone, each request reads
the whole context again. `PrefixCache` keeps recent scoring prompts' KV caches and prompt log-probabilities
per mixture; a new scoring prompt that starts with the same tokens as one of them under the same mixture
runs only its own tail on top of the shared part (`Engine.score`). Same tokens, same mixture, same
position ids: the reused keys and values are those the prompt would compute itself (to float rounding of
the batch they were computed in). Least recently used entries leave once the cache holds more than
`max_tokens` tokens.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch

__all__ = ["CachedPrompt", "PrefixCache"]


@dataclass(eq=False)
class CachedPrompt:
    """One scored prompt: its token ids (T), the KV cache of each layer ((1, H, T, D) keys and values), its
    prompt log-probabilities as `Row.prompt_logprobs` holds them (T entries, the first None) and how many
    alternatives each lists (`top`)."""

    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logprobs: list
    top: int


class PrefixCache:
    """Recent scoring prompts by mixture, found by their first `min_shared` tokens (use from one thread)."""

    def __init__(self, max_tokens: int, min_shared: int = 8) -> None:
        if max_tokens < 0 or min_shared < 2:
            raise ValueError(f"expected max_tokens >= 0 and min_shared >= 2, got {max_tokens} and {min_shared}")
        self.max_tokens, self.min_shared = max_tokens, min_shared
        self._entries: OrderedDict[int, tuple[tuple, CachedPrompt]] = OrderedDict()  # LRU order, oldest first
        self._by_head: dict[tuple, dict[int, CachedPrompt]] = {}
        self._next = 0
        self.tokens = 0
        self.hits = self.reused_tokens = self.queried_tokens = 0  # since the start (clear keeps them)

    def lookup(self, mixture: Hashable, ids: list[int], top: int) -> tuple[CachedPrompt, int] | None:
        """The cached prompt under `mixture` sharing the most leading tokens with `ids` (at least
        `min_shared`) and listing at least `top` alternatives, with how many tokens of it to reuse: the
        shared ones, but at most len(ids) - 1 (the last token is always computed: it predicts the next)."""
        self.queried_tokens += len(ids)
        if len(ids) <= self.min_shared:
            return None
        best, shared = None, 0
        for key, entry in self._by_head.get((mixture, tuple(ids[: self.min_shared])), {}).items():
            if entry.top < top:
                continue
            n = len(os.path.commonprefix([entry.ids, ids]))
            if n > shared:
                best, shared, best_key = entry, n, key
        shared = min(shared, len(ids) - 1)
        if best is None or shared < self.min_shared:
            return None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += shared
        return best, shared

    def store(self, mixture: Hashable, entry: CachedPrompt) -> None:
        """Keep `entry` (its tensors are cloned: a slice of a batch's cache would hold the whole batch)."""
        if len(entry.ids) <= self.min_shared or len(entry.ids) > self.max_tokens:
            return
        entry.keys = [k.clone() for k in entry.keys]
        entry.values = [v.clone() for v in entry.values]
        head = (mixture, tuple(entry.ids[: self.min_shared]))
        key, self._next = self._next, self._next + 1
        self._entries[key] = (head, entry)
        self._by_head.setdefault(head, {})[key] = entry
        self.tokens += len(entry.ids)
        while self.tokens > self.max_tokens:
            old, (old_head, gone) = self._entries.popitem(last=False)
            del self._by_head[old_head][old]
            if not self._by_head[old_head]:
                del self._by_head[old_head]
            self.tokens -= len(gone.ids)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every entry (the adapter bank changed: a mixture's name may now mean other weights)."""
        self._entries.clear()
        self._by_head.clear()
        self.tokens = 0
