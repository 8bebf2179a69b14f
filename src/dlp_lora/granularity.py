"""Routing granularity: which text the router sees, and when a row's mixture changes during its answer.

Three granularities (`RoutingConfig.granularity`):

- `prompt`: the router sees the whole prompt once; the mixture is fixed for every generated token.
- `segment` (the default): the prompt is split into segments on `segment_marker` (a blank line by default)
  and each segment is routed on its own. The answer is generated under the mixture of the segment it answers,
  and the rule for which is: **the last segment** (the text the prompt ends with, which is what a chat
  model answers first: the question after a context, the last of several questions). The mixture is
  then fixed for the whole answer; no router call happens while decoding. It is the default because
  few-shot demonstrations, a system preamble or an earlier question come before the question, separated
  by blank lines, and read whole they decide the route (held-out prompts keeping their bare route: 68-98%
  under `prompt`, 100% under `segment`; none of the pool's 2,950 test prompts holds a blank line, so
  their routes are the same either way: docs/results.md).
- `sentence`: the answer starts as in `segment`; every time a row ends a generated sentence (its newest
  token ends with one of `sentence_ends`, at least `min_sentence_tokens` tokens after the last switch),
  the row is routed again on a window of recent text (the last `window_chars` characters of prompt +
  answer so far) and continues under the new mixture from the next token on. The KV cache of earlier
  tokens stays as it was computed. Rows that end a sentence at the same step share one router call;
  rows that did not end a sentence, or whose new mixture equals their current one, are left untouched.

A scoring request (a context with one answer option appended, as lm-evaluation-harness sends each option of
a multiple-choice question) is routed on `scoring_text`: its question, not the appended answer and not the
demonstrations before it, so every option of one question is scored under one mixture. A raw prompt the
client wrote in the chat template is routed on its last user message, as the chat endpoint routes
(`completion_route_text`).

This module knows neither the router nor the fused model: `SentencePolicy` takes a `route` function
(texts -> (B', N) weights) and returns new weights for some rows; the pipeline applies them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dlp_lora.chat import UserTurns
from dlp_lora.config import RoutingConfig

__all__ = ["split_segments", "routing_text", "scoring_text", "completion_route_text", "SentencePolicy", "Switch"]


def split_segments(text: str, marker: str = "\n\n") -> list[str]:
    """The prompt's non-blank segments, in order, stripped; [text] when there is no marker."""
    parts = [p.strip() for p in text.split(marker)]
    return [p for p in parts if p] or [text]


def routing_text(prompt: str, cfg: RoutingConfig) -> str:
    """The text the router sees before the answer starts: the whole prompt, or its last segment."""
    if cfg.granularity == "prompt":
        return prompt
    return split_segments(prompt, cfg.segment_marker)[-1]


def scoring_text(text: str, marker: str = "\n\n") -> str:
    """What the router reads of a context with an answer appended: the question.

    The last segment (after the last `marker`: few-shot demonstrations and a preamble come before it), cut
    after the first ':' of its last line, the answer cue of `Q: ...\nA: <answer>` and `Question: ...\nAnswer:
    <answer>` (the first, so an answer holding a ':' is still cut at the cue). A last line without ':' is
    taken as the answer and left out (`<question>\n<answer>`); a one-line segment without ':' is read whole
    (nothing tells where its answer starts).
    """
    segment = split_segments(text, marker)[-1]
    head, _, last = segment.rpartition("\n")
    if ":" in last:
        return (head + "\n" if head else "") + last[: last.index(":") + 1]
    return head or segment


def completion_route_text(text: str, user_turns: UserTurns, scoring: bool) -> str:
    """What the router reads of a raw completion prompt, the server's and the library's rule: a prompt
    written in the chat template is read as a chat, on its last user message (whatever answer follows it);
    a scoring context with an answer appended (`scoring`) on its question (`scoring_text`); any other
    prompt whole."""
    message = user_turns.last_message(text)
    if message is not None:
        return message
    return scoring_text(text) if scoring else text


@dataclass(frozen=True)
class Switch:
    """Row `row` samples its answer tokens from index `token` on under `weights` (N,).

    token 0 is the prefill; for token > 0 the forward pass on answer token `token - 1` (and that token's
    KV cache entries) is the first computed under the new weights.
    """

    row: int
    token: int
    weights: torch.Tensor


@dataclass
class _RowText:
    prompt: str
    answer: str = ""
    tokens: int = 0
    since_switch: int = 0


@dataclass
class SentencePolicy:
    """Re-routes rows at the end of each generated sentence; engine-agnostic (see the module docstring).

    Feed it every decode step with `step(tokens (B,), finished (B,))`: it returns {row: (N,) weights} for
    the rows whose mixture changes before the next forward pass, or None. `switches` records every
    change (the first mixture of each row is `Switch(row, 0, initial[row])`).
    """

    cfg: RoutingConfig | Sequence[RoutingConfig]
    """One config for every row, or one per row (rows whose granularity is not `sentence` never change)."""
    prompts: Sequence[str]
    initial: torch.Tensor
    """(B, N) weights each row starts with."""
    decode: Callable[[list[int]], str]
    """Token ids -> text (the tokenizer's decode, special tokens skipped)."""
    route: Callable[[list[str]], torch.Tensor]
    """Texts (B',) -> (B', N) weights; called once per step for all rows that ended a sentence."""
    eos: frozenset[int] = frozenset()
    switches: list[Switch] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.initial.dim() != 2 or self.initial.shape[0] != len(self.prompts):
            raise ValueError(f"initial weights must be (B={len(self.prompts)}, N), got {tuple(self.initial.shape)}")
        cfgs = [self.cfg] * len(self.prompts) if isinstance(self.cfg, RoutingConfig) else list(self.cfg)
        if len(cfgs) != len(self.prompts) or not all(isinstance(c, RoutingConfig) for c in cfgs):
            raise ValueError(f"cfg must be one RoutingConfig or one per prompt ({len(self.prompts)}), got {self.cfg!r}")
        self._cfgs = cfgs
        self.current = self.initial.detach().clone().float()
        self._rows = [_RowText(prompt=p) for p in self.prompts]
        self.switches = [Switch(b, 0, self.current[b].clone()) for b in range(len(self.prompts))]

    def step(self, tokens: torch.Tensor, finished: torch.Tensor) -> dict[int, torch.Tensor] | None:
        """tokens, finished: (B,). Records the step; returns the rows to re-route and their new weights."""
        ended: list[int] = []
        for b, row in enumerate(self._rows):
            t, cfg = int(tokens[b]), self._cfgs[b]
            if cfg.granularity != "sentence" or bool(finished[b]) or t in self.eos:
                continue
            piece = self.decode([t])
            row.answer += piece
            row.tokens += 1
            row.since_switch += 1
            if row.since_switch >= cfg.min_sentence_tokens and piece.rstrip(" ").endswith(cfg.sentence_ends):
                ended.append(b)
        if not ended:
            return None
        windows = [self._window(self._rows[b], self._cfgs[b]) for b in ended]
        new = self.route(windows).float()
        changes: dict[int, torch.Tensor] = {}
        for b, w in zip(ended, new):
            self._rows[b].since_switch = 0
            if not torch.equal(w, self.current[b]):
                changes[b] = w
                self.current[b] = w
                # The next forward pass consumes this step's token and samples answer token `tokens`.
                self.switches.append(Switch(b, self._rows[b].tokens, w.clone()))
        return changes or None

    @staticmethod
    def _window(row: _RowText, cfg: RoutingConfig) -> str:
        text = row.prompt + "\n" + row.answer
        return text[-cfg.window_chars :]

    def per_token(self, row: int, num_tokens: int) -> torch.Tensor:
        """(num_tokens, N): the mixture each of the row's answer tokens was sampled under."""
        out = self.initial[row].float().repeat(num_tokens, 1)
        for s in self.switches:
            if s.row == row and s.token > 0:
                out[s.token :] = s.weights
        return out
