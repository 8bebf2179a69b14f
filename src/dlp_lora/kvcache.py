"""A dynamic KV cache that appends in place: the eager decode paths' cache.

transformers' `DynamicCache` appends a step's keys and values with `torch.cat`, a copy of the whole cache
every step: at 16 rows of about 250 columns that is 92 MB per step for SmolLM2-135M, 9 to 16 ms of a step
of 80 to 105 ms on this project's 2-core CPU. `GrowingCache` keeps each layer's keys and values as views of buffers with spare
columns, so a step writes its own column and copies nothing; the buffers grow by `HEADROOM` columns when
full (one copy per that many steps).

Everything that reads or replaces `layer.keys` / `layer.values` works as with `DynamicCache` (they are
(B, H, T, D) tensors): code that assigns new tensors to them (the engine's `merge` and `drop_finished`,
`crop`, `batch_select_indices`) leaves the buffers behind, and the next update copies into new ones. An
update never writes a column a reader was given, only columns past them, so views taken earlier (the
prefix cache's) stay valid.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

__all__ = ["HEADROOM", "GrowingLayer", "GrowingCache"]

HEADROOM = 64
"""Spare columns a buffer gets when it is (re)made: at most this many tokens per layer per row are held
unused (about 3 MB per row for SmolLM2-135M in float32: 30 layers, keys and values, 3 heads of 64), and a decode step copies the cache once per this many."""


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are the first T columns of (B, H, T + spare, D) buffers."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states: (B, H, t, D) -> every column's keys and values, (B, H, T + t, D)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = (key_states, value_states)
        n = self.keys.shape[-2] if self.keys.dim() == 4 else 0  # empty: lazy_initialization's 1-d tensors
        if not self._appendable(key_states):
            # The first update, keys/values replaced from outside, or full buffers: copy into new ones.
            buffers = tuple(s.new_empty(*s.shape[:2], n + s.shape[-2] + HEADROOM, s.shape[-1]) for s in new)
            if n:
                buffers[0][:, :, :n], buffers[1][:, :, :n] = self.keys, self.values
            self._buffers = buffers
        t = key_states.shape[-2]
        for buf, s in zip(self._buffers, new):
            buf[:, :, n : n + t] = s
        self.keys, self.values = self._views = tuple(buf[:, :, : n + t] for buf in self._buffers)
        return self.keys, self.values

    def _appendable(self, key_states: torch.Tensor) -> bool:
        """Whether keys/values are still this layer's own views and t more columns fit after them."""
        views = getattr(self, "_views", None)
        if views is None or self.keys is not views[0] or self.values is not views[1]:
            return False
        buf = self._buffers[0]
        fits = self.keys.shape[-2] + key_states.shape[-2] <= buf.shape[-2]
        return fits and key_states.shape[:2] == buf.shape[:2] and key_states.dtype == buf.dtype


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s (decoder-only models with full attention in every layer).

    data: as `DynamicCache`'s `ddp_cache_data`, per layer (keys, values) (B, H, T, D) to start from."""

    def __init__(self, data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        super().__init__()  # no config: layers are made on first use, of the class below
        self.layer_class_to_replicate = GrowingLayer
        for i, (keys, values) in enumerate(data or ()):
            self.update(keys, values, i)
