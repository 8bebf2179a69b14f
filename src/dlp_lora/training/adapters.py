"""Train one PEFT LoRA adapter per task on the base model (loss on answer tokens only).

The recipe (docs/training.md): length-bucketed batches, linear warmup then cosine decay, a dev
evaluation every `eval_every` steps, the best checkpoint kept, early stopping after `patience`
evaluations without improvement. Step 0 is evaluated too: a fresh LoRA (B = 0) is exactly the base
model, so the base model's dev scores come with the curve. A checkpoint (weights, optimiser, schedule,
RNG, curve) is written at every evaluation, so an interrupted run resumes at its last evaluation.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlp_lora.config import AdapterTrainConfig
from dlp_lora.evaluation.examples import ExampleScores, example_scores, pooled_scores
from dlp_lora.tasks import Example, Task
from dlp_lora.training.batching import bucketed_batches, collate, encode_examples

__all__ = ["train_adapter", "planned_steps", "lr_factor"]

STATE_FILE = "state.pt"


def planned_steps(n_train: int, cfg: AdapterTrainConfig) -> int:
    """Optimiser steps a task of n_train examples is planned for (early stopping may end it sooner)."""
    return min(cfg.max_steps, cfg.epochs * math.ceil(n_train / cfg.batch_size))


def lr_factor(step: int, total: int, cfg: AdapterTrainConfig) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then cosine decay to `min_lr_ratio`."""
    warmup = max(1, round(cfg.warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _evaluate(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    dev: Sequence[Example],
    dev_tasks: dict[str, Task] | None = None,
) -> ExampleScores:
    model.eval()
    try:
        with torch.no_grad():
            if dev_tasks:
                return pooled_scores(model, tokenizer, dev_tasks, dev)
            return example_scores(model, tokenizer, task, dev)
    finally:
        model.train()


def _save_fp16(peft_model: PeftModel, out_dir: Path) -> None:
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's empty model-card template; the manifest holds the record
    f = out_dir / "adapter_model.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(str(f)).items()}, str(f))


def _lora_state(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def train_adapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    train: Sequence[Example],
    dev: Sequence[Example],
    out_dir: str | Path,
    cfg: AdapterTrainConfig = AdapterTrainConfig(),
    ckpt_dir: str | Path | None = None,
    progress: bool = True,
    on_step: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    dev_tasks: dict[str, Task] | None = None,
) -> dict[str, Any] | None:
    """Train a LoRA for one task, save its best checkpoint (fp16 safetensors) and return its record.

    `dev_tasks`: when `dev` mixes several tasks (a generalist's), each example is scored by its own task
    (`dev_tasks[example.task]`) and the dev score pools them all; `dev_limit` does not cut such a dev split.

    `should_stop` is asked after each checkpoint: when it says yes, training ends there and None is
    returned (nothing saved but the checkpoint; the next call with the same `ckpt_dir` resumes).

    With `dev`, the record holds the dev curve, the best step, and per-example dev scores of the base
    model (`base_dev_scores`, step 0) and of the saved adapter (`dev_scores`) for the dev gate. With
    `ckpt_dir`, training resumes from the checkpoint there; it is deleted once the adapter is saved.
    The base model is wrapped by peft for the run and unwrapped afterwards: it leaves unchanged.
    """
    if not train:
        raise ValueError(f"task {task.name!r}: no training examples")
    torch.manual_seed(cfg.seed)
    if cfg.init_from is not None:
        if not (Path(cfg.init_from) / "adapter_config.json").exists():
            raise FileNotFoundError(
                f"init_from: expected a PEFT LoRA directory, found no adapter_config.json in {cfg.init_from}"
            )
        peft_model = PeftModel.from_pretrained(model, cfg.init_from, is_trainable=True)
        start = peft_model.peft_config["default"]
        cfg = replace(
            cfg,
            r=start.r,
            alpha=start.lora_alpha,
            dropout=start.lora_dropout,
            target_modules=tuple(sorted(start.target_modules)),
        )
    else:
        lora = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
    dev = list(dev) if dev_tasks else list(dev)[: cfg.dev_limit]
    ckpt = Path(ckpt_dir) if ckpt_dir is not None else None
    try:
        run = _Run(peft_model, tokenizer, task, list(train), dev, cfg, ckpt, dev_tasks)
        if not run.fit(progress, on_step, should_stop):
            return None
        set_peft_model_state_dict(peft_model, run.best["lora"])
        peft_model.eval()
        _save_fp16(peft_model, Path(out_dir))
    finally:
        peft_model.unload()
        model.requires_grad_(False)
        model.eval()
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)
    return run.record()


class _Run:
    """The state of one adapter's training: what a checkpoint saves and a resume restores."""

    def __init__(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        task: Task,
        train: list[Example],
        dev: list[Example],
        cfg: AdapterTrainConfig,
        ckpt: Path | None,
        dev_tasks: dict[str, Task] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.task, self.dev, self.cfg, self.ckpt = model, tokenizer, task, dev, cfg, ckpt
        self.dev_tasks = dev_tasks
        self.rows = encode_examples(tokenizer, train, cfg.max_length, cfg.formats, cfg.seed)
        self.total = planned_steps(len(self.rows), cfg)
        epochs = math.ceil(self.total * cfg.batch_size / len(self.rows))
        self.batches = bucketed_batches([len(r.ids) for r in self.rows], cfg.batch_size, cfg.seed, epochs)[: self.total]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, self.total, cfg))
        self.step, self.losses, self.curve, self.bad_evals = 0, [], [], 0
        self.train_seconds, self.eval_seconds, self.tokens = 0.0, 0.0, 0
        self.best: dict[str, Any] = {}
        self.base: ExampleScores | None = None
        self.stopped_early = False
        if ckpt is not None and (ckpt / STATE_FILE).exists():
            self._load()

    def fit(
        self, progress: bool, on_step: Callable[[], None] | None, should_stop: Callable[[], bool] | None = None
    ) -> bool:
        """Train to the end (True) or until `should_stop` says so after a checkpoint (False)."""
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if self.step == 0 and not self.curve:
            self._eval_and_checkpoint()
        bar = tqdm(
            total=self.total,
            initial=self.step,
            desc=f"train {self.task.name}",
            disable=not progress,
            dynamic_ncols=True,
        )
        self.model.train()
        while self.step < self.total and not self.stopped_early:
            batch = collate([self.rows[i] for i in self.batches[self.step]], pad)
            t0 = time.perf_counter()
            loss = self.model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            self.train_seconds += time.perf_counter() - t0
            self.tokens += int(batch["attention_mask"].sum())
            self.losses.append(float(loss.detach()))
            self.step += 1
            bar.update(1)
            # Without a dev split the "best score" is the step (the last checkpoint wins): show no dev then.
            dev = {"dev": f"{self.best.get('score', float('nan')):.1f}"} if self.dev else {}
            bar.set_postfix(loss=f"{self.losses[-1]:.3f}", **dev)
            if on_step is not None:
                on_step()
            if self.step % self.cfg.eval_every == 0 or self.step == self.total:
                self._eval_and_checkpoint()
                if should_stop is not None and should_stop() and self.step < self.total and not self.stopped_early:
                    bar.close()
                    return False
        bar.close()
        return True

    def _eval_and_checkpoint(self) -> None:
        t0 = time.perf_counter()
        scores = _evaluate(self.model, self.tokenizer, self.task, self.dev, self.dev_tasks) if self.dev else None
        self.eval_seconds += time.perf_counter() - t0
        # Without a dev split (the multitask baseline) the last checkpoint is kept.
        score = scores.mean if scores is not None else float(self.step)
        recent = self._recent_loss() if self.losses else None
        self.curve.append(
            {
                "step": self.step,
                "dev": round(score, 2) if scores else None,
                "train_loss": None if recent is None else round(recent, 4),
            }
        )
        if self.step == 0:
            # Step 0 is the base model, unless the run starts from another adapter: then score without it.
            self.base = scores
            if self.cfg.init_from is not None and self.dev:
                with self.model.disable_adapter():
                    self.base = _evaluate(self.model, self.tokenizer, self.task, self.dev, self.dev_tasks)
        # Strictly better only: on a tie the earlier (less trained) checkpoint stays.
        if not self.best or score > self.best["score"]:
            self.best = {"step": self.step, "score": score, "lora": _lora_state(self.model), "scores": scores}
            self.bad_evals = 0
        elif self.step > 0:
            self.bad_evals += 1
            self.stopped_early = self.bad_evals >= self.cfg.patience
        if self.ckpt is not None:
            self._save()

    def _recent_loss(self) -> float:
        tail = self.losses[-self.cfg.eval_every :]
        return sum(tail) / len(tail)

    def _save(self) -> None:
        assert self.ckpt is not None
        self.ckpt.mkdir(parents=True, exist_ok=True)
        state = {
            "cfg": asdict(self.cfg),
            "n_train": len(self.rows),
            "step": self.step,
            "losses": self.losses,
            "curve": self.curve,
            "bad_evals": self.bad_evals,
            "best": self.best,
            "base": self.base,
            "stopped_early": self.stopped_early,
            "lora": _lora_state(self.model),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "rng": torch.get_rng_state(),
            "seconds": (self.train_seconds, self.eval_seconds),
            "tokens": self.tokens,
        }
        tmp = self.ckpt / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.ckpt / STATE_FILE)  # a checkpoint exists only once complete

    def _load(self) -> None:
        assert self.ckpt is not None
        state = torch.load(self.ckpt / STATE_FILE, weights_only=False)
        if state["cfg"] != asdict(self.cfg) or state["n_train"] != len(self.rows):
            raise ValueError(
                f"checkpoint {self.ckpt} was made with other settings or data; delete it to start over "
                f"(saved {state['cfg']}, {state['n_train']} examples; now {asdict(self.cfg)}, "
                f"{len(self.rows)} examples)"
            )
        set_peft_model_state_dict(self.model, state["lora"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        torch.set_rng_state(state["rng"])
        self.step, self.losses, self.curve = state["step"], state["losses"], state["curve"]
        self.bad_evals, self.best, self.base = state["bad_evals"], state["best"], state["base"]
        self.stopped_early = state["stopped_early"]
        self.train_seconds, self.eval_seconds = state["seconds"]
        self.tokens = state["tokens"]

    def record(self) -> dict[str, Any]:
        cfg, best = self.cfg, self.best
        scores: ExampleScores | None = best.get("scores")
        tail = self.losses[-5:]
        return {
            "task": self.task.name,
            "kind": self.task.kind,
            "source": self.task.source,
            "train_examples": len(self.rows) // len(cfg.formats),
            "truncated_examples": sum(r.truncated for r in self.rows),
            "dev_examples_scored": len(self.dev),
            "steps": self.step,
            "planned_steps": self.total,
            "best_step": best["step"],
            "stopped_early": self.stopped_early,
            **asdict(cfg),
            "target_modules": list(cfg.target_modules),
            "first_train_loss": round(self.losses[0], 4) if self.losses else None,
            "final_train_loss": round(sum(tail) / len(tail), 4) if tail else None,
            "dev_curve": self.curve,
            "dev": {k: round(sum(v) / len(v), 2) for k, v in scores.metrics.items()} if scores else {},
            "dev_scores": scores.headline if scores else [],
            "dev_chosen": scores.chosen if scores else [],
            "base_dev_scores": self.base.headline if self.base else [],
            "train_seconds": round(self.train_seconds, 1),
            "eval_seconds": round(self.eval_seconds, 1),
            "train_tokens": self.tokens,
            "tokens_per_second": round(self.tokens / self.train_seconds, 1) if self.train_seconds else None,
        }
