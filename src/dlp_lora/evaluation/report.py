"""Turn per-task, per-method scores into results.json, a markdown table and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean
from typing import Mapping

from matplotlib.figure import Figure

from dlp_lora.tasks import Task

__all__ = ["headline", "summarise", "write_report"]

_AVERAGES = (("mcq_accuracy", "MCQ acc"), ("mcq_loglik_accuracy", "MCQ loglik acc"), ("qa_headline", "QA headline"),
             ("qa_bleu", "QA BLEU"), ("qa_rouge1", "QA ROUGE-1"), ("qa_rougeL", "QA ROUGE-L"))


def headline(task: Task, scores: dict[str, float]) -> float:
    """The one number per task that the averages use: accuracy for mcq, F1 for SQuAD, else exact match."""
    return scores[task.headline]


def _avg(values: list[float]) -> float:
    return mean(values) if values else float("nan")


def summarise(per_task: dict[str, dict[str, dict[str, float]]], tasks: Mapping[str, Task]) -> dict[str, dict]:
    """Averages per method over tasks: MCQ accuracy (generated, log-likelihood), QA headline, BLEU, ROUGE.

    per_task: task name -> method -> scores; tasks: task name -> Task (for its kind and headline metric).
    """
    methods = list(next(iter(per_task.values())))
    mcq = [t for t in per_task if tasks[t].kind == "mcq"]
    qa = [t for t in per_task if tasks[t].kind == "qa"]
    out = {}
    for m in methods:
        out[m] = {
            "mcq_accuracy": _avg([per_task[t][m]["accuracy"] for t in mcq]),
            "mcq_loglik_accuracy": _avg([per_task[t][m]["loglik_accuracy"] for t in mcq
                                         if "loglik_accuracy" in per_task[t][m]]),
            "qa_headline": _avg([headline(tasks[t], per_task[t][m]) for t in qa]),
            **{f"qa_{k}": _avg([per_task[t][m][k] for t in qa]) for k in ("bleu", "rouge1", "rougeL")},
            "mean_k": _avg([per_task[t][m]["mean_k"] for t in per_task]),
            "fused_fraction": _avg([per_task[t][m]["fused_fraction"] for t in per_task]),
        }
    return out


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def _averages_table(summary: dict, methods: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(label for _, label in _AVERAGES) + " | mean k | fused % |",
             "|---" * (len(_AVERAGES) + 3) + "|"]
    for m in methods:
        s = summary[m]
        lines.append(f"| {m} | " + " | ".join(_fmt(s[k]) for k, _ in _AVERAGES)
                     + f" | {s['mean_k']:.2f} | {100 * s['fused_fraction']:.1f} |")
    return lines


def _markdown(per_task: dict, tasks: Mapping[str, Task], summary: dict, meta: dict, composite: dict | None) -> str:
    main = [m for m in summary if "@" not in m]
    sweep = [m for m in summary if "@" in m]
    lines = ["# Results", "", f"Produced by `{meta['command']}`.", "",
             f"{meta['examples_per_task']} test examples per task (the first of each seeded test split), "
             "greedy generation (no sampling, so one run is exact and seeds do not apply). MCQ accuracy parses "
             "the generated letter; `loglik` picks the option letter with the highest log-likelihood, as "
             "lm-evaluation-harness does. QA headline: token F1 for SQuAD, exact match otherwise; BLEU "
             "(sacrebleu) and ROUGE (rouge-score) compare the generated text with the reference answer "
             "(the worked solution for GSM8K).", "", "## Averages", ""]
    lines += _averages_table(summary, main)
    if sweep:
        lines += ["", "## Top-p sweep of `dlp`", ""] + _averages_table(summary, sweep)
        lines += ["", "![p sweep: mean adapters fused vs score](p_sweep.png)"]
    lines += ["", "## Per task (headline metric)", "", "| task | kind | " + " | ".join(main) + " |",
              "|---|---|" + "---|" * len(main)]
    for t, by_method in per_task.items():
        lines.append(f"| {t} | {tasks[t].kind} | " + " | ".join(f"{headline(tasks[t], by_method[m]):.1f}" for m in main)
                     + " |")
    lines += ["", "![per-task headline score by method](per_task.png)"]
    if composite:
        lines += ["", "## Composite prompts", "",
                  f"{composite['pairs']} prompts, each two questions from different tasks joined by a blank line; "
                  "each part is answered and scored on its own. Per prompt: one routing for the joined text; "
                  "per segment: each part routed on its own text.", "",
                  "| routing | mean part score | weight on the true task | mean k |", "|---|---|---|---|"]
        for name in ("per_prompt", "per_segment"):
            lines.append(f"| {name.replace('_', ' ')} | {composite[f'{name}_score']:.2f} | "
                         f"{composite[f'{name}_true_task_weight']:.3f} | {composite[f'{name}_mean_k']:.2f} |")
    return "\n".join(lines) + "\n"


def _bar_plot(per_task: dict, task_map: Mapping[str, Task], methods: list[str], path: Path) -> None:
    tasks = list(per_task)
    fig = Figure(figsize=(max(10, 0.55 * len(tasks)), 5))
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ax.bar([i + j * width for i in range(len(tasks))], [headline(task_map[t], per_task[t][m]) for t in tasks], width,
               label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("headline score (accuracy / F1 / EM, %)")
    ax.legend(fontsize=7, ncols=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _sweep_plot(summary: dict, path: Path) -> None:
    sweep = sorted((float(m.split("@")[1]), summary[m]) for m in summary if m.startswith("dlp@"))
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    for key, label in (("mcq_accuracy", "MCQ accuracy"), ("qa_headline", "QA headline")):
        ax.plot([s["mean_k"] for _, s in sweep], [s[key] for _, s in sweep], marker="o", label=label)
        for p, s in sweep:
            ax.annotate(f"p={p:g}", (s["mean_k"], s[key]), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("mean adapters fused per prompt")
    ax.set_ylabel("score (%)")
    ax.set_title("dlp: top-p mass vs adapters fused vs score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(out_dir: Path, per_task: dict, tasks: Mapping[str, Task], meta: dict,
                 composite: dict | None = None) -> dict:
    """Write results.json, results.md, per_task.png and (with a sweep) p_sweep.png; returns the summary."""
    summary = summarise(per_task, tasks)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "per_task": per_task,
                                                      "composite": composite}, indent=2) + "\n")
    (out_dir / "results.md").write_text(_markdown(per_task, tasks, summary, meta, composite))
    _bar_plot(per_task, tasks, [m for m in summary if "@" not in m], out_dir / "per_task.png")
    if any(m.startswith("dlp@") for m in summary):
        _sweep_plot(summary, out_dir / "p_sweep.png")
    return summary
