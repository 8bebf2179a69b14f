"""The scheduler's `StepRunner` for a `DLPLoRA` pipeline: jobs in, engine rows out, answers back.

Admitting jobs routes them (the router for rows without an explicit mixture), prefills them as their
own batch (`Engine.prefill`) and merges them into the running batch; each step decodes one token for
every running row. Scoring jobs (echo, at most one new token: how lm-evaluation-harness scores an
option) end at their prefill and never join the batch; `Engine.score` runs them on the KV cache of a
recently scored prompt that starts alike (`prefixes.PrefixCache`: the other options of the question). After every call, rows that ended answer their clients at once and leave the batch;
streaming rows get the text that became safe to send (stop strings are checked on the text the way
`sampling.py` checks them, so a row's answer does not depend on the rows beside it).

A `sentence`-routed job's row gets its own `SentenceRerouter` (the one `DLPLoRA.generate` gives each
row): the engine feeds it the row's tokens, and when a sentence ends under a new mixture the row
continues under it, its neighbours untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from dlp_lora.engine import Engine, Row, RunningBatch, listed, similar_lengths, switches_of
from dlp_lora.pipeline import DLPLoRA, SentenceRerouter
from dlp_lora.prefixes import PrefixCache
from dlp_lora.server.errors import InvalidRequest
from dlp_lora.server.scheduler import Job
from dlp_lora.slots import SlotBatch

__all__ = ["PipelineRunner"]


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """Characters at the end of `text` not yet safe to stream: an incomplete UTF-8 character (decoded as
    U+FFFD until its last byte arrives) or the start of a stop string that may complete next step."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    for s in stop:
        hold = max(hold, next((k for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), 0))
    return hold


class _Ride:
    """One job's row and what of its answer has been streamed."""

    def __init__(self, job: Job, row: Row) -> None:
        self.job, self.row, self.first = job, row, dict(row.mixture)
        self.adapters, self.weights = listed(self.first)
        self.streamed = ""
        self.switches: list[dict] = []

    def switched(self) -> None:
        """Record (and stream) the row's mixture changes that some answer token was sampled under: as
        `DLPLoRA.generate` reports them, a change just before the row's end (EOS) is none."""
        for switch in switches_of(self.row)[len(self.switches) :]:
            self.switches.append(switch)
            if self.job.sink is not None:
                self.job.sink.switched(self.switches[-1])

    def emit(self, text: str) -> None:
        """Stream the part of `text` beyond what was sent, if the client still listens."""
        if self.job.sink is None or not text.startswith(self.streamed) or len(text) == len(self.streamed):
            return
        piece, self.streamed = text[len(self.streamed) :], text
        try:
            self.job.sink.delta(piece)
        except Exception:  # a broken client connection must not fail the other rows
            logging.getLogger(__name__).warning("dropping the stream of a request whose sink failed", exc_info=True)
            self.job.sink = None


class PipelineRunner:
    """Continuous-batching rows over one pipeline (worker thread only).

    slot_sizes: decode compiled over a static KV cache in these slot counts (`slots.SlotBatch`, compiled here
    by torch.compile's `backend`, before the server answers); empty: eagerly. The running batch is then in
    the slots while its rows fit them (their count, and each one's prompt plus max_tokens within `context`
    columns), else eager (`Engine`'s calls), and back in the slots once it fits again.
    """

    def __init__(
        self,
        pipeline: DLPLoRA,
        prefix_cache_tokens: int = 0,
        slot_sizes: tuple[int, ...] = (),
        context: int = 512,
        backend: str | Callable = "inductor",
    ) -> None:
        self.pipeline = pipeline
        arrow = pipeline.arrow_routing() if pipeline.arrow is not None else None
        self.engine = Engine(pipeline.fused, pipeline.tokenizer, arrow=arrow)
        self.prefixes = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.batch: RunningBatch | None = None
        self.slots = SlotBatch(self.engine, slot_sizes, context, backend) if slot_sizes else None
        if self.slots is not None:
            self.slots.warm()
        self._rides: dict[int, _Ride] = {}  # id(row) -> its job

    @property
    def running(self) -> int:
        return (0 if self.batch is None else len(self.batch)) + (0 if self.slots is None else len(self.slots))

    @property
    def active_adapters(self) -> set[str]:
        """Adapters with weight in some running row's mixture (read by metrics and adapter unloading)."""
        return {n for r in list(self._rides.values()) for n, w in dict(r.row.mixture).items() if w > 0}

    def holds(self, job: Job) -> bool:
        return any(r.job is job for r in self._rides.values())

    def admit(self, jobs: list[Job]) -> None:
        mixtures = self._mixtures(jobs)
        rides = [self._ride(job, mixtures[id(job)]) for job in jobs if id(job) in mixtures]
        if not rides:
            return
        for ride in rides:
            if ride.job.sink is not None:
                ride.job.sink.started(ride.adapters, ride.weights)
        scoring = [r for r in rides if Engine.scores_only(r.row)]
        rides = [r for r in rides if r not in scoring]
        if scoring:  # they end at their prefill: answered now, never in the running batch
            self.engine.score([r.row for r in scoring], self.prefixes)
            for ride in scoring:
                ride.job.future.set_result(self.engine.result(ride.row, ride.first))
        self._rides.update({id(r.row): r for r in rides})
        # Prompts of similar length are prefilled together: one forward pass over a short prompt padded to
        # a long one's length costs the long one's time.
        for group in similar_lengths([r.row for r in rides], lambda row: len(row.prompt_ids)):
            new = self.engine.prefill(group)
            self._settle(new.rows)  # rows that ended at their first token answer now
            new = Engine.drop_finished(new)
            if new is None:
                continue
            if self.batch is None and self._to_slots(new):
                continue
            if self.slots is not None and len(self.slots):  # too many rows, or one too long: all go eager
                self.batch = self.slots.to_running()
            self.batch = Engine.merge(self.batch, new)
        self._idle()

    def step(self) -> None:
        if self.batch is not None and self._to_slots(self.batch):  # the eager batch shrank: back to the slots
            self.batch = None
        if self.batch is not None:
            self.engine.decode(self.batch)
            self._settle(self.batch.rows)
            self.batch = Engine.drop_finished(self.batch)
        elif self.slots is not None and len(self.slots):
            self.slots.decode()
            self._settle(self.slots.live)
            self.slots.drop_finished()
        self._idle()

    def abort(self, error: BaseException) -> None:
        for ride in self._rides.values():
            if not ride.job.future.done():
                ride.job.future.set_exception(error)
        self._rides.clear()
        self.batch = None
        if self.slots is not None:
            self.slots.to_running()
        self.engine.release()

    def pause(self) -> None:
        """Leave the routed block so the adapter bank may change (between two steps); cached prefixes go too
        (an adapter's name may come back with other weights)."""
        self.engine.release()
        if self.prefixes is not None:
            self.prefixes.clear()

    # ---- helpers --------------------------------------------------------------------------------
    def _mixtures(self, jobs: list[Job]) -> dict[int, dict[str, float]]:
        """id(job) -> its {adapter: weight}: its explicit mixture, or the router's choice for its text. A job
        whose text the router refuses (nothing left after tokenizing) answers 400 and is left out; the
        others are routed without it. Under Arrow every job rides with {} (Arrow routes each token); one
        that names a model or adapters (the base model included: it cannot ride beside Arrow rows) answers
        400."""
        if self.engine.arrow is not None:
            for job in jobs:
                if job.mixture is not None:
                    job.future.set_exception(
                        InvalidRequest(
                            "this server routes every token with Arrow (--router arrow); ask for the routed "
                            "model, not a named model or adapter mixture",
                            param="model",
                        )
                    )
            return {id(j): {} for j in jobs if j.mixture is None}
        out = {id(j): dict(j.mixture) for j in jobs if j.mixture is not None}
        routed = [j for j in jobs if j.mixture is None]
        try:
            out.update(zip(map(id, routed), self._routed([j.route_text for j in routed])))
        except ValueError:  # one unreadable text fails the router's whole batch: route one by one
            for job in routed:
                try:
                    out[id(job)] = self._routed([job.route_text])[0]
                except ValueError as exc:
                    job.future.set_exception(
                        InvalidRequest(f"the router cannot read this prompt: {exc}", param="prompt")
                    )
        return out

    def _routed(self, texts: list[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        routing = self.pipeline.route(texts)
        names = self.pipeline.adapter_names
        return [{names[i]: w for i, w in routing.row(b)} for b in range(len(texts))]

    def _ride(self, job: Job, mixture: dict[str, float]) -> _Ride:
        reroute = None
        if job.routing.granularity == "sentence" and job.mixture is None and self.engine.arrow is None:
            start = self.pipeline.class_weights([job.route_text])[0]
            reroute = SentenceRerouter(self.pipeline, job.window_text, job.routing, start)
        row = Row(
            prompt_ids=job.prompt_ids,
            mixture=mixture,
            params=job.params,
            logprobs=job.logprobs,
            echo=job.echo,
            reroute=reroute,
        )
        return _Ride(job, row)

    def _settle(self, rows: list[Row]) -> None:
        """Stream new text and answer the rows that ended (or whose client left); the caller drops them."""
        for row in rows:
            ride = self._rides[id(row)]
            if ride.job.abandoned:
                row.finish("length")
            if row.reroute is not None:
                ride.switched()
            if not row.done:
                if ride.job.sink is not None:
                    text = self.engine.text(row)
                    ride.emit(text[: len(text) - _held_back(text, row.stop)])
                continue
            result = self.engine.result(row, ride.first)
            ride.emit(result.text)
            del self._rides[id(row)]
            ride.job.future.set_result(result)

    def _to_slots(self, batch: RunningBatch) -> bool:
        """Move `batch`'s rows into the compiled slots when they all fit there (their count and lengths)."""
        if self.slots is None or len(self.slots) + len(batch) > self.slots.capacity:
            return False
        if not all(map(self.slots.fits, batch.rows)):
            return False
        self.slots.join(batch)
        return True

    def _idle(self) -> None:
        """Leave the routed block when no row runs."""
        if not self.running:
            self.engine.release()
