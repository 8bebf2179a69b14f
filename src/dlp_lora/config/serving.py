"""Settings of the HTTP server (`dlp-lora serve`) and of its Ray Serve scale-out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dlp_lora.config.checks import check, check_choices

__all__ = ["ServerConfig", "RayServeConfig"]


@dataclass(frozen=True)
class ServerConfig:
    """`dlp-lora serve`: address, batching window, queue bound and per-request limits."""

    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 8000
    """TCP port."""
    max_batch_size: int = 8
    """Most requests decoded together in one mixed batch."""
    batching: Literal["continuous", "static"] = "continuous"
    """`continuous`: requests join the running batch at the next decode step and leave it when they end;
    `static`: a batch forms only when none runs and runs until its last request ends."""
    batch_window_ms: float = 20.0
    """How long an idle scheduler waits for more requests after the first one arrives."""
    max_queue: int = 64
    """Requests waiting beyond this are refused with 429."""
    max_prompt_tokens: int = 1024
    """Longest accepted prompt (after the chat template), in tokens; longer is a 400."""
    max_tokens_limit: int = 256
    """Largest accepted `max_tokens`; larger is a 400."""
    default_max_tokens: int = 64
    """`max_tokens` when a request gives none."""
    model_name: str | None = None
    """Name of the base model in `/v1/models` and responses (default: the manifest's base model)."""
    allow_runtime_adapters: bool = False
    """Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime adapters). Off by
    default, as in vLLM: loading reads any path the server can read."""
    prefix_cache_tokens: int = 8192
    """Tokens of recent scoring prompts (echo, at most one new token) whose KV cache is kept, so the options
    of one question reuse their shared context (`dlp_lora.prefixes`; 0: off). Memory per token: 2 x layers
    x KV heads x head size floats (46 KB for SmolLM2-135M in fp32: 8192 tokens ~ 380 MB)."""

    compile: bool = False
    """Decode small running batches compiled over a static KV cache (`dlp_lora.slots`; needs a C++ compiler on
    CPU). Each slot count of `compile_batch_sizes` compiles at start, about a minute each on 2 CPU cores.
    A batch larger than the largest, or holding a row longer than `compile_context`, decodes eagerly."""
    compile_batch_sizes: tuple[int, ...] = (1, 2, 4)
    """Slot counts of the compiled step (a batch of B rows runs in the smallest one >= B). Measured on 2
    CPU cores: 1 client 30.4 vs 35.0 ms per token compiled; 16 rows were slower compiled than eager (the
    static cache's attention reads every column: docs/performance.md)."""
    compile_context: int = 512
    """Columns of the compiled step's KV cache: a row's prompt plus max_tokens must fit to ride in it
    (attention reads every column each step, so larger is slower)."""

    @property
    def slot_sizes(self) -> tuple[int, ...]:
        """The compiled step's slot counts for this server (those up to max_batch_size)."""
        return tuple(sorted({min(s, self.max_batch_size) for s in self.compile_batch_sizes}))

    def __post_init__(self) -> None:
        check_choices(self)
        check(bool(self.host), "host must be non-empty")
        check(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        check(self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}")
        check(self.batch_window_ms >= 0, f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        check(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
        check(self.max_prompt_tokens >= 1, f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        check(
            1 <= self.default_max_tokens <= self.max_tokens_limit,
            f"default_max_tokens must be in [1, max_tokens_limit={self.max_tokens_limit}], "
            f"got {self.default_max_tokens}",
        )
        check(self.model_name is None or bool(self.model_name.strip()), "model_name must be non-empty when given")
        check(self.prefix_cache_tokens >= 0, f"prefix_cache_tokens must be >= 0, got {self.prefix_cache_tokens}")
        check(
            all(s >= 1 for s in self.compile_batch_sizes),
            f"compile_batch_sizes must be slot counts >= 1, got {list(self.compile_batch_sizes)}",
        )
        check(self.compile_context >= 2, f"compile_context must be >= 2, got {self.compile_context}")


@dataclass(frozen=True)
class RayServeConfig:
    """`dlp-lora serve --ray`: replicas of the same app on Ray Serve, each with the whole adapter bank."""

    replicas: int = 1
    """Replicas to run (each loads the base model, every adapter and the router); the minimum when autoscaling."""
    max_replicas: int | None = None
    """Autoscale between `replicas` and this many replicas on the ongoing requests per replica (None: fixed)."""
    target_ongoing_requests: float = 4.0
    """Autoscaling target: ongoing requests per replica that Ray Serve aims for."""
    max_ongoing_requests: int = 16
    """Requests one replica takes at once; Ray Serve holds the rest back (back-pressure)."""
    max_queued_requests: int = 64
    """Requests waiting for a replica beyond this are refused with 503 by Ray Serve (-1: no bound)."""
    cpus_per_replica: float = 1.0
    """Logical CPUs Ray reserves for each replica (also its torch thread count when a whole number)."""
    gpus_per_replica: float = 0.0
    """GPUs Ray reserves for each replica (0.5: two replicas share one); needed for `--device cuda`."""
    address: str | None = None
    """Ray cluster to join ("auto": the one this node belongs to); None starts a local one."""

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.replicas >= 1, f"replicas must be >= 1, got {self.replicas}")
        check(
            self.max_replicas is None or self.max_replicas >= self.replicas,
            f"max_replicas must be >= replicas={self.replicas} when given, got {self.max_replicas}",
        )
        check(
            self.target_ongoing_requests > 0, f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}"
        )
        check(self.max_ongoing_requests >= 1, f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        check(
            self.max_queued_requests == -1 or self.max_queued_requests >= 1,
            f"max_queued_requests must be >= 1 or -1 (no bound), got {self.max_queued_requests}",
        )
        check(self.cpus_per_replica > 0, f"cpus_per_replica must be > 0, got {self.cpus_per_replica}")
        check(self.gpus_per_replica >= 0, f"gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        check(self.address is None or bool(self.address.strip()), "address must be non-empty when given")
