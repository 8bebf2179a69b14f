"""Compiled decoding of a running batch whose rows come and go (the server's continuous batching).

The eager running batch (`Engine.prefill/merge/decode/drop_finished`) grows a KV cache by one column per
step (`kvcache.GrowingCache`) and every step has new shapes, so it cannot be compiled. Here the KV cache is
a transformers `StaticCache` of fixed shape (S slots, L columns):

- every live row sits in a slot; its keys and values fill columns [start, t) and its attention mask opens
  [start, L) (columns after t are hidden by the causal mask: `compiled.CompiledDecoder` does the same);
- each step writes column t for every slot at once (one `cache_position`), so the step's shapes depend on S
  alone: one compiled graph per slot count (a "bucket": 1, 2, 4, ... by default) serves every step, join
  and leave; the routing is pinned to one path per slot count (`dense`, or `gathered` with k >= 2 for one
  slot: a free slot is a zero row, as the base model is), so a new mixture changes tensor values, not the
  graph;
- rows join after their eager prefill (prompts differ in length): their keys and values are copied into
  free slots to end at column t (everything moves right first when t is shorter than a new prompt);
- when t reaches L, the live columns move left (the longest live row decides how far): the columns no
  live row attends to are dropped, as `Engine.drop_finished` trims the eager cache;
- the bucket grows when rows join beyond it and shrinks when rows leave.

A row whose prompt plus max_tokens exceeds L cannot ride here (`fits`); the server decodes such a batch
eagerly (`to_running`). Every row keeps its own mixture, sampling and generator: tokens are chosen by
`Engine.advance`, as on the eager path. Outputs equal the eager ones to float tolerance (inductor reorders
float sums; free slots and masked columns never reach a live row: attention and every layer are per row).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
from transformers import StaticCache

from dlp_lora.compiled import check_compile
from dlp_lora.engine import Engine, Row, RunningBatch
from dlp_lora.fusion.layer import PinnedPath
from dlp_lora.kvcache import GrowingCache

__all__ = ["SlotBatch"]

_log = logging.getLogger(__name__)


def _path(slots: int) -> PinnedPath:
    """The fused path of a slot count. One row: `gathered` (only its own adapters' stacks are read: 24.8 vs
    35.7 ms per step with `dense` over rank-padded stacks, measured on the bundled bank); more: `dense`
    (two plain matmuls over the whole bank's unpadded stacks for all rows, where `gathered` runs a batched
    matmul of tiny per-row products)."""
    return "gathered" if slots == 1 else "dense"


class SlotBatch:
    """The running batch on a static KV cache, decoded compiled; the server's worker thread only.

    engine: chooses tokens and routes (its model is compiled here). sizes: slot counts to compile for (a
    batch of B rows runs in the smallest size >= B). length: columns of the cache (L). backend:
    torch.compile's (tests use "eager" or a counting backend).
    """

    def __init__(
        self,
        engine: Engine,
        sizes: Sequence[int] = (1, 2, 4, 8, 16, 32),
        length: int = 512,
        backend: str | Callable = "inductor",
    ) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"sizes must be slot counts >= 1, got {list(sizes)}")
        if length < 2:
            raise ValueError(f"length must be >= 2 columns, got {length}")
        if len(set(sizes)) > torch._dynamo.config.recompile_limit - 2:
            raise ValueError(
                f"{len(set(sizes))} slot counts would pass torch.compile's limit of "
                f"{torch._dynamo.config.recompile_limit} graphs per function (beyond it, steps run eagerly); "
                f"give at most {torch._dynamo.config.recompile_limit - 2}"
            )
        if engine.arrow is not None:
            raise ValueError("Arrow routes each token in the layers; its batches decode eagerly")
        if backend == "inductor":
            check_compile(engine.device)
        self.engine, self.sizes, self.length = engine, tuple(sorted(set(sizes))), length
        self.model = engine.model
        # dynamic=False: every shape is static by construction; each slot count compiles once.
        self._step = torch.compile(self.model, backend=backend, dynamic=False)
        self.rows: list[Row | None] = []  # per slot
        self._start: list[int] = []  # per slot: the row's first column
        self._cache: StaticCache | None = None
        self._t = 0  # the column the next step writes
        self._positions: torch.Tensor | None = None  # (S, 1) position id of each slot's last token
        self._mask: torch.Tensor | None = None  # (S, L)

    # ---- what rides ------------------------------------------------------------------------------
    @property
    def live(self) -> list[Row]:
        return [r for r in self.rows if r is not None]

    @property
    def _occupied(self) -> list[int]:
        """Indices of the slots that hold a row."""
        return [s for s, r in enumerate(self.rows) if r is not None]

    def __len__(self) -> int:
        return len(self.live)

    @property
    def capacity(self) -> int:
        """The most rows that ride at once (the largest size)."""
        return self.sizes[-1]

    def fits(self, row: Row) -> bool:
        """Whether the row's whole life (prompt and every answer token) fits the cache's columns."""
        return len(row.prompt_ids) + max(row.max_tokens, 1) <= self.length

    def _context(self, slot: int) -> int:
        return self._t - self._start[slot]

    # ---- joining and leaving ------------------------------------------------------------------------
    def join(self, new: RunningBatch) -> None:
        """Take `new`'s rows (just prefilled, none finished, each `fits`) into free slots."""
        if any(r.done for r in new.rows) or not all(self.fits(r) for r in new.rows):
            raise ValueError("join takes unfinished rows that fit the cache (call drop_finished, check fits)")
        need = len(self) + len(new)
        if need > self.capacity:
            raise ValueError(f"{need} rows do not fit {self.capacity} slots")
        self._resize(next(s for s in self.sizes if s >= need))
        lengths = new.mask.sum(1).tolist()
        if self._t < max(lengths):  # room on the left for the longest new prompt
            self._move(max(lengths))
        width = new.mask.shape[1]
        free = [s for s, r in enumerate(self.rows) if r is None]
        for (b, row), s in zip(enumerate(new.rows), free):
            n = int(lengths[b])
            for static, layer in zip(self._cache.layers, new.cache.layers):
                static.keys[s, :, self._t - n : self._t] = layer.keys[b, :, width - n :]
                static.values[s, :, self._t - n : self._t] = layer.values[b, :, width - n :]
            self.rows[s], self._start[s] = row, self._t - n
            self._positions[s] = new.positions[b]
        self._remask()

    def drop_finished(self) -> None:
        """Free the slots of rows that ended; move to a smaller size when the rest fit one."""
        if not any(r is not None and r.done for r in self.rows):
            return  # no row ended: slots, size and mask stay as they are (the server calls this every step)
        self.rows = [r if r is not None and not r.done else None for r in self.rows]
        if not self.live:
            self.rows, self._start, self._cache = [], [], None
            return
        smaller = next(s for s in self.sizes if s >= len(self))
        if smaller < len(self.rows):
            self._resize(smaller)
        self._remask()

    def to_running(self) -> RunningBatch | None:
        """The live rows as an eager `RunningBatch` (their own columns only); the slots empty."""
        live = self._occupied
        if not live:
            return None
        width = max(self._context(s) for s in live)
        index = torch.tensor(live, device=self._mask.device)
        cols = slice(self._t - width, self._t)
        data = [(layer.keys[index, :, cols], layer.values[index, :, cols]) for layer in self._cache.layers]
        batch = RunningBatch(
            rows=[self.rows[s] for s in live],
            cache=GrowingCache(data),  # copies the columns into its own buffers
            mask=self._mask[index, cols].clone(),
            positions=self._positions[index].clone(),
        )
        self.rows, self._start, self._cache = [], [], None
        return batch

    # ---- decoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self) -> None:
        """One more token for every live row (compiled); finished rows must have been dropped."""
        if not self.live:
            raise ValueError("decode needs at least one live row")
        if any(r.done for r in self.live):
            raise ValueError("decode got finished rows; call drop_finished first")
        if self._t == self.length:  # full: drop the columns no live row attends to
            self._move(max(map(self._context, self._occupied)))
        last = [r.tokens[-1] if r is not None else self.engine.pad for r in self.rows]
        self._positions += 1
        logits = self._forward(torch.tensor(last, device=self._mask.device))
        self._t += 1
        live = self._occupied
        self.engine.advance([self.rows[s] for s in live], logits[live] if len(live) < len(self.rows) else logits)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (S,) -> logits (S, V): the compiled step at column t, under the slots' routing."""
        self.engine.route(self.rows, path=_path(len(self.rows)))
        for layer in self._cache.layers:  # where StaticLayer writes this step's keys and values
            layer.cumulative_length.fill_(self._t)
        out = self._step(
            input_ids=tokens[:, None],
            attention_mask=self._mask,
            position_ids=self._positions,
            cache=self._cache,
            cache_position=torch.tensor([self._t], device=tokens.device),
            use_cache=True,
        )
        return out.logits[:, -1]

    def warm(self, sizes: Sequence[int] | None = None) -> dict[int, float]:
        """Compile the step for each size now (seconds each, by size), so no request waits for it."""
        seconds = {}
        for size in sizes or self.sizes:
            t0 = time.perf_counter()
            self._resize(size)
            self.rows = [None] * size
            self._remask()
            with torch.no_grad():
                self._forward(torch.full((size,), self.engine.pad, device=self._mask.device))
            seconds[size] = round(time.perf_counter() - t0, 2)
            _log.info("compiled the decode step for %d slots in %.1f s", size, seconds[size])
        self.engine.release()
        self.rows, self._start, self._cache = [], [], None
        return seconds

    # ---- the cache's layout -----------------------------------------------------------------------
    def _resize(self, size: int) -> None:
        """Hold `size` slots: a new cache when the size changes, live rows packed into its first slots."""
        if self._cache is not None and len(self.rows) == size:
            return
        cfg = self.model.config
        heads, dim = (
            cfg.num_key_value_heads,
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        )
        cache = StaticCache(config=cfg, max_cache_len=self.length)
        shape = torch.empty(size, heads, 0, dim, dtype=self.model.dtype, device=self.engine.device)
        for layer in cache.layers:
            layer.lazy_initialization(shape, shape)
        live = self._occupied
        positions = torch.zeros(size, 1, dtype=torch.long, device=self.engine.device)
        if live:
            index = torch.tensor(live, device=self.engine.device)
            for old, layer in zip(self._cache.layers, cache.layers):
                layer.keys[: len(live)] = old.keys[index]
                layer.values[: len(live)] = old.values[index]
            positions[: len(live)] = self._positions[index]
        self.rows = [self.rows[s] for s in live] + [None] * (size - len(live))
        self._start = [self._start[s] for s in live] + [0] * (size - len(live))
        self._cache, self._positions = cache, positions
        if not live:
            self._t = 0

    def _move(self, t: int) -> None:
        """Move every slot's columns so that the next step writes column `t` (every live row keeps its
        whole context: t >= the longest, and t < L)."""
        shift = t - self._t
        if shift == 0:
            return
        assert all(self._context(s) <= t for s in self._occupied) and t < self.length
        for layer in self._cache.layers:
            # roll wraps columns around: they land outside every live row's columns, masked, and finite.
            layer.keys.copy_(torch.roll(layer.keys, shift, dims=2))
            layer.values.copy_(torch.roll(layer.values, shift, dims=2))
        self._start = [s + shift if r is not None else 0 for s, r in zip(self._start, self.rows)]
        self._t = t
        self._remask()  # the rows' columns moved: the step about to run must see them where they are now

    def _remask(self) -> None:
        """Each live row sees its columns from its start on; a free slot sees every column (finite values,
        an output nobody reads)."""
        cols = torch.arange(self.length, device=self.engine.device)
        starts = torch.tensor(self._start, device=self.engine.device)[:, None]
        self._mask = (cols[None] >= starts).long()
