"""Turn per-task, per-method scores into results.json, a markdown table and plots."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

from matplotlib.figure import Figure

from dlp_lora.tasks import get_task

__all__ = ["headline", "summarise", "write_report"]

QA_KEYS = ("em", "f1", "bleu", "rouge1", "rougeL")


def headline(task: str, scores: dict[str, float]) -> float:
    """The one number per task that the averages use: accuracy for mcq, else EM (F1 for SQuAD)."""
    if get_task(task).kind == "mcq":
        return scores["accuracy"]
    return scores.get("f1", scores["em"])


def summarise(per_task: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Averages per method: MCQ accuracy (generated and log-likelihood), QA headline, BLEU, ROUGE."""
    methods = list(next(iter(per_task.values())))
    out = {}
    for m in methods:
        mcq = [t for t in per_task if get_task(t).kind == "mcq"]
        qa = [t for t in per_task if get_task(t).kind == "qa"]
        row = {
            "mcq_accuracy": mean(per_task[t][m]["accuracy"] for t in mcq) if mcq else float("nan"),
            "qa_headline": mean(headline(t, per_task[t][m]) for t in qa) if qa else float("nan"),
            "mean_k": mean(per_task[t][m]["mean_k"] for t in per_task),
            "fused_fraction": mean(per_task[t][m]["fused_fraction"] for t in per_task),
        }
        ll = [per_task[t][m]["loglik_accuracy"] for t in mcq if "loglik_accuracy" in per_task[t][m]]
        if ll:
            row["mcq_loglik_accuracy"] = mean(ll)
        for key in ("bleu", "rouge1", "rougeL"):
            vals = [per_task[t][m][key] for t in qa if key in per_task[t][m]]
            if vals:
                row[f"qa_{key}"] = mean(vals)
        out[m] = row
    return out


def _markdown(per_task: dict, summary: dict, meta: dict) -> str:
    methods = list(summary)
    lines = ["# Results", "", f"Produced by `{meta['command']}`.", "",
             f"{meta['examples_per_task']} test examples per task (the first of each seeded test split), "
             "greedy generation; MCQ accuracy parses the generated letter, `loglik` scores the options "
             "as lm-evaluation-harness does. QA headline: token F1 for SQuAD, exact match otherwise.", "",
             "## Averages", "",
             "| method | MCQ acc | MCQ loglik acc | QA headline | QA BLEU | QA ROUGE-1 | QA ROUGE-L | mean k | fused % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        s = summary[m]
        cells = [s.get(k, float("nan")) for k in ("mcq_accuracy", "mcq_loglik_accuracy", "qa_headline", "qa_bleu",
                                                  "qa_rouge1", "qa_rougeL")]
        lines.append(f"| {m} | " + " | ".join(f"{c:.2f}" for c in cells)
                     + f" | {s['mean_k']:.2f} | {100 * s['fused_fraction']:.1f} |")
    lines += ["", "## Per task (headline metric)", "", "| task | kind | " + " | ".join(methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for t, by_method in per_task.items():
        lines.append(f"| {t} | {get_task(t).kind} | " + " | ".join(f"{headline(t, by_method[m]):.1f}"
                                                                 for m in methods) + " |")
    return "\n".join(lines) + "\n"


def _bar_plot(per_task: dict, path: Path) -> None:
    methods = list(next(iter(per_task.values())))
    tasks = list(per_task)
    fig = Figure(figsize=(max(10, 0.55 * len(tasks)), 5))
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ax.bar([i + j * width for i in range(len(tasks))], [headline(t, per_task[t][m]) for t in tasks], width,
               label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("headline score")
    ax.legend(fontsize=7, ncols=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(out_dir: Path, per_task: dict, meta: dict, extra: dict | None = None) -> dict:
    """Write results.json, results.md and per_task.png; returns the summary."""
    summary = summarise(per_task)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "per_task": per_task,
                                                      **(extra or {})}, indent=2) + "\n")
    (out_dir / "results.md").write_text(_markdown(per_task, summary, meta))
    _bar_plot(per_task, out_dir / "per_task.png")
    return summary
