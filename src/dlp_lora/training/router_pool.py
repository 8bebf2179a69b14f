"""Train the task router of a pool: prompts in many renderings, a `none` class, calibration, default p.

`train_task_router` trains on the training splits of some tasks (each example rendered several ways,
plus out-of-pool prompts labelled `none`), early-stops and calibrates on dev, and picks the default top-p
from the dev recall / mean-k curve of the calibrated router. `train_pool_router` does it for an assets
folder and records the router, its classes and the chosen selection in the manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dlp_lora.assets import Manifest
from dlp_lora.config import RouterConfig, RouterDataConfig, RouterTrainConfig, SelectionConfig, SplitConfig
from dlp_lora.evaluation.router_report import choose_p
from dlp_lora.router import Router
from dlp_lora.tasks import Task, get_task
from dlp_lora.tasks.out_of_pool import NONE
from dlp_lora.tasks.router_prompts import RoutedPrompts, manifest_task, routed_prompts, task_classes
from dlp_lora.training.router import train_router

__all__ = ["train_task_router", "train_pool_router", "manifest_task", "task_classes", "router_classes"]


def router_classes(tasks: Sequence[str | Task], none_class: bool) -> tuple[str, ...]:
    """Router class order: the tasks in order, then `none` (last, so class i < N - 1 is adapter i)."""
    names = tuple(get_task(t).name for t in tasks)
    if NONE in names:
        raise ValueError(f"'{NONE}' is reserved for the router's no-task class; rename that task")
    return names + ((NONE,) if none_class else ())


def _selection_from_dev(router: Router, dev: RoutedPrompts, base: SelectionConfig) -> tuple[SelectionConfig, dict]:
    """The default top-p: chosen on the calibrated dev probabilities of the in-pool prompts."""
    names = list(router.task_names)
    rows = [i for i, lab in enumerate(dev.labels) if lab != NONE]
    probs = router.predict_proba([dev.texts[i] for i in rows])
    truth = torch.tensor([names.index(dev.labels[i]) for i in rows])
    no_adapter = [names.index(NONE)] if NONE in names else []
    p, curve = choose_p(probs, truth, no_adapter)
    return replace(base, strategy="top_p", p=p), curve


def train_task_router(
    tasks: Sequence[str | Task],
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    split_cfg: SplitConfig = SplitConfig(),
    router_cfg: RouterConfig | None = None,
    train_cfg: RouterTrainConfig = RouterTrainConfig(),
    data_cfg: RouterDataConfig = RouterDataConfig(),
    selection: SelectionConfig = SelectionConfig(),
    progress: bool = True,
) -> dict:
    """Train a router on the training splits of `tasks` (classes: the tasks, then `none` when
    data_cfg.none_class), calibrate it on dev, save it; returns its record, whose ``selection`` holds the
    top-p chosen on dev (``p_curve``: the dev recall / mean-k curve it was chosen from)."""
    names = router_classes(tasks, data_cfg.none_class)
    cfg = replace(router_cfg or RouterConfig(task_names=names), task_names=names)
    train = routed_prompts(tasks, "train", data_dir, split_cfg, data_cfg)
    dev = routed_prompts(tasks, "dev", data_dir, split_cfg, data_cfg)
    router, history = train_router(train.texts, train.labels, dev.texts, dev.labels, cfg, train_cfg, progress=progress)
    router.save(out_dir)
    chosen, curve = _selection_from_dev(router, dev, selection)
    return {
        "kind": cfg.kind,
        "classes": list(names),
        "train_prompts": len(train),
        "dev_prompts": len(dev),
        "seed": train_cfg.seed,
        "params": router.num_parameters(),
        "trainable_params": history["trainable_params"],
        "best_epoch": history["best_epoch"],
        "dev_accuracy": round(100 * history["best_dev_acc"], 2),
        "temperature": round(history["temperature"], 4),
        "seconds": round(history["seconds"], 1),
        "splits": asdict(split_cfg),
        "data": asdict(data_cfg),
        "selection": asdict(chosen),
        "p_curve": curve,
    }


def train_pool_router(
    root: str | Path,
    data_dir: str | Path | None = None,
    split_cfg: SplitConfig = SplitConfig(),
    router_cfg: RouterConfig | None = None,
    train_cfg: RouterTrainConfig = RouterTrainConfig(),
    data_cfg: RouterDataConfig = RouterDataConfig(),
    selection: SelectionConfig = SelectionConfig(),
    progress: bool = True,
) -> Manifest:
    """Train the router of an assets folder on its tasks (registry tasks, and user tasks from the examples
    file their record names); the manifest gets the router record, the chosen selection and, with a
    `none` class, ``tasks[-1] = 'none'`` with ``adapters['none'] = None`` (no adapter: the base model)."""
    root = Path(root)
    manifest = Manifest.load(root)
    names = task_classes(manifest)
    if not names:
        raise ValueError(f"{root}: the manifest lists no tasks; train adapters first")
    tasks = [manifest_task(manifest, n, root) for n in names]
    record = train_task_router(
        tasks, root / "router", data_dir, split_cfg, router_cfg, train_cfg, data_cfg, selection, progress
    )
    manifest.router = "router"
    manifest.tasks = list(record["classes"])
    manifest.adapters.pop(NONE, None)
    if data_cfg.none_class:
        manifest.adapters[NONE] = None  # type: ignore[assignment]  # a class with no adapter: the base model
    manifest.selection = record["selection"]
    manifest.records["router"] = record
    manifest.save(root)
    return manifest
