"""Composite prompts: two questions from different tasks in one prompt, scored per part.

Routing once per prompt (the router sees the joined text, one mixture answers both parts) is compared
with routing once per segment (each part routed on its own text), and with no routing: the base model, and
each baseline adapter of the assets (the multitask generalist) answering every part. Each part is answered
by its own greedy generation so the settings differ only in the mixture used.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from dlp_lora.config import GenerationConfig
from dlp_lora.evaluation.harness import method_dense, plan_mean_k, rows_routing
from dlp_lora.evaluation.metrics import score_task
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.router import select_with
from dlp_lora.tasks import Example, Task, parse_answer
from dlp_lora.types import ArrowRouting

__all__ = ["make_pairs", "evaluate_composite"]

SEPARATOR = "\n\n"


def make_pairs(pools: dict[str, Sequence[Example]], n: int, seed: int = 0) -> list[tuple[Example, Example]]:
    """n seeded pairs of examples from two different tasks."""
    rng = random.Random(seed)
    names = sorted(t for t, exs in pools.items() if exs)
    if len(names) < 2:
        raise ValueError(f"composite prompts need examples from at least two tasks, got {names}")
    pairs = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        pairs.append((rng.choice(list(pools[a])), rng.choice(list(pools[b]))))
    return pairs


def _part_score(task: Task, ex: Example, text: str) -> float:
    """The part's headline score (accuracy / F1 / EM) in percent."""
    return score_task(task.metric, [parse_answer(task, text, ex.choices, ex.options)], [list(ex.references)])[
        task.headline
    ]


def evaluate_composite(
    dlp: DLPLoRA,
    pairs: Sequence[tuple[Example, Example]],
    tasks: Mapping[str, Task],
    batch_size: int = 8,
    arrows: Mapping[str, ArrowRouting] | None = None,
    max_new_tokens: int = 64,
) -> dict[str, float]:
    """Mean per-part score (percent), weight on the true task and mean k: per-prompt and per-segment
    routing, the base model, each baseline adapter and each of `arrows` (Arrow per token: no prompt-level
    choice, so it is the same per prompt and per segment) (`<name>_score`, ... for name in `settings`),
    and each prompt's mean part score (`<name>_prompt_scores`, (P,): the unit a paired interval resamples,
    since one prompt's parts share its routing).

    tasks: task name -> Task for every task the pairs draw from; arrows: setting name -> Arrow routing.
    """
    joined = [a.prompt + SEPARATOR + b.prompt for a, b in pairs]
    parts = [ex for pair in pairs for ex in pair]
    truth = torch.tensor([dlp.task_names.index(ex.task) for ex in parts])
    out: dict[str, float] = {"pairs": len(pairs)}
    settings = []
    for name, routed, parts_each in (("per_prompt", joined, 2), ("per_segment", [ex.prompt for ex in parts], 1)):
        probs = dlp.router.predict_proba(routed).repeat_interleave(parts_each, dim=0)
        # Served as `DLPLoRA.class_weights` selects; routing quality read on the router's classes, where a
        # task the gate serves with the base model keeps its class.
        dense = dlp.to_bank(select_with(probs, dlp.selection, dlp.no_adapter).to_dense(len(dlp.task_names)))
        classes = select_with(probs, dlp.selection).to_dense(len(dlp.task_names))
        settings.append((name, dense, float(classes[torch.arange(len(parts)), truth].mean())))
    no_probs = torch.zeros(len(parts), len(dlp.task_names))  # these settings do not read the router
    for unrouted in ("base", *dlp.baselines):  # the same weights as the harness's methods of these names
        settings.append((unrouted, method_dense(dlp, unrouted, no_probs, truth), 0.0))
    settings += [(name, arrow, 0.0) for name, arrow in (arrows or {}).items()]
    out["settings"] = [name for name, _, _ in settings]
    for name, dense, true_weight in settings:
        texts: list[str] = []
        for i in range(0, len(parts), batch_size):
            rows = range(i, min(i + batch_size, len(parts)))
            gen = GenerationConfig(
                max_new_tokens=min(max_new_tokens, max(tasks[parts[b].task].max_new_tokens for b in rows))
            )
            res = dlp.generate([parts[b].prompt for b in rows], config=gen, routing=rows_routing(dense, rows))
            texts += [r.text for r in res]
        scores = [_part_score(tasks[ex.task], ex, t) for ex, t in zip(parts, texts)]
        out[f"{name}_score"] = sum(scores) / len(parts)
        out[f"{name}_prompt_scores"] = [(a + b) / 2 for a, b in zip(scores[::2], scores[1::2])]
        out[f"{name}_true_task_weight"] = true_weight
        out[f"{name}_mean_k"] = plan_mean_k(dense)
    return out
