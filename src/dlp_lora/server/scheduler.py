"""Gather concurrent requests into mixed batches and run them one batch at a time on one worker thread.

The model is not thread-safe, so exactly one thread ever touches it. Requests wait in a bounded FIFO
queue; the worker takes the oldest request and, for up to `batch_window_ms` after it arrived, gathers
later requests with the same sampling settings (up to `max_batch_size`). Each row keeps its own adapter
mixture, prompt and `max_tokens`; how a batch is executed is the runner's job (`runner.py`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Protocol

from dlp_lora.config import RoutingConfig, ServerConfig
from dlp_lora.server.errors import QueueFull, Unavailable

__all__ = ["BatchRunner", "Completion", "Job", "Sampling", "Scheduler", "StreamSink", "GREEDY_BELOW"]

GREEDY_BELOW = 1e-4
"""Temperatures below this decode greedily."""


@dataclass(frozen=True)
class Sampling:
    """Decoding settings that every row of one batch must share (the batching key).

    Greedy requests all share one key, whatever their temperature-free fields say. Seeded sampling
    runs alone: rows of one batch draw from one generator, so a seeded row would not reproduce.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def of(cls, temperature: float | None, top_p: float | None, seed: int | None) -> "Sampling":
        """Temperature 0 or absent means greedy; top_p and seed then play no part."""
        # Below GREEDY_BELOW sampling is indistinguishable from greedy, and near 0 logits / temperature
        # overflows to inf (NaN probabilities): decode those greedily too.
        if temperature is None or temperature < GREEDY_BELOW:
            return cls()
        return cls(do_sample=True, temperature=float(temperature), top_p=1.0 if top_p is None else float(top_p),
                   seed=seed)

    @property
    def solo(self) -> bool:
        return self.do_sample and self.seed is not None


@dataclass(frozen=True)
class Completion:
    """One request's answer: what `DLPLoRA.generate` would return for it alone."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    adapters: list[str]
    weights: list[float]
    switches: list[dict] = field(default_factory=list)
    """`sentence` routing: {"token", "adapters", "weights"} for each mid-answer mixture change."""


class StreamSink(Protocol):
    """Receives a streaming request's events from the worker thread (must not block)."""

    def started(self, adapters: list[str], weights: list[float]) -> None: ...

    def delta(self, text: str) -> None: ...


@dataclass(eq=False)
class Job:
    """One validated request waiting for, or riding in, a batch. `future` gets its `Completion`."""

    text: str
    """The user's text; the pipeline applies the chat template."""
    prompt_tokens: int
    """Prompt length after the chat template (counted at validation)."""
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    mixture: dict[str, float] | None = None
    """Explicit {adapter: weight}; None lets the router choose."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """How the router routes this row (granularity, segment marker)."""
    sink: StreamSink | None = None
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    _abandoned: threading.Event = field(default_factory=threading.Event, repr=False)

    def abandon(self) -> None:
        """The client went away: drop the job if it still waits, else let its row end at the next step."""
        self.future.cancel()
        self._abandoned.set()

    @property
    def abandoned(self) -> bool:
        return self._abandoned.is_set()


BatchRunner = Callable[[list[Job]], None]
"""Runs one batch; must set every job's future (the scheduler fails any it leaves unset)."""


class Scheduler:
    """A bounded request queue drained by one worker thread that runs one batch at a time."""

    def __init__(self, cfg: ServerConfig, runner: BatchRunner,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.cfg, self._runner, self._on_batch = cfg, runner, on_batch
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the scheduler was already started")
            self._thread = threading.Thread(target=self._work, name="dlp-lora-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, fail waiting requests with 503, and wait for the running batch to end."""
        with self._cond:
            self._closing = True
            waiting, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Unavailable("the server is shutting down"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch that is running)."""
        with self._cond:
            return len(self._pending)

    # ---- producer side (event loop) -------------------------------------------------------------
    def submit(self, job: Job) -> Future:
        """Queue a job; raises QueueFull when `max_queue` are waiting, Unavailable when not running."""
        with self._cond:
            if not self.alive:
                raise Unavailable("the batching worker is not running")
            if len(self._pending) >= self.cfg.max_queue:
                raise QueueFull(f"the server queue is full ({self.cfg.max_queue} requests waiting, "
                                f"max_queue={self.cfg.max_queue}); retry later")
            self._pending.append(job)
            self._cond.notify_all()
        return job.future

    # ---- worker side ----------------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        """Block until a batch is due: the oldest job plus same-key jobs, once its window has passed or
        the batch is full. None when closing."""
        window = self.cfg.batch_window_ms / 1000.0
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            head = self._pending[0]
            limit = 1 if head.sampling.solo else self.cfg.max_batch_size
            while not self._closing:
                same = sum(1 for j in self._pending if j.sampling == head.sampling)
                left = head.arrived + window - time.monotonic()
                if same >= limit or left <= 0:
                    break
                self._cond.wait(left)
            batch = [j for j in self._pending if j.sampling == head.sampling][:limit]
            taken = {id(j) for j in batch}
            self._pending = deque(j for j in self._pending if id(j) not in taken)
            return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # Jobs cancelled while waiting (client gone) are dropped here; the rest can no longer be cancelled.
            jobs = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        if self._on_batch is not None:
            self._on_batch(len(jobs))
        try:
            self._runner(jobs)
            error: BaseException = RuntimeError("the batch runner returned without answering this request")
        except Exception as exc:  # the worker must survive any batch: fail its requests, keep serving
            logging.getLogger(__name__).exception("batch of %d requests failed", len(jobs))
            error = exc
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)
