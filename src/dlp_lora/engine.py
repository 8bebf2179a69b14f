"""The decode loop: every generated token of the library, the evaluation and the server comes from here.

`Engine.generate(rows)` runs a fixed set of rows to their ends (`DLPLoRA.generate`, the evaluation harness)
over a `Decoder` (eager by default; `compiled.CompiledDecoder` runs the steps compiled over a static KV
cache). For a running
batch whose rows come and go (continuous batching) the caller (the server's scheduler) owns one
`RunningBatch` and drives it with four calls:
  prefill(rows)          run new rows' prompts on their own (left padded) and pick each row's first token
  merge(running, new)    one batch: KV caches and masks left padded to the longer one, rows stacked
  decode(batch)          one more token for every row of the batch
  drop_finished(batch)   rows that ended leave at once (and padding columns no row needs any more go)
Every row keeps its own adapter mixture and `GenerationConfig` (sampling, its own generator so a seeded
row reproduces whatever runs beside it, stop strings, token limit); `sampling.py` picks the tokens. The
mixtures become the (B, N) routing of the fused layers through `FusedLoRAModel.routed` / `reroute`, set again only when the rows
of the forward pass change (a join, a leave) or a row's mixture changes (`Row.reroute`, sentence
routing), so gathered stacks or merged weights are built once per change, not once per token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlp_lora.chat import left_pad
from dlp_lora.config import GenerationConfig
from dlp_lora.fusion.inject import FusedLoRAModel
from dlp_lora.fusion.layer import PinnedPath
from dlp_lora.kvcache import GrowingCache
from dlp_lora.prefixes import CachedPrompt, PrefixCache
from dlp_lora.sampling import cut_at_stop, eos_ids, sample_next, stop_reached
from dlp_lora.types import ArrowRouting

__all__ = [
    "Decoder",
    "EagerDecoder",
    "Engine",
    "Result",
    "Row",
    "RunningBatch",
    "StepCallback",
    "TokenLogprob",
    "listed",
    "similar_lengths",
    "switches_of",
]

T = TypeVar("T")

StepCallback = Callable[[torch.Tensor, torch.Tensor], None]
"""on_step(tokens (B,), finished (B,)), host tensors, after each step of `Engine.generate`: each row's
newest answer token (the pad id where the row added none this step) and whether the row has ended."""


class Decoder(Protocol):
    """Runs the model's forward passes for `Engine.generate` over a fixed set of rows (KV cache inside)."""

    def prefill(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        """input_ids, mask, positions: (B, T) -> next-token logits (B, V); room for max_new_tokens steps."""
        ...

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions: (B,) -> next-token logits (B, V)."""
        ...


class EagerDecoder:
    """The default `Decoder`: transformers' dynamic KV cache, the model run eagerly, the mask growing by one
    column per step. One per `Engine.generate` call (it holds that call's cache)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self._mask: torch.Tensor | None = None
        self._cache = None

    def prefill(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, max_new_tokens: int
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=GrowingCache(),
            use_cache=True,
            logits_to_keep=1,
        )
        self._mask, self._cache = mask, out.cache
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self._mask,
            position_ids=positions[:, None],
            cache=self._cache,
            use_cache=True,
        )
        self._cache = out.cache
        return out.logits[:, -1]


MAX_TOP_LOGPROBS = 20
"""Most alternatives reported per token (OpenAI's limit)."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model, and the `top` most likely tokens at that position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Result:
    """One row's answer, as the library (`DLPLoRA.generate`) and the server return it: the text (cut at
    its stop string), the adapter mixture it started under (heaviest first), token counts and ids, and
    the log-probabilities where they were asked for."""

    text: str
    adapters: list[str]
    weights: list[float]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    switches: list[dict] = field(default_factory=list)
    """Mid-answer mixture changes (`sentence` routing): {"token": i, "adapters": [...], "weights": [...]},
    the mixture answer tokens i, i+1, ... were sampled under; `adapters`/`weights` above are the first."""
    sentence: bool = False
    """The row was routed again after each generated sentence (`switches` lists what changed)."""
    arrow: bool = False
    """Arrow routed every token in the layers: there is no one mixture (`adapters` and `weights` are empty)."""
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[TokenLogprob] | None = None
    """With `Row.logprobs`: one per answer token, plus the EOS token that ended the answer (scored, not text)."""
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """With `Row.echo`: one per prompt token (the first is None)."""


def listed(mixture: Mapping[str, float]) -> tuple[list[str], list[float]]:
    """{adapter: weight} -> (adapters, weights rounded to 1e-6), heaviest first, zero weights left out."""
    pairs = sorted(((n, float(w)) for n, w in mixture.items() if w > 0), key=lambda p: -p[1])
    return [n for n, _ in pairs], [round(w, 6) for _, w in pairs]


@dataclass(eq=False)
class Row:
    """One sequence of a batch: what was asked, and what it has produced so far.

    `mixture` maps adapter names to weights ({} is the base model alone). `params` are its decoding
    settings (`max_new_tokens` may be 0 when only the prompt's log-probabilities are wanted; `seed`
    seeds this row's own generator). `logprobs`: None, or how many alternatives to report per generated
    token (0 reports the chosen token's log-probability only); `echo` also scores the prompt's tokens (the
    first has no log-probability).

    `reroute` (sentence routing; the engine knows no router) is fed every answer token the row keeps
    and goes on after (not the one that ends it) and returns the mixture the row continues under from
    its next token on, or None to keep its mixture; the other rows keep theirs and the KV cache stays as
    it was computed. `switches` records each change: (index of the first answer token sampled under
    it, the mixture).
    """

    prompt_ids: list[int]
    mixture: Mapping[str, float]
    params: GenerationConfig = field(default_factory=GenerationConfig)
    logprobs: int | None = None
    echo: bool = False
    tokens: list[int] = field(default_factory=list)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    finish_reason: Literal["stop", "length", "abort"] | None = None
    generator: torch.Generator | None = None
    reroute: Callable[[int], Mapping[str, float] | None] | None = None
    switches: list[tuple[int, Mapping[str, float]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a row needs at least one prompt token, got none")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs}")

    @property
    def max_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def stop(self) -> tuple[str, ...]:
        return self.params.stop

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: Literal["stop", "length", "abort"]) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason


@dataclass(eq=False)
class RunningBatch:
    """Rows decoded together. cache: the model's KV cache (B rows, T columns); mask: (B, T) attention
    mask, 0 on each row's left padding; positions: (B, 1) position id of each row's last token."""

    rows: list[Row]
    cache: object
    mask: torch.Tensor
    positions: torch.Tensor

    def __len__(self) -> int:
        return len(self.rows)


def switches_of(row: Row) -> list[dict]:
    """The row's mixture changes that some answer token was sampled under (a change just before the row
    ended is none): {"token": i, "adapters": [...], "weights": [...]}."""
    out = []
    for token, mixture in row.switches:
        if token < len(row.tokens):
            adapters, weights = listed(mixture)
            out.append({"token": token, "adapters": adapters, "weights": weights})
    return out


def similar_lengths(items: list[T], length: Callable[[T], int]) -> list[list[T]]:
    """`items` in groups of similar `length` (each at most twice its group's shortest, plus 8), shortest
    first: one forward pass per group, so a long sequence does not pad every short one to its length."""
    groups: list[list[T]] = []
    shortest = 0  # length of the current group's first (shortest) item
    for item in sorted(items, key=length):
        n = length(item)
        if groups and n <= 2 * shortest + 8:
            groups[-1].append(item)
        else:
            groups.append([item])
            shortest = n
    return groups


def _left_pad_to(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros on the left of `dim` up to `width` (KV tensors (B, H, T, D) use dim 2, masks (B, T) dim 1)."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Engine:
    """Step-level calls over one model; use from one thread only (the model is not thread-safe).

    target: a `FusedLoRAModel` (rows carry adapter mixtures) or a plain model (every row's mixture must be
    {}: a base model, a peft model, a fused model routed by the caller). decoder: runs `generate`'s
    forward passes (default: an `EagerDecoder` per call; a `compiled.CompiledDecoder` runs the steps
    compiled over a static cache). arrow: every row is routed by Arrow (per token, in the fused layers)
    instead of by its mixture, which must then be {}. The continuous-batching calls (prefill, decode, merge,
    drop_finished) run eagerly; both ways (and `slots.SlotBatch`) choose tokens and end rows in `advance`.
    """

    def __init__(
        self,
        target: FusedLoRAModel | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        decoder: Decoder | None = None,
        arrow: ArrowRouting | None = None,
    ) -> None:
        self.fused = target if isinstance(target, FusedLoRAModel) else None
        if arrow is not None and self.fused is None:
            raise ValueError("Arrow routing needs a FusedLoRAModel (its adapters are the experts)")
        self.arrow = arrow
        self.model = target.model if self.fused is not None else target
        self.tokenizer, self.decoder = tokenizer, decoder
        self.eos = eos_ids(self.model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos), 0)
        self._routing: ExitStack | None = None
        self._routed_rows: list[Row] = []
        self._stale = False  # a routed row changed its mixture: route again before the next forward
        self._path: PinnedPath | None = None  # the path the current routing is pinned to

    # ---- routing --------------------------------------------------------------------------------
    def dense(self, rows: list[Row | None]) -> torch.Tensor:
        """(B, N) routing weights of the rows' mixtures in the bank's current order (None: a zero row)."""
        if self.fused is None:
            raise ValueError("this engine runs a model without adapters; rows must have empty mixtures")
        names = self.fused.adapter_names
        # On the host on purpose, whatever the default device: filled element by element from Python, then
        # read by `routed` (path, k) and moved to the stacks' device once.
        dense = torch.zeros(len(rows), len(names), device="cpu")
        for b, row in enumerate(rows):
            for name, w in row.mixture.items() if row is not None else ():
                dense[b, names.index(name)] = float(w)
        return dense

    def route(self, rows: list[Row | None], path: PinnedPath | None = None) -> None:
        """Set the fused layers' routing to these rows (None: a free slot, run as the base model), unless it
        already is; `path` pins the fused path (`FusedLoRAModel.routed`)."""
        if self.arrow is not None:
            if any(r is not None and r.mixture for r in rows):
                raise ValueError("under Arrow routing every row's mixture must be {} (Arrow picks per token)")
            if self._routing is None:
                self._routing = ExitStack()
                self._routing.enter_context(self.fused.routed(self.arrow))
            return
        if self.fused is None:
            if any(r is not None and r.mixture for r in rows):
                raise ValueError("this engine runs a model without adapters; rows must have empty mixtures")
            return
        if (
            self._routing is not None
            and not self._stale
            and path == self._path
            and len(rows) == len(self._routed_rows)
            and all(a is b for a, b in zip(rows, self._routed_rows))
        ):
            return
        dense = self.dense(rows)
        if self._routing is None:
            stack = ExitStack()
            stack.enter_context(self.fused.routed(dense, path))
            self._routing = stack
        else:
            self.fused.reroute(dense, path)
        self._routed_rows, self._stale, self._path = list(rows), False, path

    def release(self) -> None:
        """Leave the routed block (the model is the plain base model again); call when the batch empties
        and before the adapter bank changes."""
        if self._routing is not None:
            self._routing.close()
        self._routing, self._routed_rows, self._stale, self._path = None, [], False, None

    @property
    def device(self) -> torch.device:
        """The model's device: every tensor the engine makes is made there."""
        return next(self.model.parameters()).device

    # ---- a fixed set of rows ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, rows: list[Row], on_step: StepCallback | None = None) -> list[Row]:
        """Run `rows` together to their ends and return them, answered: the library's and the evaluation's
        decode loop. The rows stay in place (a finished row is fed the pad id), so routing set outside
        the engine for these B rows (an evaluation under `FusedLoRAModel.routed`) stays aligned with
        them; the routing the engine set itself is left afterwards."""
        if not rows:
            raise ValueError("generate needs at least one row")
        if any(r.echo for r in rows):
            raise ValueError("generate does not score prompts (echo); use prefill, as the server does")
        decoder = self.decoder if self.decoder is not None else EagerDecoder(self.model)
        try:
            ids, mask, positions = self._prepare(rows)
            logits = decoder.prefill(ids, mask, positions, max(r.max_tokens for r in rows))
            positions = positions[:, -1]
            self.advance(rows, logits)
            self._report(on_step, rows, [0] * len(rows))
            while not all(r.done for r in rows):
                before = [len(r.tokens) for r in rows]
                self.route(rows)  # again only when a row's mixture changed (sentence routing)
                last = [self.pad if r.done else r.tokens[-1] for r in rows]
                positions = positions + 1
                logits = decoder.step(torch.tensor(last, dtype=torch.long, device=self.device), positions)
                self.advance(rows, logits)
                self._report(on_step, rows, before)
        finally:
            self.release()
        return rows

    def _report(self, on_step: StepCallback | None, rows: list[Row], before: list[int]) -> None:
        if on_step is None:
            return
        newest = [r.tokens[-1] if len(r.tokens) > n else self.pad for r, n in zip(rows, before)]
        on_step(torch.tensor(newest, device="cpu"), torch.tensor([r.done for r in rows], device="cpu"))

    # ---- steps ----------------------------------------------------------------------------------
    def _prepare(self, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded input_ids, mask, positions (B, T) of the rows' prompts on the model's device; each
        seeded sampling row gets its generator and the routing is set to the rows."""
        ids, mask = left_pad([r.prompt_ids for r in rows], self.pad)
        ids, mask = ids.to(self.device), mask.to(self.device)
        self._seed(rows)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
        self.route(rows)
        return ids, mask, positions

    def _seed(self, rows: list[Row]) -> None:
        """Give each seeded sampling row its own generator (once)."""
        for row in rows:
            if row.params.do_sample and row.params.seed is not None and row.generator is None:
                # Any 64-bit seed, signed or not, maps onto torch's unsigned 64-bit seeds; the generator
                # lives where sampling happens (torch.multinomial refuses one on another device).
                row.generator = torch.Generator(device=self.device).manual_seed(row.params.seed % 2**64)

    @torch.no_grad()
    def prefill(self, rows: list[Row]) -> RunningBatch:
        """Run the rows' prompts (one left-padded forward pass) and pick each row's first token.

        Rows with `echo` get their prompt tokens' log-probabilities. Rows may end here (EOS first,
        max_tokens 0): `drop_finished` removes them.
        """
        if not rows:
            raise ValueError("prefill needs at least one row")
        ids, mask, positions = self._prepare(rows)
        echo = any(r.echo for r in rows)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=GrowingCache(),
            use_cache=True,
            logits_to_keep=0 if echo else 1,
        )
        for b, row in enumerate(rows):
            if row.echo:
                n = len(row.prompt_ids)
                row.prompt_logprobs = [None] + self._scored(out.logits[b, -n:-1], row.prompt_ids[1:], row.logprobs)
        batch = RunningBatch(rows=list(rows), cache=out.cache, mask=mask, positions=positions[:, -1:].clone())
        self.advance(batch.rows, out.logits[:, -1])
        return batch

    @staticmethod
    def scores_only(row: Row) -> bool:
        """A row that only scores its prompt (echo, at most one new token, no re-routing): it ends at its
        prefill, so `score` may run it."""
        return row.echo and row.max_tokens <= 1 and row.reroute is None

    @torch.no_grad()
    def score(self, rows: list[Row], prefixes: PrefixCache | None = None) -> None:
        """Prefill rows that only score their prompt (`scores_only`); each ends here.

        With `prefixes`, a row whose prompt starts like a recently scored one under the same mixture (another
        option of the same question) runs only its own tail on the cached keys and values, and copies the
        shared tokens' log-probabilities; every row scored here is cached in turn. Of rows that arrive together
        and start alike, one runs first and the others reuse its context.
        """
        if not all(self.scores_only(r) for r in rows):
            raise ValueError("score takes rows that echo their prompt with at most one new token")
        if prefixes is None:
            self.prefill(rows)
            return
        todo = list(rows)
        while todo:  # each round runs at least one row per head, so it ends
            found = [(r, prefixes.lookup(self._key(r), r.prompt_ids, r.logprobs or 0)) for r in todo]
            # Grouped by the length of the tail each row still runs (a prompt that shares only a system text
            # with a cached one must not pad every short tail, another option of a cached question, to its own).
            hits = [(r, h) for r, h in found if h is not None]
            for group in similar_lengths(hits, lambda rh: len(rh[0].prompt_ids) - rh[1][1]):
                self._prefill_on(prefixes, [r for r, _ in group], [h for _, h in group])
            heads, first, later = set(), [], []
            for r, h in found:
                if h is not None:
                    continue
                head = (self._key(r), tuple(r.prompt_ids[: prefixes.min_shared]))
                (later if head in heads else first).append(r)  # one row per head; the rest look again
                heads.add(head)
            if first:
                batch = self.prefill(first)
                width = batch.mask.shape[1]
                for b, row in enumerate(first):
                    self._keep(prefixes, row, batch.cache, b, width - len(row.prompt_ids), width)
            todo = later

    def _key(self, row: Row) -> tuple:
        """What a cached prompt must share with a row besides its tokens: the row's mixture (or Arrow)."""
        return (
            ("arrow",) if self.arrow is not None else tuple(sorted((n, float(w)) for n, w in row.mixture.items() if w))
        )

    def _keep(self, prefixes: PrefixCache, row: Row, cache, b: int, start: int, end: int) -> None:
        """Cache row b's prompt: its KV columns [start, end) of `cache`."""
        layers = cache.layers
        entry = CachedPrompt(
            ids=list(row.prompt_ids),
            keys=[layer.keys[b : b + 1, :, start:end] for layer in layers],
            values=[layer.values[b : b + 1, :, start:end] for layer in layers],
            logprobs=list(row.prompt_logprobs),
            top=row.logprobs or 0,
        )
        prefixes.store(self._key(row), entry)

    def _prefill_on(self, prefixes: PrefixCache, rows: list[Row], hits: list[tuple[CachedPrompt, int]]) -> None:
        """Prefill rows on cached prefixes: row b reuses the first s_b - 1 tokens' keys and values and runs
        tokens s_b - 1 ... (s_b shared tokens: the logits at position s_b - 1 score its first new token).

        Cached parts are left padded to the longest (P columns), the tails right padded (S columns): a
        real token never attends to padding before it (masked) or after it (causal)."""
        past = [s - 1 for _, s in hits]
        tails = [r.prompt_ids[p:] for r, p in zip(rows, past)]
        width_p, width_s = max(past), max(map(len, tails))
        dev = self.device
        keys, values = [], []
        for i in range(len(hits[0][0].keys)):
            keys.append(torch.cat([_left_pad_to(e.keys[i][:, :, :p], width_p, 2) for (e, _), p in zip(hits, past)]))
            values.append(torch.cat([_left_pad_to(e.values[i][:, :, :p], width_p, 2) for (e, _), p in zip(hits, past)]))
        cache = GrowingCache(zip(keys, values))
        # Built on the host (filled row by row from Python), moved once.
        mask = torch.zeros(len(rows), width_p + width_s, dtype=torch.long, device="cpu")
        ids = torch.full((len(rows), width_s), self.pad, dtype=torch.long, device="cpu")
        for b, (p, tail) in enumerate(zip(past, tails)):
            mask[b, width_p - p : width_p + len(tail)] = 1
            ids[b, : len(tail)] = torch.tensor(tail, dtype=torch.long, device="cpu")
        positions = torch.tensor(past, device="cpu")[:, None] + torch.arange(width_s, device="cpu")[None]
        self._seed(rows)
        self.route(rows)
        out = self.model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=positions.to(dev),
            cache=cache,
            use_cache=True,
        )
        last = []
        for b, (row, (entry, shared), p, tail) in enumerate(zip(rows, hits, past, tails)):
            top = row.logprobs or 0
            copied = [entry.logprobs[0]] + [
                TokenLogprob(t.token, t.logprob, t.top[:top]) for t in entry.logprobs[1:shared]
            ]
            row.prompt_logprobs = copied + self._scored(out.logits[b, : len(tail) - 1], tail[1:], row.logprobs)
            last.append(out.logits[b, len(tail) - 1])
            self._keep(prefixes, row, out.cache, b, width_p - p, width_p + len(tail))
        self.advance(rows, torch.stack(last))

    @torch.no_grad()
    def decode(self, batch: RunningBatch) -> None:
        """One more token for every row (none of them may have ended: call `drop_finished` first)."""
        if any(r.done for r in batch.rows):
            raise ValueError("decode got a batch holding finished rows; call drop_finished first")
        self.route(batch.rows)
        last = torch.tensor([r.tokens[-1] for r in batch.rows], dtype=torch.long, device=self.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch), 1)], dim=1)
        batch.positions = batch.positions + 1
        out = self.model(
            input_ids=last[:, None],
            attention_mask=batch.mask,
            position_ids=batch.positions,
            cache=batch.cache,
            use_cache=True,
        )
        batch.cache = out.cache
        self.advance(batch.rows, out.logits[:, -1])

    @staticmethod
    def merge(running: RunningBatch | None, new: RunningBatch) -> RunningBatch:
        """Stack `new`'s rows under `running`'s: the shorter KV cache and mask are left padded (masked
        out), so every row keeps exactly the keys and values it had."""
        if running is None or not running.rows:
            return new
        width = max(running.mask.shape[1], new.mask.shape[1])
        for a, b in zip(running.cache.layers, new.cache.layers):
            a.keys = torch.cat([_left_pad_to(a.keys, width, 2), _left_pad_to(b.keys, width, 2)], dim=0)
            a.values = torch.cat([_left_pad_to(a.values, width, 2), _left_pad_to(b.values, width, 2)], dim=0)
        mask = torch.cat([_left_pad_to(running.mask, width, 1), _left_pad_to(new.mask, width, 1)], dim=0)
        return RunningBatch(
            rows=running.rows + new.rows,
            cache=running.cache,
            mask=mask,
            positions=torch.cat([running.positions, new.positions], dim=0),
        )

    @staticmethod
    def drop_finished(batch: RunningBatch) -> RunningBatch | None:
        """The batch without its finished rows (None when none is left), trimmed of the padding columns
        on the left that no remaining row attends to."""
        keep = [i for i, r in enumerate(batch.rows) if not r.done]
        if not keep:
            return None
        if len(keep) == len(batch.rows):
            return batch
        index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
        mask = batch.mask[index]
        start = int(mask.any(0).long().argmax())  # first column some remaining row attends to
        for layer in batch.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        return RunningBatch(
            rows=[batch.rows[i] for i in keep],
            cache=batch.cache,
            mask=mask[:, start:],
            positions=batch.positions[index],
        )

    # ---- per-row token choice ---------------------------------------------------------------------
    def advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """logits: (B, V) at each row's last position -> each unfinished row's next token and its end."""
        greedy = logits.argmax(-1)
        want_lp = any(r.logprobs is not None for r in rows)
        logp = torch.log_softmax(logits.float(), -1) if want_lp else None
        for b, row in enumerate(rows):
            if row.done:
                continue
            if len(row.tokens) >= row.max_tokens:  # max_tokens 0: the prompt alone was wanted
                row.finish("length")
                continue
            if row.params.do_sample:
                token = int(sample_next(logits[b : b + 1], row.params, row.generator)[0])
            else:
                token = int(greedy[b])
            if logp is not None and row.logprobs is not None:
                row.token_logprobs.append(self._scored(logp[b : b + 1], [token], row.logprobs, normed=True)[0])
            if token in self.eos and not row.params.ignore_eos:
                row.finish("stop")
                continue
            row.tokens.append(token)
            if stop_reached(self.tokenizer, row.tokens, row.stop):
                row.finish("stop")
            elif len(row.tokens) >= row.max_tokens:
                row.finish("length")
            elif row.reroute is not None:
                self._switch(row, token)

    def _switch(self, row: Row, token: int) -> None:
        """Ask the row's policy about its newest token; a new mixture applies from the next forward on."""
        mixture = row.reroute(token)
        if mixture is None:
            return
        row.mixture = dict(mixture)
        # The forward on `token` (next step) samples answer token len(row.tokens): the first one under it.
        row.switches.append((len(row.tokens), row.mixture))
        self._stale = True

    @staticmethod
    def _scored(logits: torch.Tensor, tokens: list[int], top: int | None, normed: bool = False) -> list[TokenLogprob]:
        """logits: (n, V) predicting `tokens` (n) -> each token's log-probability and the `top` best."""
        logp = logits if normed else torch.log_softmax(logits.float(), -1)
        chosen = logp.gather(-1, torch.tensor(tokens, dtype=torch.long, device=logp.device)[:, None])[:, 0].tolist()
        if top:
            values, indices = logp.topk(top, dim=-1)
            tops = [tuple(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]
        else:
            tops = [()] * len(tokens)
        return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(tokens, chosen, tops)]

    def result(self, row: Row, first: Mapping[str, float]) -> Result:
        """An ended row's `Result`; `first` is the mixture it started under."""
        adapters, weights = listed(first)
        return Result(
            text=self.text(row),
            adapters=adapters,
            weights=weights,
            finish_reason=row.finish_reason or "length",
            prompt_tokens=len(row.prompt_ids),
            completion_tokens=len(row.tokens),
            switches=switches_of(row),
            sentence=row.reroute is not None,
            arrow=self.arrow is not None,
            prompt_ids=row.prompt_ids,
            token_ids=row.tokens,
            token_logprobs=row.token_logprobs if row.logprobs is not None else None,
            prompt_logprobs=row.prompt_logprobs if row.echo else None,
        )

    def _decoded(self, row: Row) -> str:
        return self.tokenizer.decode(row.tokens, skip_special_tokens=True)

    def text(self, row: Row) -> str:
        """The row's answer so far, cut at its first stop string."""
        return cut_at_stop(self._decoded(row), row.stop)[0]
