"""Train the adapters of a task pool into an assets folder, one task at a time, resumable per task."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from dlp_lora.assets import Manifest
from dlp_lora.config import AdapterTrainConfig, SplitConfig
from dlp_lora.models import EMBEDDED_MODEL_ID, load_base_model
from dlp_lora.tasks import get_task, load_splits
from dlp_lora.training.adapters import train_adapter

__all__ = ["train_pool_adapters"]


def _open_manifest(root: Path, base_model: str) -> Manifest:
    if (root / "manifest.json").exists():
        manifest = Manifest.load(root)
        if manifest.base_model != base_model:
            raise ValueError(f"{root} holds adapters for base model {manifest.base_model!r}, not {base_model!r}")
        return manifest
    return Manifest(base_model=base_model)


def train_pool_adapters(
    root: str | Path,
    tasks: Sequence[str],
    data_dir: str | Path | None = None,
    split_cfg: SplitConfig = SplitConfig(),
    train_cfg: AdapterTrainConfig = AdapterTrainConfig(),
    base_model: str | None = None,
    progress: bool = True,
) -> Manifest:
    """Train (or skip, when already finished) one adapter per task under root/adapters/<task>.

    A task counts as finished when its adapter file exists and the manifest holds its record, so an
    interrupted run picks up at the first unfinished task. The manifest is saved after every task.
    """
    root = Path(root)
    base_id = base_model or EMBEDDED_MODEL_ID
    manifest = _open_manifest(root, base_id)
    todo = [t for t in tasks if not ((root / "adapters" / t / "adapter_model.safetensors").exists()
                                     and t in manifest.records)]
    for t in tasks:
        get_task(t)  # fail on an unknown name before hours of training, not after
    if todo:
        model, tok = load_base_model(base_model)
    for name in todo:
        task = get_task(name)
        splits = load_splits(task, data_dir, split_cfg)
        record = train_adapter(model, tok, task, splits.train, splits.dev, root / "adapters" / name, train_cfg,
                               progress=progress)
        record["splits"] = {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test),
                            **asdict(split_cfg)}
        manifest.records[name] = record
        manifest.adapters[name] = f"adapters/{name}"
        if name not in manifest.tasks:
            manifest.tasks.append(name)
        manifest.save(root)
    return manifest
