"""Queue requests and run them on one worker thread, in a running batch that rows join and leave.

The model is not thread-safe, so exactly one thread ever touches it. Requests wait in a bounded FIFO
queue. Two policies (`ServerConfig.batching`):
- continuous (iteration level): before every decode step the worker admits waiting requests up to
  `max_batch_size` rows; their prompts are prefilled on their own and the rows join the running batch,
  and a row that ends leaves it at once, so a long answer never holds a short one back;
- static: a batch is formed only when none runs (the oldest request plus whatever arrives within
  `batch_window_ms`), and it runs until its last row ends.
Every row keeps its own adapter mixture, sampling settings, stop strings and `max_tokens`; how a row
is prefilled and decoded is the runner's job (`runner.py`, over `dlp_lora.engine`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from dlp_lora.config import GenerationConfig, RoutingConfig, ServerConfig
from dlp_lora.server.errors import QueueFull, Unavailable

__all__ = ["StepRunner", "Job", "Scheduler", "StreamSink"]


class StreamSink(Protocol):
    """Receives a streaming request's events from the worker thread (must not block)."""

    def started(self, adapters: list[str], weights: list[float]) -> None: ...

    def switched(self, switch: dict) -> None:
        """`sentence` routing: the row changed mixture (a `Result.switches` entry), before the text
        sampled under it is streamed."""

    def delta(self, text: str) -> None: ...


@dataclass(eq=False)
class Job:
    """One validated request (one choice) waiting for, or riding in, the batch. `future` gets its
    `engine.Result`."""

    prompt_ids: list[int]
    """The prompt's token ids, chat template (if any) applied."""
    route_text: str
    """What the router reads: the last user message of a chat, a completion's prompt text."""
    params: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding settings: max tokens, sampling, stop strings, ignore_eos."""
    mixture: dict[str, float] | None = None
    """Explicit {adapter: weight} ({} is the base model alone); None lets the router choose."""
    logprobs: int | None = None
    """None, or how many alternatives to report per token."""
    echo: bool = False
    """Also score (and return) the prompt's tokens."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """How the router reads this row's prompt (already applied to `route_text`); under `sentence` the row
    is also re-routed after each generated sentence."""
    window_text: str = ""
    """`sentence` routing: the router's text before segmenting (a chat's last user message, a completion's
    prompt), the start of the window the row is re-routed on (prompt + answer so far)."""
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

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class StepRunner(Protocol):
    """Runs the running batch one step at a time (called on the worker thread only)."""

    @property
    def running(self) -> int:
        """Rows in the running batch."""

    def admit(self, jobs: list[Job]) -> None:
        """Prefill these jobs and add their rows to the running batch (rows that end at once answer)."""

    def step(self) -> None:
        """Decode one token for every running row; rows that end answer and leave."""

    def abort(self, error: BaseException) -> None:
        """Fail every running row's future with `error` and drop the running batch."""

    def holds(self, job: Job) -> bool:
        """Whether the job rides in the running batch."""


class Scheduler:
    """A bounded request queue drained by one worker thread that owns the running batch."""

    def __init__(
        self,
        cfg: ServerConfig,
        runner: StepRunner,
        on_batch: Callable[[int], None] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.cfg, self._runner, self._on_batch, self._on_step = cfg, runner, on_batch, on_step
        self._pending: deque[Job] = deque()
        self._controls: deque[tuple[Callable[[], object], Future]] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()  # the worker loop returned
        self._closing = False
        self.running = 0
        """Rows in the running batch (read by metrics; written by the worker)."""

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the worker on a thread of its own."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the scheduler was already started")
            self._thread = threading.Thread(target=self._work, name="dlp-lora-batcher", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Run the worker on the calling thread until `stop` (`dlp-lora serve` gives it the process's main
        thread: torch's CPU kernels ran 1.4-1.8x slower on a second thread here, docs/performance.md)."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the scheduler was already started")
            self._thread = threading.current_thread()
        self._work()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new work, fail waiting requests with 503, and wait for the running rows to end."""
        with self._cond:
            self._closing = True
            waiting, self._pending = list(self._pending), deque()
            controls, self._controls = list(self._controls), deque()
            self._cond.notify_all()
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Unavailable("the server is shutting down"))
        for _, future in controls:
            future.set_exception(Unavailable("the server is shutting down"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._done.wait(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._done.is_set() and not self._closing

    @property
    def queue_depth(self) -> int:
        """Requests waiting to join the running batch."""
        with self._cond:
            return len(self._pending)

    def waiting_jobs(self) -> list[Job]:
        """A snapshot of the jobs waiting to join the running batch, oldest first."""
        with self._cond:
            return list(self._pending)

    # ---- producer side (event loop) -------------------------------------------------------------
    def submit(self, jobs: Job | list[Job]) -> Future:
        """Queue jobs (the choices of one request, all or none); raises QueueFull when they would exceed
        `max_queue` waiting jobs, Unavailable when not running. Returns the (last) job's future."""
        jobs = jobs if isinstance(jobs, list) else [jobs]
        with self._cond:
            if not self.alive:
                raise Unavailable("the batching worker is not running")
            if len(self._pending) + len(jobs) > self.cfg.max_queue:
                raise QueueFull(
                    f"the server queue is full ({len(self._pending)} requests waiting, "
                    f"max_queue={self.cfg.max_queue}); retry later"
                )
            self._pending.extend(jobs)
            self._cond.notify_all()
        return jobs[-1].future

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the worker thread between two decode steps (to change the adapter bank)."""
        future: Future = Future()
        with self._cond:
            if not self.alive:
                raise Unavailable("the batching worker is not running")
            self._controls.append((fn, future))
            self._cond.notify_all()
        return future

    # ---- worker side ----------------------------------------------------------------------------
    def _admissible(self) -> list[Job] | None:
        """Wait until there is work; return the jobs to admit now ([] to only decode). None when closing
        with nothing left to run."""
        window = self.cfg.batch_window_ms / 1000.0
        with self._cond:
            while not self._pending and not self._controls and self.running == 0 and not self._closing:
                self._cond.wait()
            if self._closing and self.running == 0:
                return None
            if self._controls or self._closing:
                return []
            room = self.cfg.max_batch_size - self.running
            if self.cfg.batching == "static" and self.running:
                return []
            if self.running == 0:
                # An idle worker waits up to the window after the oldest request for more to batch with it.
                while not self._closing and not self._controls:
                    left = self._pending[0].arrived + window - time.monotonic()
                    if len(self._pending) >= room or left <= 0:
                        break
                    self._cond.wait(left)
            batch = []
            while self._pending and len(batch) < room:
                batch.append(self._pending.popleft())
            return batch

    def _work(self) -> None:
        try:
            self._loop()
        finally:
            self._done.set()

    def _loop(self) -> None:
        while True:
            batch = self._admissible()
            if batch is None:
                return
            self._run_controls()
            # Jobs cancelled while waiting (client gone) are dropped here; the rest can no longer be cancelled.
            jobs = [j for j in batch if j.future.set_running_or_notify_cancel()]
            if jobs:
                self._guard(lambda: self._runner.admit(jobs), jobs)
                if self._on_batch is not None:
                    self._on_batch(self._runner.running)
            if self._runner.running:
                if self._on_step is not None:
                    self._on_step(self._runner.running)
                self._guard(self._runner.step, [])
            self.running = self._runner.running

    def _run_controls(self) -> None:
        while True:
            with self._cond:
                if not self._controls:
                    return
                fn, future = self._controls.popleft()
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

    def _guard(self, call: Callable[[], None], jobs: list[Job]) -> None:
        """Run one admit or step; the worker survives any failure: its requests fail, serving goes on."""
        try:
            call()
            error: BaseException = RuntimeError("the runner returned without answering this request")
        except Exception as exc:
            logging.getLogger(__name__).exception("a batch step failed (%d new requests)", len(jobs))
            error = exc
            self._runner.abort(exc)
        for job in jobs:  # admitted jobs the runner neither answered nor kept running
            if not job.future.done() and not self._runner.holds(job):
                job.future.set_exception(error)
