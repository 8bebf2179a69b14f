"""Turn per-task, per-method scores into results.json, a markdown table and plots.

Every method is compared with the plain base model on the same test examples: per task by a paired
bootstrap interval of the headline difference, and over tasks by a stratified one (examples resampled
within each task). A difference whose 95% interval contains 0 is reported as no difference.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from statistics import mean

from matplotlib.figure import Figure

from dlp_lora.evaluation.examples import COLLAPSE_SHARE
from dlp_lora.evaluation.harness import HEADLINE_SCORES, headline_key
from dlp_lora.evaluation.stats import Interval, paired_difference, stratified_mean_difference
from dlp_lora.tasks import Task

__all__ = ["headline", "summarise", "differences", "pairs_for", "method_pairs", "collapsed_rows", "write_report"]

BASE = "base"
PAIRS = (
    ("oracle", "base"),
    ("dlp", "oracle"),
    ("dlp", "top1"),
    ("dlp", "uniform"),
    ("dlp", "multitask"),
    ("dlp", "base"),
    ("multitask", "base"),
    ("arrow", "dlp"),
    ("arrow", "base"),
    ("arrow", "multitask"),
    ("arrow", "oracle"),
    ("arrow-gks", "arrow"),
    ("arrow-gks", "dlp"),
    ("arrow-gks", "base"),
    ("dlp+arrow", "dlp"),
    ("dlp+arrow", "base"),
    ("dlp+arrow", "multitask"),
)
"""Method pairs compared over all tasks (when both were run): `a - b` with a stratified bootstrap interval.
`multitask` stands for each generalist (baseline adapter) the run evaluated (`pairs_for`)."""

_AVERAGES = (
    ("mcq_headline", "MCQ acc_norm"),
    ("mcq_accuracy", "MCQ generated acc"),
    ("qa_headline", "QA headline"),
    ("qa_bleu", "QA BLEU"),
    ("qa_rouge1", "QA ROUGE-1"),
    ("qa_rougeL", "QA ROUGE-L"),
)


def headline(task: Task, scores: dict) -> float:
    """The one number per task that the averages use (see `harness.headline_key`)."""
    return scores[headline_key(task, "acc_norm" in scores)]


def _avg(values: list[float]) -> float:
    return mean(values) if values else float("nan")


def summarise(
    per_task: dict[str, dict[str, dict]], tasks: Mapping[str, Task], diffs: dict[str, dict[str, dict]] | None = None
) -> dict[str, dict]:
    """Averages per method over tasks: MCQ headline (acc_norm) and generated accuracy, QA headline, BLEU,
    ROUGE, mean adapters fused; with a `base` method, each other method's difference from it.

    per_task: task name -> method -> scores (with HEADLINE_SCORES); tasks: task name -> Task; diffs: the
    per-task `differences` when already computed.
    """
    methods = list(next(iter(per_task.values())))
    mcq = [t for t in per_task if tasks[t].kind == "mcq"]
    qa = [t for t in per_task if tasks[t].kind == "qa"]
    diffs = differences(per_task) if diffs is None else diffs
    out = {}
    for m in methods:
        out[m] = {
            "mcq_headline": _avg([headline(tasks[t], per_task[t][m]) for t in mcq]),
            "mcq_accuracy": _avg([per_task[t][m]["accuracy"] for t in mcq]),
            "qa_headline": _avg([headline(tasks[t], per_task[t][m]) for t in qa]),
            **{f"qa_{k}": _avg([per_task[t][m][k] for t in qa]) for k in ("bleu", "rouge1", "rougeL")},
            "mean_k": _avg([per_task[t][m]["mean_k"] for t in per_task]),
            "fused_fraction": _avg([per_task[t][m]["fused_fraction"] for t in per_task]),
        }
        if m != BASE and BASE in methods:
            vs = {}
            for group, names in (("mcq", mcq), ("qa", qa), ("all", list(per_task))):
                if names:
                    vs[group] = _as_dict(
                        stratified_mean_difference(
                            {t: per_task[t][m][HEADLINE_SCORES] for t in names},
                            {t: per_task[t][BASE][HEADLINE_SCORES] for t in names},
                        )
                    )
            signs = [_sign(Interval(**diffs[t][m])) for t in per_task]
            vs["tasks"] = {"better": signs.count(1), "same": signs.count(0), "worse": signs.count(-1)}
            out[m]["vs_base"] = vs
    return out


def differences(per_task: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    """task -> method -> paired bootstrap interval (as a dict) of its headline minus the base model's."""
    out: dict[str, dict[str, dict]] = {}
    for t, by_method in per_task.items():
        if BASE in by_method:
            base = by_method[BASE][HEADLINE_SCORES]
            out[t] = {
                m: _as_dict(paired_difference(s[HEADLINE_SCORES], base)) for m, s in by_method.items() if m != BASE
            }
    return out


def pairs_for(generalists: Sequence[str]) -> list[tuple[str, str]]:
    """PAIRS with `multitask` read as each of `generalists` in turn, then each generalist against those
    before it (e.g. `multitask-v2 - multitask`)."""
    out: list[tuple[str, str]] = []
    for a, b in PAIRS:
        for g in generalists if "multitask" in (a, b) else [None]:
            pair = (g if a == "multitask" else a, g if b == "multitask" else b)
            if pair not in out:
                out.append(pair)
    out += [(g, h) for i, g in enumerate(generalists) for h in generalists[:i]]
    return out


def method_pairs(per_task: dict[str, dict[str, dict]], generalists: Sequence[str] = ("multitask",)) -> dict[str, dict]:
    """ "a - b" -> stratified bootstrap interval (dict) of the headline difference over all tasks, for the
    pairs (`pairs_for(generalists)`) whose two methods were both run."""
    methods = set(next(iter(per_task.values())))
    return {
        f"{a} - {b}": _as_dict(
            stratified_mean_difference(
                {t: per_task[t][a][HEADLINE_SCORES] for t in per_task},
                {t: per_task[t][b][HEADLINE_SCORES] for t in per_task},
            )
        )
        for a, b in pairs_for(generalists)
        if {a, b} <= methods
    }


def collapsed_rows(per_task: dict[str, dict[str, dict]]) -> list[tuple[str, str, float, float, dict | None]]:
    """(task, method, top answer share, gold top share, option AUC or None) wherever a method collapsed
    (COLLAPSE_SHARE); the AUC (two-option tasks) says whether it still tells the answers apart."""
    return [
        (t, m, s["top_answer_share"], s["gold_top_share"], s.get("option_auc"))
        for t, by in per_task.items()
        for m, s in by.items()
        if s["top_answer_share"] > COLLAPSE_SHARE >= s["gold_top_share"]
    ]


def _auc_cell(auc: dict | None) -> str:
    return f"{auc['estimate']:.2f} [{auc['low']:.2f}, {auc['high']:.2f}]" if auc else ""


def _as_dict(i: Interval) -> dict:
    return {"estimate": i.estimate, "low": i.low, "high": i.high, "n": i.n}


def _sign(i: Interval) -> int:
    return 0 if not i.excludes_zero else (1 if i.low > 0 else -1)


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def _averages_table(summary: dict, methods: list[str]) -> list[str]:
    lines = [
        "| method | " + " | ".join(label for _, label in _AVERAGES) + " | mean k | fused % |",
        "|---" * (len(_AVERAGES) + 3) + "|",
    ]
    for m in methods:
        s = summary[m]
        lines.append(
            f"| {m} | "
            + " | ".join(_fmt(s[k]) for k, _ in _AVERAGES)
            + f" | {s['mean_k']:.2f} | {100 * s['fused_fraction']:.1f} |"
        )
    return lines


def _vs_base_table(summary: dict, methods: list[str]) -> list[str]:
    lines = [
        "| method | MCQ (acc_norm) | QA (headline) | all tasks | tasks better / same / worse |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        vs = summary[m].get("vs_base")
        if vs is None:
            continue
        intervals = [Interval(**vs[g]) if g in vs else None for g in ("mcq", "qa", "all")]
        cell = ["-" if i is None else i.fmt() + ("" if i.excludes_zero else " (no difference)") for i in intervals]
        c = vs["tasks"]
        lines.append(f"| {m} | " + " | ".join(cell) + f" | {c['better']} / {c['same']} / {c['worse']} |")
    return lines


def _task_cell(score: float, diff: dict | None) -> str:
    if diff is None:
        return f"{score:.1f}"
    i = Interval(**diff)
    mark = {1: " ↑", -1: " ↓", 0: ""}[_sign(i)]
    return f"{score:.1f} ({i.estimate:+.1f}{mark})"


def _markdown(
    per_task: dict,
    tasks: Mapping[str, Task],
    summary: dict,
    diffs: dict,
    meta: dict,
    composite: dict | None,
    pairs: dict,
) -> str:
    main = [m for m in summary if "@" not in m]
    sweep = [m for m in summary if "@" in m]
    lines = [
        "# Results",
        "",
        f"Produced by `{meta['command']}`.",
        "",
        f"Up to {meta['examples_per_task']} test examples per task (each task's whole seeded test split up to "
        "that many; the count per task is in the table), greedy generation (no sampling, so one run is exact "
        "and seeds do not apply). Multiple choice headline: `acc_norm`, the option whose full text has the "
        "highest log-likelihood per byte after the prompt, as lm-evaluation-harness scores it (the adapters "
        "are trained on that target); `MCQ generated acc` parses the generated answer instead, which is "
        "capped at the task's answer length (4 tokens for multiple choice: enough for a letter, not for an "
        "option's text, which is what an adapter trained on option texts answers with). QA headline: "
        "token F1 for SQuAD, exact match otherwise; BLEU (sacrebleu) and ROUGE (rouge-score) compare the "
        "generated text with the reference answer.",
        "",
        "## Averages",
        "",
        "Mean k: adapters a row's tokens use (its mixture's, or Arrow's top_k per token); fused %: rows whose "
        "tokens use more than one.",
        "",
    ]
    lines += _averages_table(summary, main)
    if any("vs_base" in summary[m] for m in main):
        lines += [
            "",
            "## Against the base model",
            "",
            "Mean difference of the headline score from the plain base model on the same examples, with a "
            "95% bootstrap interval (examples resampled within each task, tasks weighted equally); "
            "'better' / 'worse' count the tasks whose own paired interval excludes 0.",
            "",
        ]
        lines += _vs_base_table(summary, main)
    if pairs:
        lines += [
            "",
            "## Between methods",
            "",
            "Mean headline difference over all tasks (tasks weighted equally), 95% bootstrap interval "
            "(examples resampled within each task).",
            "",
            "| difference | all tasks |",
            "|---|---|",
        ]
        lines += [
            f"| {name} | {Interval(**d).fmt()}{'' if Interval(**d).excludes_zero else ' (no difference)'} |"
            for name, d in pairs.items()
        ]
    collapsed = collapsed_rows(per_task)
    lines += [
        "",
        "## Collapse check",
        "",
        f"Methods whose most frequent answer (the option `acc_norm` picks, else the parsed answer) covers more "
        f"than {COLLAPSE_SHARE:.0%} of a task's prompts while the gold answers' most frequent one does not. "
        "On two-option tasks, the AUC of the method's acc_norm margin of the first option over the second "
        "[95% bootstrap interval]: near 0.5, the method only leans to one answer (the label prior) and does "
        "not tell the questions apart.",
    ]
    lines += (
        ["", "| task | method | top answer share | gold top share | option AUC |", "|---|---|---|---|---|"]
        + [f"| {t} | {m} | {s:.0%} | {g:.0%} | {_auc_cell(a)} |" for t, m, s, g, a in collapsed]
        if collapsed
        else ["", "None."]
    )
    binary = [t for t, by in per_task.items() if any("option_auc" in s for s in by.values())]
    if binary:
        lines += [
            "",
            "## Two-option tasks: told apart, or a lean to one answer?",
            "",
            "AUC of each method's acc_norm margin of the first option over the second, for the examples whose "
            "gold is the first [95% bootstrap interval]. 0.5: the answers carry no information about the "
            "question (a method that gains here while near 0.5 gained the test split's label prior, not the "
            "task); below 0.5: ranked the wrong way.",
            "",
            "| task | " + " | ".join(main) + " |",
            "|---|" + "---|" * len(main),
        ]
        lines += [
            f"| {t} | " + " | ".join(_auc_cell(per_task[t][m].get("option_auc")) for m in main) + " |" for t in binary
        ]
    if sweep:
        lines += ["", "## Top-p sweep of `dlp`", ""] + _averages_table(summary, sweep)
        lines += ["", "![p sweep: mean adapters fused vs score](p_sweep.png)"]
    lines += [
        "",
        "## Per task (headline metric)",
        "",
        "Each method's score, and in brackets its difference from `base` (↑ / ↓ where the paired 95% "
        "interval excludes 0).",
        "",
        "| task | kind | n | " + " | ".join(main) + " |",
        "|---|---|---|" + "---|" * len(main),
    ]
    for t, by_method in per_task.items():
        n = len(by_method[main[0]][HEADLINE_SCORES])
        lines.append(
            f"| {t} | {tasks[t].kind} | {n} | "
            + " | ".join(_task_cell(headline(tasks[t], by_method[m]), diffs.get(t, {}).get(m)) for m in main)
            + " |"
        )
    lines += ["", "![per-task headline score by method](per_task.png)"]
    if composite:
        lines += [
            "",
            "## Composite prompts",
            "",
            f"{composite['pairs']} prompts, each two questions from different tasks joined by a blank line; "
            "each part is answered and scored on its own. Per prompt: one routing for the joined text; "
            "per segment: each part routed on its own text; base: no adapter; a baseline's name: that adapter "
            "alone for every part (no routing); `arrow`, `arrow-gks`: Arrow per token (no choice per prompt). "
            "Differences: mean over prompts, 95% paired bootstrap interval over prompts (a prompt's two parts "
            "share its routing, so prompts are resampled, not parts).",
            "",
            "| routing | mean part score | - base | - per prompt | weight on the true task | mean k |",
            "|---|---|---|---|---|---|",
        ]
        for name in composite["settings"]:
            routed = name in ("per_prompt", "per_segment")
            label, weight = (name.replace("_", " "), f"{composite[f'{name}_true_task_weight']:.3f}") if routed else (
                f"`{name}`", "-")  # fmt: skip
            vs = [_composite_diff(composite, name, other) for other in ("base", "per_prompt")]
            lines.append(
                f"| {label} | {composite[f'{name}_score']:.2f} | {vs[0]} | {vs[1]} | {weight} | "
                f"{composite[f'{name}_mean_k']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _composite_diff(composite: dict, name: str, other: str) -> str:
    """`name - other` over the composite prompts with its interval; "-" for a setting against itself."""
    if name == other:
        return "-"
    d = paired_difference(composite[f"{name}_prompt_scores"], composite[f"{other}_prompt_scores"])
    return d.fmt() + ("" if d.excludes_zero else " (no difference)")


def _leave_alone_markdown(leave_alone: dict | None) -> str:
    if not leave_alone:
        return ""
    lines = [
        "",
        "## Out-of-pool prompts: left to the base model?",
        "",
        f"{leave_alone['prompts']} held-out prompts from {leave_alone['sources']} sources no adapter was trained "
        "on (the router's `none` class). Same answer: the greedy answer equals the base model's; drift: how "
        "much less likely the base model's own answer is under the setting, in nats per answer token "
        "(0: left alone).",
        "",
        "| setting | same answer as base | drift (nats/token) | mean k |",
        "|---|---|---|---|",
    ]
    for name in leave_alone["settings"]:
        r = leave_alone[name]
        lines.append(f"| `{name}` | {100 * r['same_answer']:.0f}% | {r['drift_nats']:+.3f} | {r['mean_k']:.2f} |")
    return "\n".join(lines) + "\n"


def _bar_plot(per_task: dict, task_map: Mapping[str, Task], methods: list[str], path: Path) -> None:
    tasks = list(per_task)
    fig = Figure(figsize=(max(10, 0.55 * len(tasks)), 5))
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ax.bar(
            [i + j * width for i in range(len(tasks))],
            [headline(task_map[t], per_task[t][m]) for t in tasks],
            width,
            label=m,
        )
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("headline score (accuracy / F1 / EM, %)")
    ax.legend(fontsize=7, ncols=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _sweep_plot(summary: dict, path: Path) -> None:
    sweep = sorted((float(m.split("@")[1]), summary[m]) for m in summary if m.startswith("dlp@"))
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    for key, label in (("mcq_headline", "MCQ acc_norm"), ("qa_headline", "QA headline")):
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


def write_report(
    out_dir: Path,
    per_task: dict,
    tasks: Mapping[str, Task],
    meta: dict,
    composite: dict | None = None,
    leave_alone: dict | None = None,
    generalists: Sequence[str] = ("multitask",),
) -> dict:
    """Write results.json, results.md, per_task.png and (with a sweep) p_sweep.png; returns the summary.
    generalists: the baseline adapters evaluated, each compared as PAIRS compare `multitask`.

    results.json keeps the means and intervals; the per-example scores stay in the prediction files."""
    diffs = differences(per_task)
    summary = summarise(per_task, tasks, diffs)
    pairs = method_pairs(per_task, generalists)
    means = {
        t: {m: {k: v for k, v in s.items() if k != HEADLINE_SCORES} for m, s in by.items()}
        for t, by in per_task.items()
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": summary,
                "per_task": means,
                "vs_base": diffs,
                "pairs": pairs,
                "composite": composite,
                "out_of_pool": leave_alone,
            },
            indent=2,
        )
        + "\n"
    )
    text = _markdown(per_task, tasks, summary, diffs, meta, composite, pairs) + _leave_alone_markdown(leave_alone)
    (out_dir / "results.md").write_text(text)
    _bar_plot(per_task, tasks, [m for m in summary if "@" not in m], out_dir / "per_task.png")
    if any(m.startswith("dlp@") for m in summary):
        _sweep_plot(summary, out_dir / "p_sweep.png")
    return summary
