"""The evaluation harness: every method on the same test examples, real generation, resumable.

For each task the router scores the prompts once; each method turns those probabilities into a
routing; answers are generated greedily (and, for multiple choice, the full option texts are also
scored by log-likelihood: `acc` and `acc_norm`, the headline, as lm-evaluation-harness does). Rows
whose routing another method already ran are reused: greedy decoding of a row depends only on its
prompt and its mixture (tests/test_fusion.py proves batch invariance). Each method's per-example
headline scores are kept (`HEADLINE_SCORES`) so the report can pair methods example by example.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

# EvalConfig lives in config (no torch) so `dlp-lora evaluate --help` can build its flags cheaply.
from dlp_lora.config import ArrowConfig, EvalConfig, GenerationConfig, SplitConfig
from dlp_lora.evaluation.examples import MCQ_HEADLINE, generated_score, majority_share, mcq_scores, option_auc
from dlp_lora.evaluation.methods import ARROW, ARROW_GKS, DLP_ARROW, method_weights
from dlp_lora.evaluation.metrics import score_task
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.tasks import Example, Task, get_task, load_splits, parse_answer
from dlp_lora.tasks.out_of_pool import NONE
from dlp_lora.types import ArrowRouting, Routing

__all__ = [
    "EvalConfig",
    "evaluate_task",
    "routing_key",
    "rows_routing",
    "plan_mean_k",
    "HEADLINE_SCORES",
    "headline_key",
    "arrow_setting",
]

HEADLINE_SCORES = "headline_scores"
"""Key of a method's per-example headline scores (0-100, in test-example order) in `evaluate_task`'s result."""


def headline_key(task: Task, loglik: bool) -> str:
    """The score that summarises a task: option-text acc_norm for multiple choice when options are scored
    by log-likelihood (else the generated answer's accuracy), F1 for SQuAD, exact match otherwise."""
    return MCQ_HEADLINE if task.kind == "mcq" and loglik else task.headline


def routing_key(dense_row: torch.Tensor) -> tuple[tuple[int, float], ...]:
    """Hashable identity of one row's mixture (weights rounded to 1e-6)."""
    nz = dense_row.nonzero().flatten().tolist()
    return tuple((i, round(float(dense_row[i]), 6)) for i in nz)


@dataclass(frozen=True)
class Hybrid:
    """Arrow for some examples, a mixture for the others (the `dlp+arrow` method).

    dense: (B, bank) weights; arrow: the Arrow routing; arrow_rows: (B,) bool, True where Arrow answers."""

    dense: torch.Tensor
    arrow: ArrowRouting
    arrow_rows: torch.Tensor


Plan = torch.Tensor | ArrowRouting | Hybrid
"""How a method routes a task's examples: (B, bank) weights, Arrow for all of them, or a `Hybrid`."""


def _routing_of(plan: Plan, b: int) -> torch.Tensor | ArrowRouting:
    """Example b's routing: Arrow's, or its (bank,) weights."""
    if isinstance(plan, Hybrid):
        return plan.arrow if bool(plan.arrow_rows[b]) else plan.dense[b]
    return plan if isinstance(plan, ArrowRouting) else plan[b]


def rows_routing(plan: Plan, rows: Sequence[int]) -> Routing | ArrowRouting:
    """The routing of a group of examples under `plan`: Arrow's when they are under Arrow, else their
    weights' (a group is all one or all the other: Arrow routes a whole batch)."""
    routings = [_routing_of(plan, b) for b in rows]
    if isinstance(routings[0], ArrowRouting):
        return routings[0]
    return Routing.from_dense(torch.stack(routings))


def plan_mean_k(plan: torch.Tensor | ArrowRouting) -> float:
    """Adapters per example under a plan of weights (B, N) or Arrow (its top_k, per token): the count
    `_score` reads from stored rows, for the settings that keep no rows (composite, out-of-pool)."""
    if isinstance(plan, ArrowRouting):
        return float(plan.top_k)
    return float((plan > 0).sum(1).float().mean())


def _run_rows(
    dlp: DLPLoRA,
    task: Task,
    examples: Sequence[Example],
    plan: Plan,
    cfg: EvalConfig,
    cache: dict,
) -> list[dict]:
    """Generate (and score options) for rows not in cache; cache maps (uid, routing key) -> row result.
    Rows under Arrow and rows under mixtures are batched apart (Arrow routes a whole batch)."""
    keys = [(ex.uid, _key(plan, b)) for b, ex in enumerate(examples)]
    todo = [b for b, k in enumerate(keys) if k not in cache]
    gen = GenerationConfig(max_new_tokens=task.max_new_tokens)
    under_arrow = {b for b in todo if isinstance(_routing_of(plan, b), ArrowRouting)}
    for group in ([b for b in todo if b in under_arrow], [b for b in todo if b not in under_arrow]):
        for i in range(0, len(group), cfg.batch_size):
            rows = group[i : i + cfg.batch_size]
            prompts = [examples[b].prompt for b in rows]
            routing = rows_routing(plan, rows)
            arrow = routing if isinstance(routing, ArrowRouting) else None
            outs = dlp.generate(prompts, config=gen, routing=routing)
            opts = (
                dlp.option_logprobs(prompts, [list(examples[b].options) for b in rows], routing)
                if task.kind == "mcq" and cfg.loglik
                else [None] * len(rows)
            )
            for b, out, lp in zip(rows, outs, opts):
                cache[keys[b]] = {
                    "text": out.text,
                    "parsed": parse_answer(task, out.text, examples[b].choices, examples[b].options),
                    "option_logprobs": lp,
                    "adapters": out.adapters,
                    "weights": out.weights,
                    **({"arrow": _arrow_record(dlp, arrow)} if arrow else {}),
                }
    return [cache[k] for k in keys]


def _arrow_record(dlp: DLPLoRA, arrow: ArrowRouting) -> dict:
    """What a row answered under Arrow stores of its setting (adapters by name), so a rerun with another
    setting does not read it back."""
    names = dlp.adapter_names
    return {
        "experts": [names[i] for i in arrow.experts],
        "general": [names[i] for i in arrow.general],
        "top_k": arrow.top_k,
        "temperature": arrow.temperature,
        "seed": arrow.seed,
    }


def _key(plan: Plan, b: int) -> tuple:
    """Routing key of example b: its mixture's, or Arrow's setting (every example under it alike)."""
    routing = _routing_of(plan, b)
    return (("arrow", routing),) if isinstance(routing, ArrowRouting) else routing_key(routing)


def _score(task: Task, examples: Sequence[Example], rows: list[dict]) -> dict:
    """Means of every metric, plus the per-example headline scores under HEADLINE_SCORES."""
    scores: dict = score_task(
        task.metric,
        [r["parsed"] for r in rows],
        [list(ex.references) for ex in examples],
        [r["text"] for r in rows],
        [ex.answer for ex in examples],
    )
    loglik = task.kind == "mcq" and bool(rows) and rows[0]["option_logprobs"] is not None
    picked = [r["parsed"] for r in rows]
    if loglik:
        per = mcq_scores([r["option_logprobs"] for r in rows], examples)
        scores.update({k: sum(v) / len(v) for k, v in per.metrics.items()})
        scores[HEADLINE_SCORES] = per.headline
        picked = per.chosen
    else:
        scores[HEADLINE_SCORES] = [generated_score(task, r["parsed"], ex.references) for ex, r in zip(examples, rows)]
    # The collapse check: the share of the most frequent answer (the option the headline picks, else the
    # parsed answer), beside the same share of the gold answers.
    scores["top_answer_share"] = majority_share(picked)
    scores["gold_top_share"] = majority_share(
        [ex.gold_index if task.kind == "mcq" else ex.references[0] for ex in examples]
    )
    auc = option_auc([r["option_logprobs"] for r in rows], examples) if loglik else None
    if auc is not None:
        scores["option_auc"] = {"estimate": auc.estimate, "low": auc.low, "high": auc.high}
    # Adapters a row's tokens use: its mixture's, or under Arrow the top_k each token is routed to (the
    # composite and out-of-pool tables count Arrow the same way).
    ks = [r["arrow"]["top_k"] if "arrow" in r else len(r["adapters"]) for r in rows]
    scores["mean_k"] = sum(ks) / max(len(rows), 1)
    scores["fused_fraction"] = sum(k > 1 for k in ks) / max(len(rows), 1)
    return scores


def evaluate_task(
    dlp: DLPLoRA,
    task: Task | str,
    out_dir: Path,
    cfg: EvalConfig,
    split_cfg: SplitConfig,
    data_dir: str | Path | None = None,
    progress: bool = True,
    arrow: ArrowConfig | None = None,
) -> dict[str, dict]:
    """All methods on one task: method -> metric means and HEADLINE_SCORES (per example); per-example
    predictions go to out_dir/predictions/<method>/<task>.jsonl.

    A (method, task) whose prediction file is complete and was made with the same mixtures is read back
    instead of rerun (resume); rows read or run under one method answer the rows of any other method that
    gives an example the same mixture (`oracle` is `base` on a task the base model serves).
    """
    task = get_task(task)
    task_name = task.name
    examples = load_splits(task, data_dir, split_cfg).test[: cfg.limit]
    if task_name not in dlp.task_names:
        raise ValueError(f"task {task_name!r} is not a router class of these assets: {dlp.task_names}")
    probs = dlp.router.predict_proba([ex.prompt for ex in examples])
    truth = torch.full((len(examples),), dlp.task_names.index(task_name), dtype=torch.long)
    plans = {m: method_dense(dlp, m, probs, truth, arrow) for m in cfg.all_methods}
    path = {m: out_dir / "predictions" / m / f"{task_name}.jsonl" for m in cfg.all_methods}
    done = {m: _read_complete(path[m], examples, _identities(dlp, plans[m], len(examples))) for m in cfg.all_methods}
    cache = {
        (ex.uid, _key(plans[m], b)): r
        for m, rows in done.items()
        if rows is not None
        for b, (ex, r) in enumerate(zip(examples, rows))
    }
    results = {}
    for method in tqdm(cfg.all_methods, desc=task_name, disable=not progress, leave=False):
        rows = done[method]
        if rows is None:
            rows = _run_rows(dlp, task, examples, plans[method], cfg, cache)
            _write_rows(path[method], examples, rows)
        results[method] = _score(task, examples, rows)
    return results


def _identities(dlp: DLPLoRA, plan: Plan, n: int) -> list[dict]:
    """What each example's stored row must hold to be read back: its mixture (adapters, weights), or under
    Arrow (per token: no mixture) the Arrow setting."""
    out = []
    for b in range(n):
        routing = _routing_of(plan, b)
        if isinstance(routing, ArrowRouting):
            out.append({"adapters": [], "weights": [], "arrow": _arrow_record(dlp, routing)})
        else:
            adapters, weights = dlp.mixture(routing)
            out.append({"adapters": list(adapters), "weights": list(weights)})
    return out


def method_dense(
    dlp: DLPLoRA, method: str, probs: torch.Tensor, truth: torch.Tensor, arrow: ArrowConfig | None = None
) -> Plan:
    """(B, bank width) weights: a baseline adapter alone when `method` names one, else the method's routing
    over the router's classes mapped to the bank (classes the base model serves drop their weight); for
    `arrow` / `arrow-gks`, the Arrow routing of `arrow` (default: the pipeline's) without / with its general
    adapters, the same for every example; for `dlp+arrow`, a `Hybrid` of `dlp` and `arrow`."""
    if method in (ARROW, ARROW_GKS):
        return dlp.arrow_routing(arrow_setting(dlp, method, arrow))
    if method == DLP_ARROW:
        dense = method_dense(dlp, "dlp", probs, truth)
        # Arrow where `dlp` gives the prompt no adapter and its top class is in the pool (not `none`).
        none = dlp.task_names.index(NONE) if NONE in dlp.task_names else -1
        left = (dense.sum(1) == 0) & (probs.argmax(1) != none)
        return Hybrid(dense, dlp.arrow_routing(arrow_setting(dlp, method, arrow)), left)
    if method in dlp.baselines:
        dense = torch.zeros(len(probs), len(dlp.adapter_names))
        dense[:, dlp.adapter_names.index(method)] = 1.0
        return dense
    return dlp.to_bank(method_weights(method, probs, truth, dlp.selection, dlp.no_adapter))


def arrow_setting(dlp: DLPLoRA, method: str, arrow: ArrowConfig | None = None) -> ArrowConfig:
    """The Arrow setting the `arrow` and `dlp+arrow` (no general adapters) or `arrow-gks` (its general
    adapters, at least one) methods run with: `arrow`, else the pipeline's."""
    arrow = arrow or dlp.arrow
    if arrow is None:
        raise ValueError(f"the {method} method routes with Arrow: pass arrow=ArrowConfig(...) (--arrow-* flags)")
    if method == ARROW_GKS and not arrow.general:
        raise ValueError(
            f"the {ARROW_GKS} method subtracts general adapters (GenKnowSub): name one with --arrow-general NAME "
            f"(ArrowConfig.general); loaded adapters: {dlp.adapter_names}"
        )
    return arrow if method == ARROW_GKS else replace(arrow, general=())  # arrow, dlp+arrow: no GenKnowSub


def _read_complete(path: Path, examples: Sequence[Example], identities: list[dict]) -> list[dict] | None:
    """The rows of a finished run with these examples, each holding its `_identities` entry, else None."""
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if [r.get("uid") for r in rows] != [ex.uid for ex in examples] or any(
        any(r.get(k) != v for k, v in want.items()) for r, want in zip(rows, identities)
    ):
        return None  # partial, or from other settings (router, p, gate, Arrow): rerun
    return rows


def _write_rows(path: Path, examples: Sequence[Example], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for ex, r in zip(examples, rows):
            fh.write(json.dumps({"uid": ex.uid, "gold": list(ex.references), **r}) + "\n")
    tmp.replace(path)  # a file exists only once complete, which is what makes resuming safe


def config_record(cfg: EvalConfig, split_cfg: SplitConfig) -> dict:
    return {"eval": asdict(cfg), "splits": asdict(split_cfg)}
