"""The adapter recipe's sweep: learning rate x steps on three representative tasks (docs/training.md).

Each run trains one task's LoRA with `dlp_lora.training.train_adapter` exactly as the pool does (same
splits, same config but the swept learning rate), with early stopping off so the dev curve runs to the
planned steps: the steps axis is read off that curve (dev score every `eval_every` steps), which is what
early stopping would choose from. A run's result is saved as it finishes and its checkpoints as it goes,
so the script resumes where it stopped (run it again with the same arguments). `--from-assets DIR` takes
the runs that an assets folder already holds (its adapters' records, at the recipe's learning rate) instead
of training them again; they were trained with early stopping on, so their curves may end early.

    python benchmarks/adapter_sweep.py --out runs/sweep --data-dir ../shared/data
    python benchmarks/adapter_sweep.py --out runs/sweep --data-dir ../shared/data --from-assets assets/smollm2-135m-26tasks
    python benchmarks/adapter_sweep.py --out runs/sweep --plot docs/training_sweep.png --markdown docs/training_sweep.md

Timed: never run it beside other CPU work if you want its tokens/s.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

TASKS = ("arc_challenge", "socialiqa", "squad")  # knowledge MCQ, commonsense MCQ, extractive QA
LRS = (1e-4, 5e-4, 2e-3)


KEEP = (
    "task",
    "kind",
    "lr",
    "steps",
    "planned_steps",
    "best_step",
    "dev_curve",
    "dev",
    "train_examples",
    "truncated_examples",
    "train_seconds",
    "eval_seconds",
    "tokens_per_second",
    "train_tokens",
)


def take_from_assets(assets: Path, out: Path, tasks: tuple[str, ...], lrs: tuple[float, ...]) -> None:
    """Save as sweep runs the adapter records of `assets` whose task and learning rate the sweep has."""
    from dlp_lora.assets import Manifest

    records = Manifest.load(assets).records
    for name in tasks:
        rec = records.get(name)
        if not rec or rec.get("lr") not in lrs:
            continue
        path = _result_path(out, name, rec["lr"])
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                json.dumps({**{k: rec.get(k) for k in KEEP}, "source": f"{assets} (early stopping on)"}, indent=1)
            )


def run_all(out: Path, data_dir: str | None, tasks: tuple[str, ...], lrs: tuple[float, ...]) -> None:
    """Train every (task, lr) run not yet saved under out/<task>/lr<lr>.json."""
    from dlp_lora.config import AdapterTrainConfig, SplitConfig
    from dlp_lora.models import load_base_model
    from dlp_lora.tasks import get_task, load_splits
    from dlp_lora.training.adapters import train_adapter

    todo = [(t, lr) for t in tasks for lr in lrs if not _result_path(out, t, lr).exists()]
    if not todo:
        return
    model, tok = load_base_model()
    for name, lr in todo:
        task = get_task(name)
        split = load_splits(task, data_dir, SplitConfig())
        cfg = replace(AdapterTrainConfig(), lr=lr, patience=10**6)  # the whole curve, no early stop
        run_dir = out / name / f"lr{lr:g}"
        record = train_adapter(
            model, tok, task, split.train, split.dev, run_dir / "adapter", cfg, ckpt_dir=run_dir / "checkpoint"
        )
        assert record is not None
        _result_path(out, name, lr).write_text(
            json.dumps({**{k: record.get(k) for k in KEEP}, "source": "this sweep"}, indent=1)
        )


def _result_path(out: Path, task: str, lr: float) -> Path:
    return out / task / f"lr{lr:g}.json"


def load_results(out: Path) -> dict[str, list[dict]]:
    """Every saved run, by task, in learning-rate order."""
    runs: dict[str, list[dict]] = {}
    for f in sorted(out.glob("*/lr*.json")):
        r = json.loads(f.read_text())
        runs.setdefault(r["task"], []).append(r)
    return {t: sorted(rs, key=lambda r: r["lr"]) for t, rs in runs.items()}


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    """One panel per task: dev score against optimiser steps, a line per learning rate, base dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False)
    for ax, (task, rs) in zip(axes[0], runs.items()):
        for r in rs:
            curve = r["dev_curve"]
            ax.plot([c["step"] for c in curve], [c["dev"] for c in curve], marker="o", ms=3, label=f"lr {r['lr']:g}")
        ax.axhline(rs[0]["dev_curve"][0]["dev"], color="grey", ls="--", lw=1, label="base model")
        ax.set_title(f"{task} ({rs[0]['kind']})")
        ax.set_xlabel("optimiser steps (batch 8)")
        ax.set_ylabel("dev score" + (" (acc_norm)" if rs[0]["kind"] == "mcq" else " (F1)"))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def markdown(runs: dict[str, list[dict]]) -> str:
    """The sweep's table: base, best dev score and its step, final dev score, training throughput."""
    lines = [
        "| task | lr | base dev | best dev (step) | last dev (step) | train tokens/s | run |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, rs in runs.items():
        for r in rs:
            curve = r["dev_curve"]
            best = max(curve, key=lambda c: (c["dev"], -c["step"]))
            lines.append(
                f"| {task} | {r['lr']:g} | {curve[0]['dev']:.1f} | {best['dev']:.1f} ({best['step']}) | "
                f"{curve[-1]['dev']:.1f} ({curve[-1]['step']}) | {r.get('tokens_per_second') or 0:.0f} | "
                f"{r.get('source', 'this sweep')} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/sweep"), help="where runs and checkpoints go")
    ap.add_argument("--data-dir", default=None, help="benchmark data (default: ../shared/data or $DLP_LORA_DATA)")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    ap.add_argument("--from-assets", type=Path, default=None, help="take the runs this assets folder already holds")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the dev curves (only plots saved runs)")
    ap.add_argument("--markdown", type=Path, default=None, help="markdown table of the saved runs")
    ns = ap.parse_args()
    if ns.from_assets is not None:
        take_from_assets(ns.from_assets, ns.out, tuple(ns.tasks), tuple(ns.lrs))
    if ns.plot is None and ns.markdown is None:
        run_all(ns.out, ns.data_dir, tuple(ns.tasks), tuple(ns.lrs))
    runs = load_results(ns.out)
    if ns.plot is not None:
        plot(runs, ns.plot)
    table = markdown(runs)
    if ns.markdown is not None:
        ns.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
