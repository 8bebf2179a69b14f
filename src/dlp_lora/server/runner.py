"""Run one batch of jobs on the pipeline so that every row gets exactly what it would get alone.

Rows share one `generate` call but not their limits: the batch decodes up to the largest `max_tokens`
and each row is tracked step by step (from `on_step`), ending at its own EOS, stop string or
`max_tokens`. Because decoding is per-row independent (greedy), a row's first m tokens do not depend
on how long the batch runs, so ending it at step m reproduces a solo run with max_new_tokens=m; stop
strings are checked the same way `generation.py` checks them. A finished row answers its client at
once; when every row has ended the batch stops early.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from dlp_lora.config import GenerationConfig, RoutingConfig
from dlp_lora.generation import cut_at_stop, eos_ids
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.server.scheduler import Completion, Job
from dlp_lora.types import Routing

__all__ = ["PipelineRunner", "batch_routing"]


class _AllRowsEnded(Exception):
    """Raised from `on_step` to end `generate` once every row has its answer (rows beyond their
    max_tokens or past a stop string would otherwise keep the batch decoding)."""


def batch_routing(pipeline: DLPLoRA, jobs: Sequence[Job]) -> Routing:
    """One (B, k) routing: explicit mixtures as given, the router's choice for the other rows."""
    n = len(pipeline.adapter_names)
    dense = torch.zeros(len(jobs), n)
    explicit = [b for b, j in enumerate(jobs) if j.mixture is not None]
    routed = [b for b, j in enumerate(jobs) if j.mixture is None]
    if explicit:
        dense[explicit] = pipeline.routing_for([jobs[b].mixture for b in explicit]).to_dense(n).float()
    if routed:
        dense[routed] = pipeline.route([jobs[b].text for b in routed],
                                       [jobs[b].routing for b in routed]).to_dense(n).float()
    return Routing.from_dense(dense)


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Characters at the end of `text` not yet safe to stream: an incomplete UTF-8 character (decoded as
    U+FFFD until its last byte arrives) or the start of a stop string that may complete next step."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stop:
        hold = max(hold, next((k for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), 0))
    return hold


class _Row:
    """One job's tokens so far, its streamed prefix, and its end."""

    def __init__(self, job: Job, adapters: list[str], weights: list[float]) -> None:
        self.job, self.adapters, self.weights = job, adapters, weights
        self.tokens: list[int] = []
        self.switches: list[dict] = []
        self.streamed = ""
        self.ended = False

    def emit(self, text: str) -> None:
        """Stream the part of `text` beyond what was sent, if the client still listens."""
        if self.job.sink is None or not text.startswith(self.streamed) or len(text) == len(self.streamed):
            return
        piece, self.streamed = text[len(self.streamed):], text
        try:
            self.job.sink.delta(piece)
        except Exception:  # a broken client connection must not fail the other rows
            logging.getLogger(__name__).warning("dropping the stream of a request whose sink failed", exc_info=True)
            self.job.sink = None

    def end(self, text: str, finish_reason: str) -> None:
        self.ended = True
        if self.job.sink is not None and not text.startswith(self.streamed):
            logging.getLogger(__name__).warning("streamed text is not a prefix of the final text")
        self.emit(text)
        self.job.future.set_result(Completion(
            text=text, finish_reason=finish_reason, prompt_tokens=self.job.prompt_tokens,
            completion_tokens=len(self.tokens), adapters=self.adapters, weights=self.weights,
            switches=[s for s in self.switches if s["token"] < len(self.tokens)]))


class PipelineRunner:
    """The scheduler's `BatchRunner` for a `DLPLoRA` pipeline (called on the worker thread only)."""

    def __init__(self, pipeline: DLPLoRA) -> None:
        self.pipeline = pipeline
        self._eos = eos_ids(pipeline.model, pipeline.tokenizer)

    def __call__(self, jobs: list[Job]) -> None:
        sampling = jobs[0].sampling
        if any(j.sampling != sampling for j in jobs):
            raise ValueError("every job of a batch must share its sampling settings")
        routing = batch_routing(self.pipeline, jobs)
        names = self.pipeline.adapter_names
        rows = []
        for b, job in enumerate(jobs):
            pairs = routing.row(b)
            rows.append(_Row(job, [names[i] for i, _ in pairs], [round(w, 6) for _, w in pairs]))
            if job.sink is not None:
                job.sink.started(rows[-1].adapters, rows[-1].weights)
        # Stop strings are per row (checked in _step), so the batch decodes with none of its own.
        cfg = GenerationConfig(max_new_tokens=max(j.max_tokens for j in jobs), do_sample=sampling.do_sample,
                               temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed)
        step = [0]

        def on_step(tokens: torch.Tensor, finished: torch.Tensor) -> None:
            step[0] += 1
            self._step(rows, tokens, step[0])

        def on_switch(b: int, token: int, adapters: list[str], weights: list[float]) -> None:
            rows[b].switches.append({"token": token, "adapters": adapters, "weights": weights})

        # Explicit mixtures keep their mixture (prompt granularity); routed rows route as their request asks.
        routing_cfgs = [j.routing if j.mixture is None else RoutingConfig() for j in jobs]
        try:
            self.pipeline.generate([j.text for j in jobs], config=cfg, routing=routing, on_step=on_step,
                                   routing_config=routing_cfgs, on_switch=on_switch)
        except _AllRowsEnded:
            pass

    def _step(self, rows: list[_Row], tokens: torch.Tensor, step: int) -> None:
        """Record step `step`'s token (B,) for every row still going; end rows that are done."""
        decode = self.pipeline.tokenizer.decode
        for b, row in enumerate(rows):
            if row.ended:
                continue
            job, token = row.job, int(tokens[b])
            if token in self._eos:
                row.end(cut_at_stop(decode(row.tokens, skip_special_tokens=True), job.stop)[0], "stop")
                continue
            row.tokens.append(token)
            if job.stop or job.sink is not None:
                text, stopped = cut_at_stop(decode(row.tokens, skip_special_tokens=True), job.stop)
                if stopped:
                    row.end(text, "stop")
                    continue
                row.emit(text[: len(text) - _held_back(text, job.stop)])
            if step >= job.max_tokens or job.abandoned:
                row.end(decode(row.tokens, skip_special_tokens=True), "length")
        if all(r.ended for r in rows):
            raise _AllRowsEnded
