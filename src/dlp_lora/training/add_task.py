"""Add one task to an assets folder without retraining the router: copy its adapter, extend the head.

The router's last Linear gets one new output row; only that row (and its bias) is trained, on the new
task's prompts (its examples file, rendered several ways) against a replay of every other class's
training prompts. The other rows are untouched, so another task's prompt can only change route when the
new class outscores its task: the record measures that on every class's dev prompts, before and after.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn

from dlp_lora.adapters.io import read_peft_adapter
from dlp_lora.assets import Manifest
from dlp_lora.config import RouterDataConfig, SplitConfig
from dlp_lora.router import Router
from dlp_lora.tasks import Task, load_splits
from dlp_lora.tasks.loaders import user_file
from dlp_lora.tasks.out_of_pool import NONE
from dlp_lora.tasks.router_prompts import RoutedPrompts, routed_prompts
from dlp_lora.training.router_pool import manifest_task, task_classes

__all__ = ["add_task", "add_task_to_assets"]

_BATCH = 256


def _hidden(router: Router, texts: list[str]) -> torch.Tensor:
    """Input of the head's last Linear (B, hidden) for every prompt, in eval mode without gradients."""
    router.eval()
    body = router.head[:-1]
    with torch.no_grad():
        return torch.cat(
            [body(router.features(*router.encode(texts[i : i + _BATCH]))) for i in range(0, len(texts), _BATCH)]
        )


def _replay(prompts: RoutedPrompts, per_class: int, seed: int) -> RoutedPrompts:
    """At most per_class prompts of each label, a seeded draw."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=gen).tolist()
    seen: dict[str, int] = {}
    out = RoutedPrompts()
    for i in order:
        lab = prompts.labels[i]
        if seen.get(lab, 0) < per_class:
            seen[lab] = seen.get(lab, 0) + 1
            out.texts.append(prompts.texts[i])
            out.labels.append(lab)
            out.renderings.append(prompts.renderings[i])
            out.sources.append(prompts.sources[i])
    return out


def _fit_row(
    h: torch.Tensor, old: torch.Tensor, y: torch.Tensor, at: int, steps: int, lr: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train the new class's weight row (hidden,) and bias () with the other logits fixed.

    h: (B, hidden) last-layer inputs; old: (B, N) the existing logits; y: (B,) labels over N + 1 classes,
    the new class at position `at`.
    """
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(h.shape[1], generator=gen) * 0.01).requires_grad_()
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        new = h @ w + b
        logits = torch.cat([old[:, :at], new.unsqueeze(1), old[:, at:]], dim=1)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach(), b.detach()


def _capped_bias(
    h: torch.Tensor, old: torch.Tensor, old_truth: torch.Tensor, w: torch.Tensor, b: torch.Tensor, max_drop: float
) -> torch.Tensor:
    """The new row's bias, lowered so that on the replay prompts (h (B, hidden), old logits (B, N), old_truth
    (B,) class ids) no old class loses more than `max_drop` of its prompts that the old router got right.

    Only the new logit h @ w + b changes, and it takes a prompt exactly when it beats the old top logit, so
    each class's accuracy drop is a step function of b: the cap is an order statistic of the margins.
    """
    if not 0 <= max_drop <= 1:
        raise ValueError(f"max_replay_drop must be in [0, 1], got {max_drop}")
    right = old.argmax(dim=1) == old_truth
    margin = old.max(dim=1).values - h @ w  # the new class wins a prompt when b > margin
    cap = b.clone()
    for c in old_truth.unique():
        rows = old_truth == c
        lost = int(max_drop * int(rows.sum()))  # prompts of this class the new row may take
        m = margin[rows & right].sort().values
        if lost < len(m):
            cap = torch.minimum(cap, m[lost] - 1e-4)
    return cap


def _extended(router: Router, name: str, at: int, w: torch.Tensor, b: torch.Tensor) -> Router:
    """A copy of router with class `name` inserted at position `at` (its last-layer row w, bias b)."""
    names = list(router.task_names)
    names.insert(at, name)
    new = Router(replace(router.cfg, task_names=tuple(names)))
    state = router.trainable_state_dict()
    last = f"head.{len(router.head) - 1}"
    state[f"{last}.weight"] = torch.cat([state[f"{last}.weight"][:at], w.unsqueeze(0), state[f"{last}.weight"][at:]])
    state[f"{last}.bias"] = torch.cat([state[f"{last}.bias"][:at], b.reshape(1), state[f"{last}.bias"][at:]])
    new.load_trainable_state_dict(state)
    return new.eval()


def _accuracy_by_class(router: Router, prompts: RoutedPrompts) -> dict[str, float]:
    pred = router.predict_logits(prompts.texts).argmax(1).tolist()
    names = router.task_names
    out: dict[str, list[bool]] = {}
    for p, lab in zip(pred, prompts.labels):
        out.setdefault(lab, []).append(names[p] == lab)
    return {lab: sum(v) / len(v) for lab, v in out.items()}


def add_task(
    root: str | Path,
    name: str,
    adapter_dir: str | Path,
    examples_file: str | Path,
    data_dir: str | Path | None = None,
    split_cfg: SplitConfig = SplitConfig(),
    data_cfg: RouterDataConfig = RouterDataConfig(),
    replay_per_class: int = 300,
    steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
    max_replay_drop: float = 0.0025,
) -> dict:
    """Add task `name` (adapter_dir: a PEFT LoRA dir; examples_file: its {"input", "output"} JSON/JSONL)
    to the assets at root: adapter copied to adapters/<name>, router class inserted before `none`, manifest
    updated. The new row's bias is then capped so that no other class loses more than `max_replay_drop` of
    its replay prompts (half the issue's 0.5-point budget: replay prompts are training prompts). Returns the
    task's manifest record (timing and before/after dev accuracy of the other classes)."""
    start = time.perf_counter()
    root, adapter_dir, examples_file = Path(root), Path(adapter_dir), Path(examples_file).resolve()
    manifest = Manifest.load(root)
    if not name or name == NONE or name in manifest.tasks or name in manifest.baselines:
        raise ValueError(f"task name {name!r} is empty, reserved or already in {root}: {manifest.tasks}")
    read_peft_adapter(adapter_dir, name)  # a clear error now if it is not a PEFT LoRA directory
    if manifest.router is None:
        raise ValueError(f"{root}: the manifest names no router; train one with `dlp-lora train-router` first")
    router = Router.load(root / manifest.router, expected_tasks=manifest.tasks)
    task = Task(
        name=name,
        kind="qa",
        source=str(examples_file),
        metric="exact",
        load=user_file(name, examples_file),
        max_new_tokens=64,
    )
    splits = load_splits(task, data_dir, split_cfg)  # validates the file before anything is written
    own = replace(data_cfg, none_class=False)
    new_train = routed_prompts([task], "train", data_dir, split_cfg, own)
    others = [manifest_task(manifest, t, root) for t in task_classes(manifest)]
    with_none = replace(data_cfg, none_class=NONE in router.task_names)
    replay = _replay(routed_prompts(others, "train", data_dir, split_cfg, with_none), replay_per_class, seed)
    dev_others = _replay(routed_prompts(others, "dev", data_dir, split_cfg, with_none), replay_per_class, seed)

    at = router.task_names.index(NONE) if NONE in router.task_names else len(router.task_names)
    texts = replay.texts + new_train.texts
    names = list(router.task_names[:at]) + [name] + list(router.task_names[at:])
    y = torch.tensor([names.index(lab) for lab in replay.labels + new_train.labels])
    h = _hidden(router, texts)
    with torch.no_grad():
        old = router.head[-1](h)
    w, b_fit = _fit_row(h, old, y, at, steps, lr, seed)
    n_replay = len(replay)
    old_truth = y[:n_replay] - (y[:n_replay] > at).long()  # replay labels in the old class order
    b = _capped_bias(h[:n_replay], old[:n_replay], old_truth, w, b_fit, max_replay_drop)
    new_router = _extended(router, name, at, w, b)

    before = _accuracy_by_class(router, dev_others)
    after = _accuracy_by_class(new_router, dev_others)
    new_dev = routed_prompts([task], "dev", data_dir, split_cfg, own)
    new_acc = _accuracy_by_class(new_router, new_dev).get(name) if len(new_dev) else None

    shutil.copytree(adapter_dir, root / "adapters" / name, dirs_exist_ok=True)
    new_router.save(root / manifest.router)
    manifest.tasks = names
    manifest.adapters[name] = f"adapters/{name}"
    record = {
        "source": "user file",
        "examples_file": str(examples_file),
        "adapter_from": str(adapter_dir.resolve()),
        "splits": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test), **asdict(split_cfg)},
        "router_head": {
            "train_prompts": len(texts),
            "new_task_prompts": len(new_train),
            "steps": steps,
            "lr": lr,
            "seed": seed,
            "bias_fitted": round(float(b_fit), 4),
            "bias": round(float(b), 4),
            "max_replay_drop": max_replay_drop,
            "new_task_dev_accuracy": new_acc,
            "other_classes_dev_accuracy_before": before,
            "other_classes_dev_accuracy_after": after,
            "max_drop_points": round(100 * max(before[k] - after[k] for k in before), 2),
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    manifest.records[name] = record
    manifest.records.setdefault("router", {})["classes"] = names
    manifest.records["router"].setdefault("added_tasks", []).append(name)
    manifest.save(root)
    return record


def add_task_to_assets(
    root: str | Path,
    name: str,
    adapter_dir: str | Path,
    examples_file: str | Path,
    data_dir: str | Path | None = None,
    steps: int = 300,
    max_replay_drop: float = 0.0025,
) -> dict:
    """`add_task` with the split and rendering settings the assets' router was trained with (its record)."""
    record = Manifest.load(root).records.get("router", {})
    split_cfg = SplitConfig(**record["splits"]) if "splits" in record else SplitConfig()
    data_cfg = RouterDataConfig(**record["data"]) if "data" in record else RouterDataConfig()
    return add_task(
        root,
        name,
        adapter_dir,
        examples_file,
        data_dir,
        split_cfg,
        data_cfg,
        steps=steps,
        max_replay_drop=max_replay_drop,
    )
