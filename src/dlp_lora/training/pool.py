"""Train the adapters of a task pool into an assets folder, one task at a time, resumable per task.

The pool's router is trained by `training.router_pool` (re-exported here).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlp_lora.assets import Manifest
from dlp_lora.config import AdapterTrainConfig, SplitConfig
from dlp_lora.evaluation.examples import example_scores
from dlp_lora.models import EMBEDDED_MODEL_ID, load_base_model
from dlp_lora.tasks import Example, Task, get_task, load_splits
from dlp_lora.tasks.out_of_pool import NONE
from dlp_lora.tasks.registry import TASKS
from dlp_lora.tasks.router_prompts import task_classes
from dlp_lora.training.adapters import STATE_FILE, planned_steps, train_adapter
from dlp_lora.training.gate import decided_examples, deployment_gate
from dlp_lora.training.router_pool import train_pool_router, train_task_router

__all__ = [
    "train_pool_adapters",
    "train_pool_multitask",
    "union_task",
    "train_pool_router",
    "train_task_router",
    "gate_scores",
]


def _open_manifest(root: Path, base_model: str) -> Manifest:
    if (root / "manifest.json").exists():
        manifest = Manifest.load(root)
        if manifest.base_model != base_model:
            raise ValueError(f"{root} holds adapters for base model {manifest.base_model!r}, not {base_model!r}")
        return manifest
    return Manifest(base_model=base_model)


def train_pool_adapters(
    root: str | Path,
    tasks: Sequence[str | Task],
    data_dir: str | Path | None = None,
    split_cfg: SplitConfig = SplitConfig(),
    train_cfg: AdapterTrainConfig = AdapterTrainConfig(),
    base_model: str | None = None,
    progress: bool = True,
    time_budget_s: float | None = None,
) -> Manifest:
    """Train (or skip, when already finished) one adapter per task under root/adapters/<task>, and gate it.

    Resumable per task and per checkpoint: a task is finished when the manifest holds its gated record
    (and its adapter file, if deployed); an unfinished one resumes from root/checkpoints/<task>, and a
    trained one whose record predates the gate split is only scored on it. With `time_budget_s`, training
    stops at the first checkpoint past the budget (run it again to continue). The manifest is saved after
    every task, with the task mapped to its adapter if `deployment_gate` deploys it, else to the base
    model (None).
    """
    root = Path(root)
    base_id = base_model or EMBEDDED_MODEL_ID
    manifest = _open_manifest(root, base_id)
    resolved = [get_task(t) for t in tasks]  # fail on an unknown name before hours of training, not after
    todo = [t for t in resolved if not _finished(root, manifest, t.name)]
    if not todo:
        return manifest
    model, tok = load_base_model(base_model)
    splits = {t.name: load_splits(t, data_dir, split_cfg) for t in todo}
    # Trained already (a record and the weights), a task only needs its gate; otherwise it is (re)trained.
    train = [t.name for t in todo if t.name not in manifest.records or not _weights(root, t.name).exists()]
    total = sum(planned_steps(len(splits[n].train) * len(train_cfg.formats), train_cfg) for n in train)
    deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
    pool_bar = tqdm(total=total, desc="all tasks (steps)", disable=not progress, dynamic_ncols=True, position=1)
    for task in todo:
        name, split, out = task.name, splits[task.name], _weights(root, task.name).parent
        if name in train:
            ckpt = root / "checkpoints" / name
            pool_bar.update(_resumed_steps(ckpt))
            record = train_adapter(
                model,
                tok,
                task,
                split.train,
                split.dev,
                out,
                train_cfg,
                ckpt_dir=ckpt,
                progress=progress,
                on_step=lambda: pool_bar.update(1),
                should_stop=None if deadline is None else lambda: time.monotonic() > deadline,
            )
            if record is None:
                break  # out of time: the checkpoint holds the progress
        else:
            record = manifest.records[name]
        record.update(gate_scores(model, tok, task, out, split.gate) if split.gate else {"gate_examples": 0})
        _, decided_on = decided_examples(split, train_cfg.dev_limit)
        gold = [ex.gold_index for ex in decided_on] if task.kind == "mcq" else None
        record["gate"] = deployment_gate(record, gold)
        record["splits"] = {
            "train": len(split.train),
            "dev": len(split.dev),
            "test": len(split.test),
            "gate": len(split.gate),
            **asdict(split_cfg),
        }
        if TASKS.get(name) is not task:  # a user task: name its file so the router can be retrained from it
            record["examples_file"] = str(Path(task.source).resolve())
        manifest.records[name] = record
        manifest.adapters[name] = f"adapters/{name}" if record["gate"]["deployed"] else None
        if name not in manifest.tasks:  # before a router's `none` class, which stays last
            at = manifest.tasks.index(NONE) if NONE in manifest.tasks else len(manifest.tasks)
            manifest.tasks.insert(at, name)
        manifest.save(root)
        if deadline is not None and time.monotonic() > deadline:
            break
    pool_bar.close()
    return manifest


def gate_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    adapter_dir: Path,
    examples: Sequence[Example],
) -> dict:
    """Per-example scores of the base model and of the saved adapter at `adapter_dir` on the gate split
    (`gate_scores`, `base_gate_scores`, the adapter's `gate_chosen` answers), for `deployment_gate`."""
    with torch.no_grad():
        base = example_scores(model, tokenizer, task, examples)
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
        try:
            peft_model.eval()
            adapted = example_scores(peft_model, tokenizer, task, examples)
        finally:
            peft_model.unload()  # the base model leaves unchanged
    return {
        "gate_examples": len(examples),
        "gate_scores": adapted.headline,
        "gate_chosen": adapted.chosen,
        "base_gate_scores": base.headline,
    }


def _weights(root: Path, name: str) -> Path:
    return root / "adapters" / name / "adapter_model.safetensors"


def _finished(root: Path, manifest: Manifest, name: str) -> bool:
    """A task is finished when it has a gated record and, if the gate deployed its adapter, the adapter file."""
    record = manifest.records.get(name)
    if record is None or "gate_examples" not in record:
        return False
    path = manifest.adapters.get(name)
    return path is None or (root / path / "adapter_model.safetensors").exists()


def _resumed_steps(ckpt: Path) -> int:
    """Steps already done in a checkpoint (for the pool's progress bar)."""
    state = ckpt / STATE_FILE
    return int(torch.load(state, weights_only=False)["step"]) if state.exists() else 0


def union_task(name: str, source: str, train: list[Example]) -> Task:
    """A task standing for several tasks' training examples together (a generalist's): trained on as one,
    never scored as one (each example is scored by its own task)."""
    return Task(name=name, kind="qa", source=source, metric="exact", load=lambda _root: train)


def train_pool_multitask(
    root: str | Path,
    data_dir: str | Path | None = None,
    split_cfg: SplitConfig = SplitConfig(),
    train_cfg: AdapterTrainConfig = AdapterTrainConfig(r=64, alpha=128),
    base_model: str | None = None,
    name: str = "multitask",
    progress: bool = True,
    dev_per_task: int = 0,
) -> Manifest:
    """The paper's composite baseline: one LoRA trained on every task's training split together.

    Saved under root/baselines/<name> and listed in the manifest's `baselines` (the router never picks
    it; evaluation compares it). Skipped when already trained. With `dev_per_task`, a dev curve as the
    specialists have: the first `dev_per_task` dev examples of every class that has a gate split, each
    scored by its own task, pooled, every `eval_every` steps; the best checkpoint is kept. The classes
    without a gate split are left out so that their dev examples stay unseen by every choice made on them.
    """
    root = Path(root)
    manifest = Manifest.load(root)
    if not manifest.tasks:
        raise ValueError(f"{root}: the manifest lists no tasks; train the task adapters first")
    out = root / "baselines" / name
    if (out / "adapter_model.safetensors").exists() and name in manifest.records:
        return manifest
    tasks = task_classes(manifest)  # not the router's `none` class: it has no training split
    splits = {t: load_splits(get_task(t), data_dir, split_cfg) for t in tasks}
    train = [ex for t in tasks for ex in splits[t].train]
    dev = [ex for t in tasks if splits[t].gate for ex in splits[t].dev[:dev_per_task]]
    union = union_task(name, "training splits of " + ", ".join(tasks), train)
    model, tok = load_base_model(base_model or manifest.base_model)
    record = train_adapter(
        model,
        tok,
        union,
        train,
        dev,
        out,
        train_cfg,
        ckpt_dir=root / "checkpoints" / name,
        progress=progress,
        dev_tasks={t: get_task(t) for t in tasks} if dev else None,
    )
    manifest.records[name] = {**record, "splits": asdict(split_cfg)}
    manifest.baselines[name] = f"baselines/{name}"
    manifest.save(root)
    return manifest
