"""`dlp-lora evaluate`: every method on every task, the composite setting, then the report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dlp_lora.config import ArrowConfig, SplitConfig
from dlp_lora.evaluation.composite import evaluate_composite, make_pairs
from dlp_lora.evaluation.harness import EvalConfig, arrow_setting, config_record, evaluate_task, method_dense
from dlp_lora.evaluation.leave_alone import evaluate_leave_alone
from dlp_lora.evaluation.methods import ARROW, ARROW_GKS, DLP_ARROW, check_method
from dlp_lora.evaluation.report import write_report
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.tasks import Task, get_task, load_splits
from dlp_lora.tasks.out_of_pool import NONE, out_of_pool_splits

__all__ = ["run_evaluation"]


def run_evaluation(
    dlp: DLPLoRA,
    tasks: Sequence[str | Task],
    out_dir: str | Path,
    cfg: EvalConfig,
    split_cfg: SplitConfig = SplitConfig(),
    data_dir: str | Path | None = None,
    command: str = "dlp-lora evaluate",
    arrow: ArrowConfig | None = None,
) -> dict:
    """Evaluate all methods on all tasks (resumable per method and task) and write the report into out_dir;
    the `arrow` method routes with `arrow` (default: the pipeline's Arrow setting).
    The router's `none` class (out-of-pool prompts, no adapter, no test split) is left out of `tasks`, so
    `dlp.task_names` can be passed as it is."""
    task_map = {t.name: t for t in map(get_task, (t for t in tasks if t != NONE))}
    unknown = [t for t in task_map if t not in dlp.task_names]
    if unknown:
        raise ValueError(f"tasks {unknown} are not router classes of these assets; they hold {dlp.task_names}")
    # Baselines in the assets (e.g. `multitask`) are always compared: they exist for that.
    cfg = replace(cfg, methods=cfg.methods + tuple(b for b in dlp.baselines if b not in cfg.methods))
    for method in cfg.all_methods:  # an unknown name fails now, not after hours of generation
        if method in (ARROW, ARROW_GKS, DLP_ARROW):
            dlp.arrow_routing(arrow_setting(dlp, method, arrow))  # `arrow`, else the pipeline's
        elif method not in dlp.baselines:
            check_method(method, dlp.selection)
    if arrow is not None and arrow.general and ARROW_GKS not in cfg.methods:
        raise ValueError(f"general adapters {list(arrow.general)} are for the {ARROW_GKS} method (GenKnowSub); "
                         f"add it to the methods, which are {list(cfg.methods)}")  # fmt: skip
    out = Path(out_dir)
    per_task = {
        name: evaluate_task(dlp, task, out, cfg, split_cfg, data_dir, arrow=arrow)
        for name, task in tqdm(task_map.items(), desc="tasks")
    }
    # Arrow routes every prompt alike, so the settings below take its routing as it is.
    arrows = {m: dlp.arrow_routing(arrow_setting(dlp, m, arrow)) for m in cfg.methods if m in (ARROW, ARROW_GKS)}
    composite = None
    if cfg.composite_pairs:
        pools = {n: load_splits(t, data_dir, split_cfg).test[: cfg.limit] for n, t in task_map.items()}
        composite = evaluate_composite(
            dlp, make_pairs(pools, cfg.composite_pairs, split_cfg.seed), task_map, cfg.batch_size, arrows
        )
    leave_alone = None
    if cfg.out_of_pool:
        examples = [
            ex
            for splits in out_of_pool_splits(data_dir, split_cfg, [t for t in dlp.task_names if t != NONE]).values()
            for ex in splits.test[: cfg.out_of_pool]
        ]
        probs = dlp.router.predict_proba([ex.prompt for ex in examples])
        truth = torch.zeros(len(examples), dtype=torch.long)  # none of these methods reads the true task
        routed = [m for m in ("dlp", *dlp.baselines) if m in cfg.methods]
        settings = {m: method_dense(dlp, m, probs, truth) for m in routed} | arrows
        leave_alone = evaluate_leave_alone(dlp, examples, settings, batch_size=cfg.batch_size)
    meta = {
        "command": command,
        "examples_per_task": cfg.limit,
        "selection": asdict(dlp.selection),
        **config_record(cfg, split_cfg),
    }
    return write_report(out, per_task, task_map, meta, composite, leave_alone, tuple(dlp.baselines))
