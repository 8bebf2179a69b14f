"""Labelled prompts for training and testing a task router: each split's examples in several renderings,
plus out-of-pool prompts labelled `none`.

Train and dev draw from `TRAIN_RENDERINGS` (the template always, plus `per_example - 1` more drawn per
example); a test set renders every test example in *every* rendering, held-out formats included, so a
report can read accuracy per rendering. Examples never cross splits (registry splits), and held-out
renderings never reach training.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dlp_lora.assets import Manifest
from dlp_lora.config import RouterDataConfig, SplitConfig
from dlp_lora.tasks.loaders import user_file
from dlp_lora.tasks.out_of_pool import NONE, out_of_pool_splits
from dlp_lora.tasks.registry import TASKS, get_task, load_splits
from dlp_lora.tasks.renderings import RENDERINGS, TRAIN_RENDERINGS, render, render_many
from dlp_lora.tasks.types import Example, Task

__all__ = ["RoutedPrompts", "routed_prompts", "pool_test_prompts", "none_prompts", "task_classes", "manifest_task"]

_SPLITS = ("train", "dev", "test")


@dataclass
class RoutedPrompts:
    """Parallel lists: prompt text, router label (task name or `none`), rendering name, source id."""

    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    renderings: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def extend(self, other: RoutedPrompts) -> RoutedPrompts:
        for name in ("texts", "labels", "renderings", "sources"):
            getattr(self, name).extend(getattr(other, name))
        return self

    def __len__(self) -> int:
        return len(self.texts)


def _rendered(
    examples: Sequence[Example], label: str, source: str, names: Sequence[str] | None, per_example: int, seed: int
) -> RoutedPrompts:
    """Template always; per_example - 1 more drawn from `names` (None: every rendering, no draw)."""
    out = RoutedPrompts()
    if names is None:
        triples = render_many(examples, list(RENDERINGS), None, seed)
    else:
        rest = [n for n in names if n != "template"]
        triples = [(ex, "template", render(ex, "template", seed)) for ex in examples]
        if per_example > 1 and rest:
            triples += render_many(examples, rest, min(per_example - 1, len(rest)), seed)
    for _ex, name, text in triples:
        out.texts.append(text)
        out.labels.append(label)
        out.renderings.append(name)
        out.sources.append(source)
    return out


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


def none_prompts(
    split: str,
    data_dir: str | os.PathLike | None,
    split_cfg: SplitConfig,
    data_cfg: RouterDataConfig,
    pool: Sequence[str],
    every_rendering: bool = False,
) -> RoutedPrompts:
    """Out-of-pool prompts of one split labelled `none`, sources outside `pool` (task names)."""
    _check_split(split)
    cfg = replace(split_cfg, train_cap=data_cfg.none_train_cap)
    out = RoutedPrompts()
    for source, splits in out_of_pool_splits(data_dir, cfg, list(pool)).items():
        examples = getattr(splits, split)
        if examples:
            out.extend(
                _rendered(
                    examples,
                    NONE,
                    source,
                    None if every_rendering else TRAIN_RENDERINGS,
                    data_cfg.renderings_per_example,
                    data_cfg.seed,
                )
            )
    return out


def routed_prompts(
    tasks: Sequence[str | Task],
    split: str,
    data_dir: str | os.PathLike | None = None,
    split_cfg: SplitConfig = SplitConfig(),
    data_cfg: RouterDataConfig = RouterDataConfig(),
    every_rendering: bool = False,
) -> RoutedPrompts:
    """Prompts of one split ('train' | 'dev' | 'test') over `tasks`, plus `none` prompts when
    data_cfg.none_class. every_rendering: each example in every rendering (a test set); otherwise the
    template plus draws from the training renderings."""
    _check_split(split)
    resolved = [get_task(t) for t in tasks]
    out = RoutedPrompts()
    task_cfg = replace(split_cfg, train_cap=data_cfg.train_cap)  # dev and test do not depend on the cap
    for task in resolved:
        examples = getattr(load_splits(task, data_dir, task_cfg), split)
        out.extend(
            _rendered(
                examples,
                task.name,
                task.name,
                None if every_rendering else TRAIN_RENDERINGS,
                data_cfg.renderings_per_example,
                data_cfg.seed,
            )
        )
    if data_cfg.none_class:
        builtin = [t.name for t in resolved if t.source.split()[0].startswith(("bbh/", "nutcracker-db/"))]
        out.extend(none_prompts(split, data_dir, split_cfg, data_cfg, builtin, every_rendering))
    return out


def pool_test_prompts(
    tasks: Sequence[str | Task],
    data_dir: str | os.PathLike | None = None,
    split_cfg: SplitConfig = SplitConfig(),
    data_cfg: RouterDataConfig = RouterDataConfig(),
    split: str = "test",
) -> RoutedPrompts:
    """The format-shift test set: every held-out example of `tasks` (and of the out-of-pool sources, when
    data_cfg.none_class) in every rendering."""
    return routed_prompts(tasks, split, data_dir, split_cfg, data_cfg, every_rendering=True)


def task_classes(manifest: Manifest) -> list[str]:
    """The manifest's tasks, each a router class: those the dev gate mapped to the base model (adapter None)
    included, since their prompts must still be recognised (and sent to no adapter); not `none`."""
    return [t for t in manifest.tasks if t != NONE]


def manifest_task(manifest: Manifest, name: str, root: str | Path) -> Task:
    """A manifest task as a Task: a registry task by name, or a user task rebuilt from the examples file
    its record names (relative paths are relative to the assets root)."""
    if name in TASKS:
        return TASKS[name]
    file = manifest.records.get(name, {}).get("examples_file")
    if not file:
        raise ValueError(
            f"task {name!r} is not in the registry and its manifest record names no examples_file; "
            "cannot rebuild its prompts (add it with `dlp-lora add-task ... --examples FILE`)"
        )
    path = Path(file) if Path(file).is_absolute() else Path(root) / file
    return Task(name=name, kind="qa", source=str(path), metric="exact", load=user_file(name, path), max_new_tokens=64)
