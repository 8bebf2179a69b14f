"""Train one PEFT LoRA adapter per task on the base model (loss on answer tokens only)."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlp_lora.chat import chat_prompt, encode_prompts
from dlp_lora.config import AdapterTrainConfig, GenerationConfig
from dlp_lora.evaluation.metrics import score_task
from dlp_lora.generation import generate_ids
from dlp_lora.tasks import Example, Task, parse_answer

__all__ = ["training_batch", "train_adapter", "dev_score"]


def _example_ids(tokenizer: PreTrainedTokenizerBase, ex: Example, max_length: int) -> tuple[list[int], int]:
    prompt = tokenizer(chat_prompt(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
    answer = tokenizer(ex.answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    answer = answer[: max_length // 2]
    # Over-long prompts lose their head: the question and the answer instruction sit at the end.
    prompt = prompt[-(max_length - len(answer)):]
    return prompt + answer, len(prompt)


def training_batch(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask, labels: (B, T); labels are -100 except on answer tokens."""
    rows = [_example_ids(tokenizer, ex, max_length) for ex in examples]
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def dev_score(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, task: Task, examples: Sequence[Example],
    batch_size: int = 8,
) -> dict[str, float]:
    """Greedy generation on examples, answers parsed by the task's normaliser, scored by its metric."""
    preds: list[str] = []
    texts: list[str] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        ids, mask = encode_prompts(tokenizer, [ex.prompt for ex in chunk])
        outs = generate_ids(model, tokenizer, ids, mask, GenerationConfig(max_new_tokens=task.max_new_tokens))
        preds += [parse_answer(task, o.text, ex.choices) for o, ex in zip(outs, chunk)]
        texts += [o.text for o in outs]
    return score_task(task.metric, preds, [list(ex.references) for ex in examples], texts,
                      [ex.answer for ex in examples])


def _save_fp16(peft_model: PeftModel, out_dir: Path) -> None:
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # peft's empty model-card template; the manifest holds the record
    f = out_dir / "adapter_model.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(str(f)).items()}, str(f))


def train_adapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    train: Sequence[Example],
    dev: Sequence[Example],
    out_dir: str | Path,
    cfg: AdapterTrainConfig = AdapterTrainConfig(),
    dev_limit: int = 40,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a LoRA for one task, save it (fp16 safetensors) and return its record.

    The base model is wrapped by peft for the run and unwrapped afterwards: it leaves unchanged.
    """
    if not train:
        raise ValueError(f"task {task.name!r}: no training examples")
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    try:
        t0 = time.time()
        losses = _fit(peft_model, tokenizer, list(train), cfg, task.name, progress)
        train_seconds = time.time() - t0
        peft_model.eval()
        score = dev_score(peft_model, tokenizer, task, list(dev)[:dev_limit]) if dev else {}
        _save_fp16(peft_model, Path(out_dir))
    finally:
        peft_model.unload()
        model.requires_grad_(False)
        model.eval()
    return {
        "task": task.name, "kind": task.kind, "source": task.source, "train_examples": len(train),
        "dev_examples_scored": min(len(dev), dev_limit), "steps": len(losses), "seed": cfg.seed,
        "r": cfg.r, "alpha": cfg.alpha, "target_modules": list(cfg.target_modules), "lr": cfg.lr,
        "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "final_train_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4), "first_train_loss": round(losses[0], 4),
        "dev": {k: round(v, 2) for k, v in score.items()}, "train_seconds": round(train_seconds, 1),
    }


def _fit(model: PeftModel, tokenizer: PreTrainedTokenizerBase, train: list[Example], cfg: AdapterTrainConfig,
         name: str, progress: bool) -> list[float]:
    order = list(range(len(train)))
    batches = []
    rng = random.Random(cfg.seed)
    for _ in range(cfg.epochs):
        rng.shuffle(order)
        batches += [order[i: i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = max(1, len(batches) // 10)
    # Linear warm-up then linear decay: stable for the few dozen steps a small task gets.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (len(batches) - s) / max(1, len(batches) - warmup))))
    model.train()
    losses: list[float] = []
    bar = tqdm(batches, desc=f"train {name}", disable=not progress, dynamic_ncols=True)
    for idx in bar:
        batch = training_batch(tokenizer, [train[i] for i in idx], cfg.max_length)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
