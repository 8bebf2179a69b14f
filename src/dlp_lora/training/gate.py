"""The deployment gate: deploy a task's adapter only where it beats the base model by more than noise.

Both are scored on the same examples, so the comparison is paired: the 95% paired-bootstrap interval of
(adapter - base) must lie above 0. The examples are the task's held-out gate split (`Splits.gate`, up
to 200 examples that neither training nor checkpoint selection saw) where the task has one; a small task
has none and is gated on dev, where the best checkpoint was also chosen (which favours the adapter, and
50 examples or fewer only resolve gains of about 15 points). A multiple-choice adapter that picks one
option position for more than `COLLAPSE_SHARE` of the prompts (when the gold answers do not) is
collapsed and never deployed. The test-split results (docs/results.md) are the final check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dlp_lora.evaluation.examples import COLLAPSE_SHARE, majority_share
from dlp_lora.evaluation.stats import paired_difference
from dlp_lora.tasks import Example, Splits

__all__ = ["deployment_gate", "collapsed", "decided_split", "decided_examples", "gate_table", "COLLAPSE_SHARE"]


def decided_split(record: dict[str, Any]) -> str:
    """The split a task's gate decision is made on: `gate` when it was scored on its gate split, else `dev`."""
    return "gate" if record.get("gate_scores") else "dev"


def decided_examples(split: Splits, dev_limit: int) -> tuple[str, list[Example]]:
    """(split name, examples) a task's gate decides on: its gate split, or its first `dev_limit` dev examples
    where it has none."""
    return ("gate", list(split.gate)) if split.gate else ("dev", list(split.dev[:dev_limit]))


def collapsed(chosen: Sequence, gold: Sequence) -> bool:
    """True when one answer covers more than COLLAPSE_SHARE of `chosen` while the gold answers do not."""
    return majority_share(chosen) > COLLAPSE_SHARE and majority_share(gold) <= COLLAPSE_SHARE


def deployment_gate(record: dict[str, Any], gold: Sequence | None = None, level: float = 0.95) -> dict[str, Any]:
    """Deployment decision for one trained adapter, from its record.

    record: from `train_adapter` (per-example `dev_scores`, `base_dev_scores` and, for multiple choice,
    `dev_chosen` option indices), with `gate_scores`, `base_gate_scores`, `gate_chosen` when the task
    was scored on its gate split (those are used then); gold: the gold option indices of the examples
    the decision is made on (multiple choice).
    """
    split = decided_split(record)
    adapter, base = record.get(f"{split}_scores") or [], record.get(f"base_{split}_scores") or []
    if not adapter or len(adapter) != len(base):
        return {"deployed": False, "reason": "no gate or dev split to compare on", "n": len(adapter)}
    diff = paired_difference(adapter, base, level=level)
    out: dict[str, Any] = {
        "split": split,
        "n": diff.n,
        "base": round(sum(base) / len(base), 2),
        "adapter": round(sum(adapter) / len(adapter), 2),
        "diff": round(diff.estimate, 2),
        "low": round(diff.low, 2),
        "high": round(diff.high, 2),
        "level": level,
    }
    chosen = record.get(f"{split}_chosen") or []
    if gold is not None and chosen:
        out["majority_share"] = round(majority_share(chosen), 3)
        if collapsed(chosen, gold):
            return {
                **out,
                "deployed": False,
                "reason": f"collapsed: one option for {out['majority_share']:.0%} of {split} prompts",
            }
    if diff.low > 0:
        return {**out, "deployed": True, "reason": "beats the base model beyond noise"}
    return {**out, "deployed": False, "reason": "not better than the base model beyond noise"}


def _decision(gate: dict[str, Any]) -> str:
    if gate["deployed"]:
        return "**yes**"
    return f"no: collapsed ({gate['majority_share']:.0%} one option)" if "collapsed" in gate["reason"] else "no"


def _signed(x: float) -> str:
    return f"{x:+.1f}" if x else "0"


def gate_table(records: dict[str, dict[str, Any]], tasks: Sequence[str]) -> str:
    """Markdown: each trained task's dev curve, best step, dev and gate scores (base -> adapter) and the
    gate's decision with its interval, from a manifest's records (tasks not trained yet are left out)."""
    lines = [
        "| task | steps | dev curve | best step | dev: base -> adapter | gate split: base -> adapter | "
        "difference [95% CI] | deployed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        rec = records.get(task) or {}
        gate = rec.get("gate")
        if not gate or "base" not in gate:
            continue
        curve = ", ".join(f"{p['dev']:.0f}" for p in rec.get("dev_curve", []))
        base_dev, dev = rec.get("base_dev_scores") or [], rec.get("dev_scores") or []  # the kept checkpoint's
        dev_cell = f"{sum(base_dev) / len(base_dev):.1f} -> {sum(dev) / len(dev):.1f}" if base_dev and dev else ""
        where = f"{gate['split']}, n={gate['n']}"
        lines.append(
            f"| {task} | {rec.get('steps', '')} | {curve} | {rec.get('best_step', '')} | {dev_cell} | "
            f"{gate['base']:.1f} -> {gate['adapter']:.1f} ({where}) | {_signed(gate['diff'])} "
            f"[{gate['low']:+.1f}, {gate['high']:+.1f}] | {_decision(gate)} |"
        )
    return "\n".join(lines) + "\n"
