"""Settings of measurements: the fusion benchmark (`dlp-lora bench`) and the evaluation (`dlp-lora evaluate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dlp_lora.config.checks import check, check_choices

__all__ = ["BenchConfig", "EvalConfig"]


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
        check_choices(self)
        check(all(n >= 1 for n in self.num_adapters) and self.num_adapters, "num_adapters must be >= 1 each")
        check(
            bool(self.quantize)
            and set(self.quantize) <= {"none", "int8", "auto"}
            and len(set(self.quantize)) == len(self.quantize),
            f"quantize must be distinct values among none, int8, auto; got {self.quantize}",
        )
        check(all(b >= 1 for b in self.batch_sizes) and self.batch_sizes, "batch_sizes must be >= 1 each")
        check(all(k >= 1 for k in self.ks) and self.ks, "ks must be >= 1 each")
        check(self.prompt_tokens >= 1 and self.new_tokens >= 2, "prompt_tokens must be >= 1, new_tokens >= 2")
        check(self.repeats >= 1 and self.rank >= 1, "repeats and rank must be >= 1")

    @classmethod
    def quick(cls) -> BenchConfig:
        """A reduced set that runs in under a minute on a 2-core CPU."""
        return cls(num_adapters=(4, 26), batch_sizes=(1, 8), ks=(1, 3), prompt_tokens=64, new_tokens=12, repeats=1)


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
    out_of_pool: int = 0
    """Held-out out-of-pool prompts per source (the router's `none` class) on which each routing's answers
    are compared with the base model's; 0 skips."""

    def __post_init__(self) -> None:
        check_choices(self)
        if not self.methods:
            raise ValueError("methods must name at least one method")
        if self.limit < 1 or self.batch_size < 1 or self.composite_pairs < 0 or self.out_of_pool < 0:
            raise ValueError(
                f"limit and batch_size must be >= 1, composite_pairs and out_of_pool >= 0; got {self.limit}, "
                f"{self.batch_size}, {self.composite_pairs}, {self.out_of_pool}"
            )
        bad = [p for p in self.p_sweep if not 0 < p <= 1]
        if bad:
            raise ValueError(f"p_sweep values must be in (0, 1], got {bad}")

    @property
    def all_methods(self) -> tuple[str, ...]:
        return self.methods + tuple(f"dlp@{p:g}" for p in self.p_sweep)
