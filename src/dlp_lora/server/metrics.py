"""Server metrics with `prometheus_client`, in one registry per app (no process-wide state).

Our own series keep their names (`dlp_lora_*`); where vLLM exports the same meaning we export vLLM's name
as well, so gateways and dashboards written for vLLM read this server unchanged:
`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:lora_requests_info` (which adapters
the running and waiting requests use), `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`,
`vllm:prefix_cache_queries_total` and `vllm:prefix_cache_hits_total` (prompt tokens of scoring requests
looked up in the prefix cache, and those found).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """What `/metrics` reports: requests by endpoint and status, tokens, batch sizes, queue depth, running
    requests, latency, and how often each adapter is part of a request's mixture."""

    LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

    def __init__(self, adapter_names: Sequence[str], max_batch_size: int = 64) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.max_loras = len(adapter_names)
        self._requests = Counter(
            "dlp_lora_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self._prompt = Counter("dlp_lora_prompt_tokens", "Prompt tokens of answered requests.", registry=r)
        self._completion = Counter("dlp_lora_completion_tokens", "Generated tokens of answered requests.", registry=r)
        self._vllm_prompt = Counter(
            "vllm:prompt_tokens", "Prompt tokens of answered requests (vLLM's name).", registry=r
        )
        self._vllm_generation = Counter(
            "vllm:generation_tokens", "Generated tokens of answered requests (vLLM's name).", registry=r
        )
        self._queue = Gauge("dlp_lora_queue_depth", "Requests waiting to join the running batch.", registry=r)
        self._waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to join the running batch.", registry=r)
        self._running = Gauge("vllm:num_requests_running", "Requests (choices) in the running batch.", registry=r)
        self._lora_info = Gauge(
            "vllm:lora_requests_info",
            "Adapters used by running and waiting requests (value: when this was read, in seconds since the epoch).",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=r,
        )
        buckets = sorted({b for b in self.BATCH_BUCKETS if b < max_batch_size} | {max_batch_size})
        self._batch = Histogram(
            "dlp_lora_batch_size", "Rows in the running batch after requests join it.", buckets=buckets, registry=r
        )
        self._step = Histogram(
            "dlp_lora_step_rows", "Rows decoded together in one decode step.", buckets=buckets, registry=r
        )
        self._latency = Histogram(
            "dlp_lora_request_latency_seconds",
            "Time from request to full answer.",
            ["endpoint"],
            buckets=self.LATENCY_BUCKETS,
            registry=r,
        )
        self._prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prompt tokens of scoring requests looked up in the prefix cache.", registry=r
        )
        self._prefix_hits = Counter(
            "vllm:prefix_cache_hits", "Prompt tokens of scoring requests found in the prefix cache.", registry=r
        )
        self._prefix_seen = [0, 0]
        self._adapters = Counter(
            "dlp_lora_adapter_selected", "Requests whose mixture included the adapter.", ["adapter"], registry=r
        )
        for name in adapter_names:
            self._adapters.labels(adapter=name)  # listed at 0 from the start

    def add_adapter(self, name: str) -> None:
        """A runtime adapter: listed at 0 from now on, and counted in `max_lora`."""
        self._adapters.labels(adapter=name)
        self.max_loras += 1

    def observe_request(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint=endpoint, status=str(status)).inc()

    def observe_batch(self, size: int) -> None:
        self._batch.observe(size)

    def observe_step(self, rows: int) -> None:
        self._step.observe(rows)

    def observe_completion(
        self, endpoint: str, seconds: float, prompt_tokens: int, completion_tokens: int, adapters: Iterable[str]
    ) -> None:
        """One answered generation request (streaming ones when their stream ends)."""
        for counter, n in (
            (self._prompt, prompt_tokens),
            (self._vllm_prompt, prompt_tokens),
            (self._completion, completion_tokens),
            (self._vllm_generation, completion_tokens),
        ):
            counter.inc(n)
        for a in set(adapters):
            self._adapters.labels(adapter=a).inc()
        self._latency.labels(endpoint=endpoint).observe(seconds)

    def render(
        self,
        waiting: int,
        running: int,
        running_adapters: Iterable[str],
        waiting_adapters: Iterable[str],
        prefix_tokens: tuple[int, int] = (0, 0),
    ) -> bytes:
        """The exposition text; the live values are read from the scheduler by the caller. prefix_tokens: the
        prefix cache's totals so far (tokens looked up, tokens found)."""
        for i, (counter, total) in enumerate(zip((self._prefix_queries, self._prefix_hits), prefix_tokens)):
            counter.inc(max(0, total - self._prefix_seen[i]))  # the cache counts totals; the counters grow by it
            self._prefix_seen[i] = max(self._prefix_seen[i], total)
        self._queue.set(waiting)
        self._waiting.set(waiting)
        self._running.set(running)
        self._lora_info.clear()  # one sample: the current sets of adapters
        self._lora_info.labels(
            max_lora=str(self.max_loras),
            running_lora_adapters=",".join(sorted(set(running_adapters))),
            waiting_lora_adapters=",".join(sorted(set(waiting_adapters))),
        ).set(time.time())
        return generate_latest(self.registry)
