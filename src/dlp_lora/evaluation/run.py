"""`dlp-lora evaluate`: every method on every task, then the report (results.json / .md / plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from dlp_lora.config import SplitConfig
from dlp_lora.evaluation.harness import EvalConfig, config_record, evaluate_task
from dlp_lora.evaluation.report import write_report
from dlp_lora.pipeline import DLPLoRA

__all__ = ["run_evaluation"]


def run_evaluation(dlp: DLPLoRA, tasks: Sequence[str], out_dir: str | Path, cfg: EvalConfig,
                   split_cfg: SplitConfig = SplitConfig(), data_dir: str | Path | None = None,
                   command: str = "dlp-lora evaluate") -> dict:
    """Evaluate all methods on all tasks (resumable) and write the report into out_dir."""
    out = Path(out_dir)
    per_task = {}
    for task in tqdm(tasks, desc="tasks"):
        per_task[task] = evaluate_task(dlp, task, out, cfg, split_cfg, data_dir)
    meta = {"command": command, "examples_per_task": cfg.limit, "selection": dlp.selection.__dict__,
            **config_record(cfg, split_cfg)}
    return write_report(out, per_task, meta)
