"""Score the other candidates that may serve a router class, on the examples its deployment gate decides on.

A class may be served by its own specialist, by the base model, by a shared generalist (the `multitask`
baseline) or by a mixture of specialist and generalist. The specialist and the base model were already
scored on the gate split (or, for a task too small to have one, on dev) when the pool was trained
(`training.pool.gate_scores`); this module adds the generalist and the mixtures on the same examples, so
the choice between them is paired and made on data that neither training nor the final test sees.

Per task and candidate, `records[task]["candidates"][name]` holds the mixture, the split, the per-example
headline scores and the chosen answers; a run resumes at the first (task, candidate) not yet recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from tqdm.auto import tqdm

from dlp_lora.assets import Manifest
from dlp_lora.config import AdapterTrainConfig, SplitConfig
from dlp_lora.evaluation.examples import example_scores
from dlp_lora.models import load_base_model
from dlp_lora.tasks import get_task, load_splits
from dlp_lora.training.gate import decided_examples

__all__ = ["candidate_mixtures", "score_candidates"]


def candidate_mixtures(task: str, generalist: str, weights: Sequence[float] = (1.0,)) -> dict[str, dict[str, float]]:
    """Candidate name -> {adapter name: weight}: the generalist alone, and the task's specialist on top of
    the generalist at each generalist weight in `weights` (the specialist at 1)."""
    out = {generalist: {generalist: 1.0}}
    for w in weights:
        out[f"{task}+{generalist}@{w:g}"] = {task: 1.0, generalist: float(w)}
    return out


def _adapter_dirs(root: Path, manifest: Manifest, task: str) -> dict[str, Path]:
    """Every adapter a candidate of `task` may use: the specialist (trained even when the gate kept the base
    model) and the baselines."""
    dirs = {name: root / rel for name, rel in manifest.baselines.items()}
    dirs[task] = root / "adapters" / task
    return dirs


def _scores_under(peft_model: PeftModel, mixture: dict[str, float], tok, task, examples):
    """Per-example scores of the model under `mixture`, built with peft's own exact `cat` combination."""
    name = "candidate"
    if name in peft_model.peft_config:
        peft_model.delete_adapter(name)
    peft_model.add_weighted_adapter(list(mixture), list(mixture.values()), adapter_name=name, combination_type="cat")
    peft_model.set_adapter(name)
    peft_model.eval()
    with torch.no_grad():
        return example_scores(peft_model, tok, task, examples)


def score_candidates(
    root: str | Path,
    tasks: Sequence[str] | None = None,
    data_dir: str | Path | None = None,
    split_cfg: SplitConfig = SplitConfig(),
    generalist: str = "multitask",
    weights: Sequence[float] = (1.0,),
    progress: bool = True,
) -> Manifest:
    """Score each task's candidates (see `candidate_mixtures`) on its gate split, or its first
    `dev_limit` dev examples where it has none; save the manifest after each one (resumable)."""
    root = Path(root)
    manifest = Manifest.load(root)
    if generalist not in manifest.baselines:
        raise ValueError(f"{root}: no baseline adapter {generalist!r}; known: {sorted(manifest.baselines)}")
    names = [t for t in (tasks or manifest.tasks) if t in manifest.records and t != "router"]
    model, tok = load_base_model(manifest.base_model)
    dev_limit = AdapterTrainConfig().dev_limit
    for name in tqdm(names, desc="candidates", disable=not progress):
        record = manifest.records[name]
        done = record.setdefault("candidates", {})
        todo = {c: m for c, m in candidate_mixtures(name, generalist, weights).items() if c not in done}
        if not todo:
            continue
        task = get_task(name)
        split = load_splits(task, data_dir, split_cfg)
        where, examples = decided_examples(split, dev_limit)
        dirs = _adapter_dirs(root, manifest, name)
        first, *rest = dirs
        peft_model = PeftModel.from_pretrained(model, str(dirs[first]), adapter_name=first)
        try:
            for other in rest:
                peft_model.load_adapter(str(dirs[other]), adapter_name=other)
            for cand, mixture in todo.items():
                s = _scores_under(peft_model, mixture, tok, task, examples)
                done[cand] = {"mixture": mixture, "split": where, "scores": s.headline, "chosen": s.chosen}
                manifest.save(root)
        finally:
            peft_model.unload()
    return manifest
