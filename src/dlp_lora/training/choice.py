"""The serving choice per router class: its specialist, the generalist, a mixture of both, or the base model.

Every option is scored on the same examples the deployment gate decides on (the class's gate split, or
its first dev examples where it has none; `training.candidates` scores the generalist and the mixtures
there, the pool scored the specialist and the base model). The rule is the gate's, applied to each
option: an option is eligible when its 95% paired bootstrap interval against the base model lies above 0
and, for multiple choice, its answers have not collapsed onto one option. Taken in order of how many
adapters they use (the specialist, the generalist, then mixtures), an eligible option serves the class
when it beats the base model or, if an earlier option already serves it, beats that option beyond noise
too; with none eligible, the base model serves it. The choice is written to the manifest (`adapters`,
`serve`) and to the class's record (`choice`, with every option's figures), which `dlp-lora tasks` shows.

A small class (no gate split: decided on 12 to 17 dev examples, which resolve only gains of about 30
points) that this leaves to the base model gets a second look where the generalist was cross-validated on
its train + dev examples (`training.crossval`, about 120 examples): the same rule, base model against the
generalist, on those scores (each cross-validated generalist in turn, the one named first). Its specialist
is not cross-validated (that would train k adapters per class), so a specialist the dev gate deployed keeps
the class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlp_lora.assets import Manifest
from dlp_lora.config import AdapterTrainConfig, SplitConfig
from dlp_lora.evaluation.examples import majority_share
from dlp_lora.evaluation.stats import paired_difference
from dlp_lora.tasks import get_task, load_splits
from dlp_lora.training.crossval import crossval_options, labelled
from dlp_lora.training.gate import collapsed, decided_examples, decided_split

__all__ = ["serving_options", "choose_option", "cross_validated", "apply_choices", "choice_table", "BASE"]

BASE = "base"
"""The option name of the base model alone."""


def serving_options(task: str, record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Option name -> {"mixture", "scores", "chosen"} on the gate (or dev) examples of `record`: the base
    model, the specialist (when it was trained) and every scored candidate (`record["candidates"]`)."""
    split = decided_split(record)
    base = record.get(f"base_{split}_scores") or []
    options = {BASE: {"mixture": {}, "scores": base, "chosen": []}}
    if record.get(f"{split}_scores"):
        options[task] = {
            "mixture": {task: 1.0},
            "scores": record[f"{split}_scores"],
            "chosen": record.get(f"{split}_chosen") or [],
        }
    for name, cand in (record.get("candidates") or {}).items():
        if cand["split"] != split or len(cand["scores"]) != len(base):
            raise ValueError(
                f"task {task!r}: candidate {name!r} was scored on {len(cand['scores'])} {cand['split']} "
                f"examples, the gate decides on {len(base)} {split} examples"
            )
        options[name] = {"mixture": cand["mixture"], "scores": cand["scores"], "chosen": cand["chosen"]}
    return options


def choose_option(
    options: dict[str, dict[str, Any]], gold: Sequence | None = None, level: float = 0.95
) -> dict[str, Any]:
    """The gate's rule over every option (module docstring): {"served": name, "mixture", "n", "options":
    {name: {"mean", "diff", "low", "high", "eligible", "reason", "vs_<option>"}}} (differences against the
    base model; `vs_<option>`: against the option it was compared with); gold: the gold option indices of
    the examples (multiple choice), for the collapse check."""
    base = options[BASE]["scores"]
    table: dict[str, dict[str, Any]] = {
        BASE: {"mean": round(sum(base) / len(base), 2), "eligible": True, "reason": "the base model"}
    }
    for name, opt in options.items():
        if name == BASE:
            continue
        diff = paired_difference(opt["scores"], base, level=level)
        row = {
            "mean": round(sum(opt["scores"]) / len(opt["scores"]), 2),
            "diff": round(diff.estimate, 2),
            "low": round(diff.low, 2),
            "high": round(diff.high, 2),
        }
        if gold is not None and opt["chosen"] and collapsed(opt["chosen"], gold):
            row.update(eligible=False, reason=f"collapsed: one option for {majority_share(opt['chosen']):.0%}")
        elif diff.low > 0:
            row.update(eligible=True, reason="beats the base model beyond noise")
        else:
            row.update(eligible=False, reason="not better than the base model beyond noise")
        table[name] = row
    # Fewest adapters first (the specialist, then the generalist, then mixtures); an option replaces the
    # current choice only when it beats it beyond noise too, so a difference of one or two examples on a
    # small split never moves a class.
    served = BASE
    for name in sorted((n for n in options if n != BASE), key=lambda n: len(options[n]["mixture"])):
        if not table[name]["eligible"]:
            continue
        if served != BASE:
            vs = paired_difference(options[name]["scores"], options[served]["scores"], level=level)
            table[name]["vs_" + served] = vs.fmt()
            if vs.low <= 0:
                continue
        served = name
    return {"served": served, "mixture": dict(options[served]["mixture"]), "n": len(base), "options": table}


def cross_validated(record: dict[str, Any], first: str = "multitask") -> dict[str, dict[str, dict[str, Any]]]:
    """Generalist -> its `crossval_options`, for each generalist with complete cross-validated scores in
    `record`, `first` first (then by name)."""
    names = sorted(n for n, v in (record.get("crossval") or {}).items() if isinstance(v, dict) and n != "base")
    options = {n: crossval_options(record, n) for n in sorted(names, key=lambda n: n != first)}
    return {n: cv for n, cv in options.items() if cv is not None}


def apply_choices(
    root: str | Path,
    data_dir: str | Path | None = None,
    split_cfg: SplitConfig = SplitConfig(),
    tasks: Sequence[str] | None = None,
    generalist: str = "multitask",
) -> Manifest:
    """Choose what serves each scored class and write it to the manifest at `root` (and save it); a small
    class left to the base model may go to `generalist` on its cross-validated scores (module docstring).

    A class served by its specialist alone keeps `adapters[task]` and no `serve` entry (as before); by the
    base model, `adapters[task] = None`; by anything else, a `serve` entry, with `adapters[task]` set when
    the mixture uses the specialist (its directory stays on disk for every trained task).
    """
    root = Path(root)
    manifest = Manifest.load(root)
    dev_limit = AdapterTrainConfig().dev_limit
    for task in tasks or [t for t in manifest.tasks if t in manifest.records]:
        record = manifest.records[task]
        options = serving_options(task, record)
        if len(options) == 1 or not options[BASE]["scores"]:
            continue  # nothing but the base model was scored: leave the class as it is
        t = get_task(task)
        gold = cv_gold = None
        if t.kind == "mcq":  # gold option indices, for the collapse check
            split = load_splits(t, data_dir, split_cfg)
            gold = [ex.gold_index for ex in decided_examples(split, dev_limit)[1]]
            cv_gold = [ex.gold_index for ex in labelled(split)]
        choice = choose_option(options, gold)
        if decided_split(record) == "dev":
            for name, cv in cross_validated(record, generalist).items():
                choice["crossval"] = choose_option(cv, cv_gold)
                if choice["served"] == BASE and choice["crossval"]["served"] != BASE:
                    choice.update(served=name, mixture=dict(cv[name]["mixture"]), decided_on="crossval")
                    break
        record["choice"] = choice
        mixture = choice["mixture"]
        manifest.adapters[task] = f"adapters/{task}" if task in mixture else None
        if mixture in ({}, {task: 1.0}):
            manifest.serve.pop(task, None)
        else:
            manifest.serve[task] = mixture
    manifest.check(root)
    manifest.save(root)
    return manifest


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if "diff" not in row:
        return f"{row['mean']:.1f}"
    mark = "" if row["eligible"] else " ✗"
    return f"{row['mean']:.1f} ({row['diff']:+.1f} [{row['low']:+.1f}, {row['high']:+.1f}]){mark}"


def choice_table(manifest: Manifest) -> str:
    """Markdown: for each class with a `choice` record, every option's mean on the examples decided on, its
    difference with the base model [95% CI] (✗: not eligible: within noise or collapsed), one pair of columns
    per generalist offered (alone, and under the specialist), the cross-validated figures where a small
    class has them (base -> generalist), and what serves it."""
    tasks = [t for t in manifest.tasks if (manifest.records.get(t) or {}).get("choice")]
    generalists: list[str] = []  # in the order they were offered
    for task in tasks:
        for cand in (manifest.records[task].get("candidates") or {}).values():
            generalists += [n for n in cand["mixture"] if n != task and n not in generalists]
    head = ["task", "decided on", "base", "specialist"]
    for g in generalists:
        head += [f"`{g}`", f"specialist + `{g}`"]
    head += ["cross-validated on train + dev", "served by"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for task in tasks:
        choice = manifest.records[task]["choice"]
        rows = choice["options"]
        by: dict[tuple[str, bool], dict[str, Any] | None] = {}  # (generalist, with the specialist) -> figures
        for name, cand in (manifest.records[task].get("candidates") or {}).items():
            g = next(n for n in cand["mixture"] if n != task)
            by[(g, task in cand["mixture"])] = rows.get(name)
        served = " + ".join(f"{n} x{w:g}" for n, w in choice["mixture"].items()) or "base model"
        cv, cv_cell = choice.get("crossval"), ""
        if cv:
            k = manifest.records[task]["crossval"]["k"]
            gen = next(n for n in cv["options"] if n != BASE)
            cv_cell = f"{k}-fold, n={cv['n']}: {_cell(cv['options'][BASE])} -> `{gen}` {_cell(cv['options'][gen])}"
        if choice.get("decided_on") == "crossval":
            served += " (cross-validated)"
        cells = [task, f"{decided_split(manifest.records[task])}, n={choice['n']}", _cell(rows[BASE])]
        cells += [_cell(rows.get(task))] + [_cell(by.get((g, mixed))) for g in generalists for mixed in (False, True)]
        lines.append("| " + " | ".join([*cells, cv_cell, f"**{served}**"]) + " |")
    return "\n".join(lines) + "\n"
