"""Settings of training runs: data splits, adapter recipes, router data and router training."""

from __future__ import annotations

from dataclasses import dataclass, field

from dlp_lora.config.checks import NOT_A_FLAG, check, check_choices

__all__ = ["RouterTrainConfig", "RouterDataConfig", "SplitConfig", "AdapterTrainConfig"]


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
        check_choices(self)
        check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.patience >= 1, f"patience must be >= 1, got {self.patience}")


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
    seed: int = field(default=0, metadata={"flag": "data-seed"})
    """Seed of the rendering draws (`--data-seed`: `--seed` is the training's)."""

    def __post_init__(self) -> None:
        check_choices(self)
        check(
            self.renderings_per_example >= 1, f"renderings_per_example must be >= 1, got {self.renderings_per_example}"
        )
        check(self.train_cap >= 1, f"train_cap must be >= 1, got {self.train_cap}")
        check(self.none_train_cap >= 1, f"none_train_cap must be >= 1, got {self.none_train_cap}")


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
    seed: int = field(default=0, metadata=NOT_A_FLAG)
    """Seed of the shuffle that makes the splits (fixed, so adapters, router and evaluation split alike)."""

    def __post_init__(self) -> None:
        check_choices(self)
        check(self.train_cap >= 1, f"train_cap must be >= 1, got {self.train_cap}")
        check(self.dev_size >= 0, f"dev_size must be >= 0, got {self.dev_size}")
        check(self.test_size >= 1, f"test_size must be >= 1, got {self.test_size}")
        check(self.gate_size >= 0, f"gate_size must be >= 0, got {self.gate_size}")


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
        check_choices(self)
        check(self.r >= 1, f"r must be >= 1, got {self.r}")
        check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(len(self.target_modules) >= 1, "target_modules must name at least one module")
        check(self.epochs >= 1 and self.batch_size >= 1, "epochs and batch_size must be >= 1")
        check(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        check(self.eval_every >= 1 and self.patience >= 1, "eval_every and patience must be >= 1")
        check(self.dev_limit >= 1, f"dev_limit must be >= 1, got {self.dev_limit}")
        check(self.max_length >= 16, f"max_length must be >= 16, got {self.max_length}")
        check(
            len(self.formats) >= 1
            and len(set(self.formats)) == len(self.formats)
            and set(self.formats) <= {"chat", "raw"},
            f"formats must be distinct names among 'chat' and 'raw', got {self.formats}",
        )
