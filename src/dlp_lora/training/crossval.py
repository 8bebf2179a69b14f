"""Cross-validated scores of the generalist on router classes too small to have a gate split.

A small task (the BIG-Bench Hard ones: 123 labelled examples besides its test split) is gated on its 12 to
17 dev examples, where a paired 95% interval only clears 0 for a gain of about 30 points: the generalist,
whose gains on such tasks are smaller, could never be chosen there, whatever it learned. Cross-validation
over train + dev gives the choice every labelled example instead: they are dealt into `k` folds; for each
fold a generalist is trained by the deployed generalist's recipe on every class's training data with that
fold's examples left out (the other folds' dev examples in), and scored on the fold; the base model is
scored on all of them. Every example is then scored by a generalist that never saw it, so the paired
comparison with the base model is as honest as the gate's, on 7x more examples. The test split is never
touched. The figures estimate the recipe, not the deployed adapter itself (which saw every training
example and no dev one): the usual reading of cross-validation.

`records[task]["crossval"]` holds the fold of each example (train then dev order), the base model's scores
and answers, and the generalist's per fold; a run resumes at the first fold not scored. The fold adapters
go to `work_dir` (not into the assets: they are only a measurement).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from dlp_lora.assets import Manifest
from dlp_lora.config import AdapterTrainConfig, SplitConfig
from dlp_lora.evaluation.examples import example_scores
from dlp_lora.models import load_base_model
from dlp_lora.tasks import Example, get_task, load_splits
from dlp_lora.tasks.router_prompts import task_classes
from dlp_lora.training.adapters import train_adapter
from dlp_lora.training.gate import decided_split
from dlp_lora.training.pool import union_task

__all__ = ["fold_assignment", "recipe_of", "crossval_generalist", "crossval_options", "labelled"]


def fold_assignment(n: int, k: int, seed: int) -> list[int]:
    """The fold (0..k-1) of each of n examples: a seeded shuffle dealt round robin, so folds differ by at most
    one example in size."""
    if not 2 <= k <= n:
        raise ValueError(f"cross-validation needs 2 <= k <= examples, got k={k} for {n} examples")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    folds = [0] * n
    for pos, i in enumerate(order):
        folds[i] = pos % k
    return folds


def recipe_of(record: dict[str, Any]) -> AdapterTrainConfig:
    """The AdapterTrainConfig a training record was made with (fields it predates keep their defaults)."""
    given = {f.name: record[f.name] for f in dataclasses.fields(AdapterTrainConfig) if f.name in record}
    for name in ("target_modules", "formats"):
        if name in given:
            given[name] = tuple(given[name])
    return AdapterTrainConfig(**given)


def labelled(split) -> list[Example]:
    """A small task's examples outside its test split: train, then dev (the order the folds refer to)."""
    return list(split.train) + list(split.dev)


def _held_out(examples: Sequence[Example], folds: Sequence[int], i: int) -> list[Example]:
    return [ex for ex, f in zip(examples, folds) if f == i]


def _kept(examples: Sequence[Example], folds: Sequence[int], i: int) -> list[Example]:
    return [ex for ex, f in zip(examples, folds) if f != i]


def crossval_generalist(
    root: str | Path,
    work_dir: str | Path,
    data_dir: str | Path | None = None,
    split_cfg: SplitConfig = SplitConfig(),
    generalist: str = "multitask",
    k: int = 5,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    progress: bool = True,
) -> Manifest:
    """k-fold cross-validated scores of the base model and of `generalist`'s recipe on each small class
    (default: every class decided on dev), written to the manifest at `root` (module docstring)."""
    root, work_dir = Path(root), Path(work_dir)
    manifest = Manifest.load(root)
    if generalist not in manifest.baselines or generalist not in manifest.records:
        raise ValueError(f"{root}: no trained baseline {generalist!r}; known: {sorted(manifest.baselines)}")
    classes = task_classes(manifest)
    small = list(tasks or [t for t in classes if t in manifest.records and decided_split(manifest.records[t]) == "dev"])
    unknown = [t for t in small if t not in classes]
    if unknown:
        raise ValueError(f"{root}: {unknown} are not classes of this pool; known: {classes}")
    splits = {t: load_splits(get_task(t), data_dir, split_cfg) for t in classes}
    pool = {t: labelled(splits[t]) for t in small}
    model, tok = load_base_model(manifest.base_model)
    cvs: dict[str, dict[str, Any]] = {}
    for t in tqdm(small, desc="base model, all folds", disable=not progress):
        folds = fold_assignment(len(pool[t]), k, seed)
        cv = manifest.records[t].get("crossval") or {}
        if (cv.get("k"), cv.get("seed"), cv.get("folds")) != (k, seed, folds):
            cv = {"k": k, "seed": seed, "folds": folds}  # new or stale (other k, seed or data): start over
        if "base" not in cv:
            with torch.no_grad():
                s = example_scores(model, tok, get_task(t), pool[t])
            cv["base"] = {"scores": s.headline, "chosen": s.chosen}
        manifest.records[t]["crossval"] = cvs[t] = cv
        manifest.save(root)
    recipe = recipe_of(manifest.records[generalist])
    for i in tqdm(range(k), desc=f"{generalist} folds", disable=not progress):
        todo = [t for t in small if str(i) not in cvs[t].get(generalist, {})]
        if not todo:
            continue
        out = work_dir / f"{generalist}-fold{i}"
        if not (out / "adapter_model.safetensors").exists():
            train = [
                ex for t in classes for ex in (_kept(pool[t], cvs[t]["folds"], i) if t in pool else splits[t].train)
            ]
            union = union_task(out.name, f"{generalist}'s recipe without fold {i} of {k} of {', '.join(small)}", train)
            train_adapter(model, tok, union, train, [], out, recipe, ckpt_dir=work_dir / "checkpoints" / out.name,
                          progress=progress)  # fmt: skip
        peft_model = PeftModel.from_pretrained(model, str(out))
        try:
            peft_model.eval()
            for t in todo:
                with torch.no_grad():
                    s = example_scores(peft_model, tok, get_task(t), _held_out(pool[t], cvs[t]["folds"], i))
                cvs[t].setdefault(generalist, {})[str(i)] = {"scores": s.headline, "chosen": s.chosen}
                manifest.save(root)
        finally:
            peft_model.unload()  # the base model leaves unchanged
    return manifest


def crossval_options(record: dict[str, Any], generalist: str = "multitask") -> dict[str, dict[str, Any]] | None:
    """Options in `choice.serving_options`' form ({"base"|generalist: {"mixture", "scores", "chosen"}}) from a
    record's complete cross-validation, every list in example order; None when it has none or a fold is
    missing."""
    cv = record.get("crossval") or {}
    per_fold = cv.get(generalist) or {}
    if "base" not in cv or len(per_fold) != cv["k"]:
        return None
    scores, chosen = [], []
    cursor = dict.fromkeys(range(cv["k"]), 0)
    for f in cv["folds"]:
        part = per_fold[str(f)]
        scores.append(part["scores"][cursor[f]])
        if part["chosen"]:
            chosen.append(part["chosen"][cursor[f]])
        cursor[f] += 1
    return {
        "base": {"mixture": {}, "scores": cv["base"]["scores"], "chosen": []},
        generalist: {"mixture": {generalist: 1.0}, "scores": scores, "chosen": chosen},
    }
