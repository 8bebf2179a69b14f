"""Server counters and histograms, rendered in the Prometheus text exposition format (version 0.0.4).

Hand-rolled to avoid a dependency: a handful of counters, one gauge and two histograms. Updated from
the event loop and the batching worker, so every update and the rendering hold one lock.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Sequence

__all__ = ["Histogram", "Metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PREFIX = "dlp_lora_"


def _labels(pairs: dict[str, str]) -> str:
    if not pairs:
        return ""
    esc = {k: v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in pairs.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) and not x.is_integer() else str(int(x))


class Histogram:
    """Cumulative-bucket histogram (not thread-safe on its own; `Metrics` holds the lock)."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out = [f"{name}_bucket{_labels({**labels, 'le': _num(edge)})} {n}"
               for edge, n in zip(self.buckets, self.counts)]
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {_num(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    """What `/metrics` reports: requests by endpoint and status, tokens, batch sizes, queue depth,
    latency, and how often each adapter is part of a request's mixture."""

    LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

    def __init__(self, adapter_names: Sequence[str], max_batch_size: int = 64) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._adapters: Counter[str] = Counter({name: 0 for name in adapter_names})
        self._batch = Histogram(sorted({b for b in self.BATCH_BUCKETS if b < max_batch_size} | {max_batch_size}))
        self._latency: dict[str, Histogram] = {}

    def observe_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self._requests[(endpoint, status)] += 1

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self._batch.observe(size)

    def observe_completion(self, endpoint: str, seconds: float, prompt_tokens: int, completion_tokens: int,
                           adapters: Sequence[str]) -> None:
        """One answered generation request (streaming ones when their stream ends)."""
        with self._lock:
            self._prompt_tokens += prompt_tokens
            self._completion_tokens += completion_tokens
            self._adapters.update(adapters)
            self._latency.setdefault(endpoint, Histogram(self.LATENCY_BUCKETS)).observe(seconds)

    def render(self, queue_depth: int) -> str:
        """The exposition text; `queue_depth` is read live from the scheduler by the caller."""
        p = _PREFIX
        with self._lock:
            out = [f"# HELP {p}requests_total HTTP requests by endpoint and status code.",
                   f"# TYPE {p}requests_total counter"]
            out += [f"{p}requests_total{_labels({'endpoint': e, 'status': str(s)})} {n}"
                    for (e, s), n in sorted(self._requests.items())]
            out += [f"# HELP {p}prompt_tokens_total Prompt tokens of answered requests.",
                    f"# TYPE {p}prompt_tokens_total counter", f"{p}prompt_tokens_total {self._prompt_tokens}",
                    f"# HELP {p}completion_tokens_total Generated tokens of answered requests.",
                    f"# TYPE {p}completion_tokens_total counter",
                    f"{p}completion_tokens_total {self._completion_tokens}",
                    f"# HELP {p}queue_depth Requests waiting for a batch.", f"# TYPE {p}queue_depth gauge",
                    f"{p}queue_depth {queue_depth}",
                    f"# HELP {p}batch_size Requests decoded together per batch.", f"# TYPE {p}batch_size histogram"]
            out += self._batch.lines(f"{p}batch_size", {})
            out += [f"# HELP {p}request_latency_seconds Time from request to full answer.",
                    f"# TYPE {p}request_latency_seconds histogram"]
            for endpoint, hist in sorted(self._latency.items()):
                out += hist.lines(f"{p}request_latency_seconds", {"endpoint": endpoint})
            out += [f"# HELP {p}adapter_selected_total Requests whose mixture included the adapter.",
                    f"# TYPE {p}adapter_selected_total counter"]
            out += [f"{p}adapter_selected_total{_labels({'adapter': a})} {n}"
                    for a, n in sorted(self._adapters.items())]
        return "\n".join(out) + "\n"
