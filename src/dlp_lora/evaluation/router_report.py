"""How well a trained router routes: accuracy per rendering, top-p recall vs adapters kept, calibration,
the `none` class (base model alone), confusion, latency.

Writes ``report.json``, ``report.md`` and PNGs (confusion, p sweep, reliability before/after calibration)
into one folder. Recall and adapters kept are counted on the adapters a prompt really gets: a class with
no adapter (`none`) is never "kept", and a prompt whose top-1 is `none` keeps nothing (base model).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..config import SelectionConfig
from ..router import Router, select_with
from ..router.calibration import expected_calibration_error, reliability_bins
from .router_plots import plot_confusion, plot_reliability, plot_sweep

__all__ = [
    "router_report",
    "comparison_markdown",
    "kept_stats",
    "confusion_matrix",
    "latency_per_prompt",
    "choose_p",
    "P_GRID",
    "NONE",
]

NONE = "none"  # the router class with no adapter (tasks.out_of_pool.NONE; evaluation does not import tasks)
P_GRID = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
TARGETS = {
    "top1_distinguishable": 0.985,
    "recall": 0.995,
    "mean_k": 1.5,
    "ece": 0.03,
    "none_out_of_pool": 0.95,
    "none_in_pool": 0.01,
    "latency_b32_ms": 1.0,
    "latency_b1_ms": 3.0,
}


def kept_stats(probs: torch.Tensor, truth: torch.Tensor, cfg: SelectionConfig, no_adapter: Sequence[int] = ()) -> dict:
    """Recall (true task kept with weight > 0), mean kept count and its histogram, for probs (B, N), truth (B,)."""
    if probs.shape[0] == 0:
        return {"recall": None, "mean_k": None, "k_histogram": {}}
    routing = select_with(probs, cfg, no_adapter)
    kept = routing.weights > 0  # padding slots, zero-probability slots and no-adapter classes are not "kept"
    hit = ((routing.indices == truth.unsqueeze(1)) & kept).any(dim=1)
    counts = kept.sum(dim=1)
    hist = Counter(int(k) for k in counts)
    return {
        "recall": float(hit.float().mean()),
        "mean_k": float(counts.float().mean()),
        "k_histogram": {str(k): hist[k] for k in sorted(hist)},
    }


def choose_p(
    probs: torch.Tensor,
    truth: torch.Tensor,
    no_adapter: Sequence[int] = (),
    target_recall: float = 0.995,
    max_mean_k: float = 1.5,
    grid: Sequence[float] = P_GRID,
) -> tuple[float, list[dict]]:
    """The default top-p from a recall / mean-k curve: the smallest p of `grid` reaching target_recall
    within max_mean_k adapters per prompt, else the p with the best recall within max_mean_k (else the
    smallest p). Returns (p, curve) with curve = [{p, recall, mean_k}]."""
    curve = []
    for p in grid:
        stats = kept_stats(probs, truth, SelectionConfig(strategy="top_p", p=p), no_adapter)
        curve.append({"p": p, "recall": stats["recall"], "mean_k": stats["mean_k"]})
    within = [c for c in curve if c["mean_k"] <= max_mean_k] or curve[:1]
    good = [c for c in within if c["recall"] >= target_recall]
    best = good[0] if good else max(within, key=lambda c: (c["recall"], -c["p"]))
    return best["p"], curve


def confusion_matrix(truth: torch.Tensor, pred: torch.Tensor, num: int) -> list[list[int]]:
    """Counts [true][predicted] (N, N) for truth and pred (B,)."""
    mat = torch.zeros(num, num, dtype=torch.long)
    mat.index_put_((truth, pred), torch.ones_like(truth), accumulate=True)
    return mat.tolist()


def latency_per_prompt(router: Router, texts: Sequence[str], batch: int, repeats: int = 5) -> float:
    """Median seconds per prompt of predict_proba (tokenisation included) on batches of `batch` prompts."""
    chunk = [texts[i % len(texts)] for i in range(batch)]
    router.predict_proba(chunk)  # warm-up: first call pays one-off allocation costs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        router.predict_proba(chunk, batch_size=batch)
        times.append((time.perf_counter() - start) / batch)
    return statistics.median(times)


def _group_ids(names: Sequence[str], same_task: Sequence[Sequence[str]]) -> torch.Tensor:
    """(N,) group id per class: tasks listed together share the id of the first, others keep their own."""
    ids = torch.arange(len(names))
    for grp in same_task:
        unknown = [t for t in grp if t not in names]
        if unknown:
            raise ValueError(f"same_task names {unknown} are not among the router's tasks {list(names)}")
        for t in grp:
            ids[names.index(t)] = names.index(grp[0])
    return ids


def _truth_ids(labels: Sequence[str], names: Sequence[str], num_texts: int) -> torch.Tensor:
    if len(labels) != num_texts:
        raise ValueError(f"got {num_texts} texts but {len(labels)} labels")
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not among the router's tasks {list(names)}")
    return torch.tensor([index[lab] for lab in labels], dtype=torch.long)


def _acc(pred: torch.Tensor, truth: torch.Tensor, rows: torch.Tensor) -> float | None:
    return float((pred[rows] == truth[rows]).float().mean()) if bool(rows.any()) else None


def _routing_stats(probs, truth, pred, rows, group, distinct, selection, no_adapter) -> dict:
    """Top-1 (all / distinguishable tasks / groups merged), selection recall and mean k over `rows`."""
    sel = kept_stats(probs[rows], truth[rows], selection, no_adapter)
    return {
        "prompts": int(rows.sum()),
        "top1": _acc(pred, truth, rows),
        "top1_distinguishable": _acc(pred, truth, rows & distinct[truth]),
        "top1_grouped": _acc(group[pred], group[truth], rows),
        "recall": sel["recall"],
        "mean_k": sel["mean_k"],
    }


def _none_stats(
    pred: torch.Tensor, truth: torch.Tensor, none: int | None, sources: Sequence[str], unseen: Sequence[str]
) -> dict | None:
    """Rates of prompts sent to the base model (top-1 `none`): out-of-pool (by source) and in-pool."""
    if none is None:
        return None
    base = pred == none
    out, inp = truth == none, truth != none
    src = list(sources)
    per_source = {
        s: float(base[[i for i, x in enumerate(src) if x == s]].float().mean())
        for s in sorted(set(src[i] for i in range(len(src)) if out[i]))
    }
    unseen_rows = torch.tensor([x in unseen for x in src]) & out
    return {
        "out_of_pool_prompts": int(out.sum()),
        "out_of_pool_to_base": _acc(pred, truth, out),
        "out_of_pool_seen_sources_to_base": _acc(pred, truth, out & ~unseen_rows),
        "out_of_pool_unseen_sources_to_base": _acc(pred, truth, unseen_rows),
        "in_pool_prompts": int(inp.sum()),
        "in_pool_to_base": float(base[inp].float().mean()) if inp.any() else None,
        "per_source_to_base": per_source,
        "unseen_sources": sorted(unseen),
    }


def served_stats(
    probs: torch.Tensor, truth: torch.Tensor, cfg: SelectionConfig, no_adapter: Sequence[int], names: Sequence[str]
) -> dict:
    """What prompts get once classes without an adapter serve the base model: a prompt is served right when
    its adapters are exactly its true class's (that adapter alone, or none at all for a class without one).

    Top-1 counts the most probable class's server; `selection` the adapters kept under cfg, as serving
    keeps them. Rates over in-pool prompts (truth not `none`), by whether the true class has an adapter,
    per class, and for out-of-pool prompts (truth `none`): the base model alone.
    """
    routing = select_with(probs, cfg, no_adapter)
    kept = routing.weights > 0
    has = torch.ones(len(names), dtype=torch.bool)
    has[list(no_adapter)] = False
    served_by = torch.where(has, torch.arange(len(names)), -1)  # class -> its adapter, -1 the base model
    top1 = served_by[probs.argmax(1)] == served_by[truth]
    alone = ~kept.any(1)
    kept_true = ((routing.indices == truth[:, None]) & kept).any(1)
    only_true = kept_true & (kept.sum(1) == 1)
    right = torch.where(has[truth], only_true, alone)
    rate = lambda x, rows: float(x[rows].float().mean()) if bool(rows.any()) else None  # noqa: E731
    in_pool = truth != names.index(NONE) if NONE in names else torch.ones_like(truth, dtype=torch.bool)
    return {
        "top1": rate(top1, in_pool),
        "selection": rate(right, in_pool),
        "adapter_tasks_keep_only_their_adapter": rate(right, in_pool & has[truth]),
        "adapter_tasks_keep_their_adapter": rate(kept_true, in_pool & has[truth]),
        "base_tasks_base_alone": rate(alone, in_pool & ~has[truth]),
        "out_of_pool_base_alone": rate(alone, ~in_pool),
        "per_class": {n: rate(right, truth == i) for i, n in enumerate(names)},
        "classes_without_adapter": [names[i] for i in no_adapter],
    }


def router_report(
    router: Router,
    texts: Sequence[str],
    labels: list[str],
    out_dir: str | os.PathLike,
    p_values: Sequence[float] = P_GRID,
    selection: SelectionConfig = SelectionConfig(),
    same_task: Sequence[Sequence[str]] = (),
    renderings: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    held_out: Sequence[str] = (),
    unseen_sources: Sequence[str] = (),
    command: str = "",
    latency: bool = True,
    base_served: Sequence[str] = (),
) -> dict:
    """Evaluate router on labelled prompts and write report.json / report.md / PNGs into out_dir.

    renderings: the rendering name of each prompt (a per-rendering table; `held_out` names the renderings
    training never saw); sources: each prompt's source id (per-source `none` rates; `unseen_sources` were
    never trained on). same_task: groups of tasks that text cannot tell apart (ARC-Easy and ARC-Challenge):
    `top1_grouped` counts a prediction inside the true task's group as right, and `top1_distinguishable`
    leaves their prompts out. Labels `none` (when the router has that class) are out-of-pool prompts:
    they are scored by the rate sent to the base model, not by recall. base_served: the classes whose
    task the dev gate left to the base model; with them the report adds what prompts are served ("served").
    """
    names = list(router.task_names)
    truth = _truth_ids(labels, names, len(texts))
    renderings = list(renderings) if renderings is not None else ["given"] * len(texts)
    sources = list(sources) if sources is not None else list(labels)
    none = names.index(NONE) if NONE in names else None
    no_adapter = [none] if none is not None else []
    logits = router.predict_logits(texts)
    probs, raw = (logits / router.cfg.temperature).softmax(-1), logits.softmax(-1)
    pred = probs.argmax(dim=1)
    group = _group_ids(names, same_task)
    distinct = torch.tensor([not any(n in g for g in same_task) and n != NONE for n in names])
    in_pool = truth != none if none is not None else torch.ones(len(texts), dtype=torch.bool)
    stats = lambda rows: _routing_stats(probs, truth, pred, rows, group, distinct, selection, no_adapter)  # noqa: E731
    per_rendering = {
        r: {"held_out": r in held_out, **stats(in_pool & torch.tensor([x == r for x in renderings]))}
        for r in dict.fromkeys(renderings)
    }
    before, after = reliability_bins(raw, truth), reliability_bins(probs, truth)
    # Calibration is fitted on dev prompts in training formats; held-out formats are a distribution shift.
    held = torch.tensor([r in held_out for r in renderings])
    ece_part = lambda rows: expected_calibration_error(probs[rows], truth[rows]) if bool(rows.any()) else None  # noqa: E731
    report = {
        "command": command,
        "num_prompts": len(texts),
        "task_names": names,
        "kind": router.cfg.kind,
        "params_total": router.num_parameters(),
        "params_trainable": router.num_parameters(trainable_only=True),
        "same_task_groups": [list(g) for g in same_task],
        "held_out_renderings": list(held_out),
        "overall": stats(in_pool),
        "per_rendering": per_rendering,
        "worst_rendering_top1_distinguishable": min(
            (v["top1_distinguishable"] for v in per_rendering.values() if v["top1_distinguishable"] is not None),
            default=None,
        ),
        "selection": {**asdict(selection), **kept_stats(probs[in_pool], truth[in_pool], selection, no_adapter)},
        "p_sweep": [
            {
                "p": p,
                **kept_stats(probs[in_pool], truth[in_pool], replace(selection, strategy="top_p", p=p), no_adapter),
            }
            for p in p_values
        ],
        "calibration": {
            "temperature": router.cfg.temperature,
            "ece_before": expected_calibration_error(raw, truth),
            "ece_after": expected_calibration_error(probs, truth),
            "ece_after_training_renderings": ece_part(~held),
            "ece_after_held_out_renderings": ece_part(held),
            "bins_before": before,
            "bins_after": after,
        },
        "none": _none_stats(pred, truth, none, sources, unseen_sources),
        "served": served_stats(
            probs, truth, selection, sorted({names.index(c) for c in base_served} | set(no_adapter)), names
        )
        if base_served
        else None,
        "per_task": {
            n: {"support": int((truth == i).sum()), "accuracy": _acc(pred, truth, truth == i)}
            for i, n in enumerate(names)
        },
        "confusion": confusion_matrix(truth, pred, len(names)),
        "latency_ms_per_prompt": (
            {f"batch_{b}": 1000 * latency_per_prompt(router, texts, b) for b in (1, 32)} if latency else None
        ),
    }
    report["top1_accuracy"], report["top1_accuracy_grouped"] = (
        report["overall"]["top1"],
        report["overall"]["top1_grouped"],
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    plot_confusion(
        report["confusion"],
        names,
        names,
        f"Router confusion (top-1 {report['top1_accuracy']:.3f})",
        out / "confusion.png",
    )
    plot_sweep(report["p_sweep"], selection.p, out / "p_sweep.png")
    plot_reliability(
        before,
        after,
        (report["calibration"]["ece_before"], report["calibration"]["ece_after"]),
        out / "reliability.png",
    )
    return report


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _targets(rep: dict) -> list[list[str]]:
    """One row per target of issue 11: the measured value and whether it is met."""
    cal, none, lat = rep["calibration"], rep["none"] or {}, rep["latency_ms_per_prompt"] or {}
    rows = [
        (
            "top-1, distinguishable tasks, worst rendering",
            rep["worst_rendering_top1_distinguishable"],
            ">= 0.985",
            lambda v: v >= TARGETS["top1_distinguishable"],
        ),
        (
            f"top-p recall at p={rep['selection']['p']}",
            rep["selection"]["recall"],
            ">= 0.995",
            lambda v: v >= TARGETS["recall"],
        ),
        ("mean adapters kept at that p", rep["selection"]["mean_k"], "<= 1.5", lambda v: v <= TARGETS["mean_k"]),
        ("ECE after calibration", cal["ece_after"], "<= 0.03", lambda v: v <= TARGETS["ece"]),
        (
            "out-of-pool prompts to the base model",
            none.get("out_of_pool_to_base"),
            ">= 0.95",
            lambda v: v >= TARGETS["none_out_of_pool"],
        ),
        (
            "in-pool prompts to the base model",
            none.get("in_pool_to_base"),
            "<= 0.01",
            lambda v: v <= TARGETS["none_in_pool"],
        ),
        ("latency ms/prompt, batch 32", lat.get("batch_32"), "<= 1", lambda v: v <= TARGETS["latency_b32_ms"]),
        ("latency ms/prompt, batch 1", lat.get("batch_1"), "<= 3", lambda v: v <= TARGETS["latency_b1_ms"]),
    ]
    return [[name, _f(v), goal, "-" if v is None else ("met" if ok(v) else "**missed**")] for name, v, goal, ok in rows]


def _markdown(rep: dict) -> str:
    ov, sel, cal = rep["overall"], rep["selection"], rep["calibration"]
    groups = "; ".join(" = ".join(g) for g in rep["same_task_groups"]) or "none"
    parts = [
        f"# Router report ({rep['kind']}, {len(rep['task_names'])} classes, {rep['num_prompts']} prompts)\n",
        *([f"Produced by `{rep['command']}`.\n"] if rep["command"] else []),
        "## Targets (issue 11)\n",
        _table(["target", "measured", "goal", ""], _targets(rep)),
        "## Overall (in-pool prompts, every rendering)\n",
        _table(
            ["metric", "value"],
            [
                ["top-1 accuracy", _f(ov["top1"])],
                [f"top-1, text-distinguishable tasks (all but {groups})", _f(ov["top1_distinguishable"])],
                [f"top-1, indistinguishable tasks merged ({groups})", _f(ov["top1_grouped"])],
                [f"{sel['strategy']} recall (p={sel['p']})", _f(sel["recall"])],
                ["mean adapters kept", _f(sel["mean_k"], 3)],
                ["parameters (total / trainable)", f"{rep['params_total']:,} / {rep['params_trainable']:,}"],
            ],
        ),
        "## Per rendering (held-out = a format training never saw)\n",
        _table(
            [
                "rendering",
                "held-out",
                "prompts",
                "top-1",
                "top-1 distinguishable",
                "top-1 grouped",
                f"recall (p={sel['p']})",
                "mean k",
            ],
            [
                [
                    r,
                    "yes" if v["held_out"] else "",
                    v["prompts"],
                    _f(v["top1"]),
                    _f(v["top1_distinguishable"]),
                    _f(v["top1_grouped"]),
                    _f(v["recall"]),
                    _f(v["mean_k"], 3),
                ]
                for r, v in rep["per_rendering"].items()
            ],
        ),
        "## Calibration\n",
        f"Temperature {cal['temperature']:.4f} (fitted on dev). Expected calibration error (15 bins, top-1 "
        f"confidence, every test prompt): {cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after; after, "
        f"{_f(cal['ece_after_training_renderings'])} on the training renderings and "
        f"{_f(cal['ece_after_held_out_renderings'])} on the held-out ones. "
        "Reliability diagrams: [reliability.png](reliability.png).\n",
    ]
    if rep["none"]:
        nn = rep["none"]
        parts += [
            "## None of the above (base model alone)\n",
            _table(
                ["prompts", "count", "sent to the base model"],
                [
                    ["out-of-pool, all", nn["out_of_pool_prompts"], _f(nn["out_of_pool_to_base"])],
                    [
                        "out-of-pool, sources seen in training (new prompts)",
                        "",
                        _f(nn["out_of_pool_seen_sources_to_base"]),
                    ],
                    [
                        f"out-of-pool, sources never trained on ({', '.join(nn['unseen_sources']) or '-'})",
                        "",
                        _f(nn["out_of_pool_unseen_sources_to_base"]),
                    ],
                    ["in-pool (wrongly)", nn["in_pool_prompts"], _f(nn["in_pool_to_base"])],
                ],
            ),
            _table(
                ["out-of-pool source", "sent to the base model"],
                [[s, _f(v)] for s, v in nn["per_source_to_base"].items()],
            ),
        ]
    if rep.get("served"):
        sv = rep["served"]
        parts += [
            "## What prompts are served (classes without an adapter serve the base model)\n",
            f"Classes without an adapter: {', '.join(sv['classes_without_adapter'])}. A prompt is served right "
            "when it gets exactly its true class's adapter, or no adapter at all when its class has none; "
            "confusing two classes that both serve the base model costs nothing.\n",
            _table(
                ["prompts", "served right"],
                [
                    ["in-pool, top-1 class's server", _f(sv["top1"])],
                    [f"in-pool, selection (p={rep['selection']['p']})", _f(sv["selection"])],
                    ["tasks with an adapter: that adapter alone", _f(sv["adapter_tasks_keep_only_their_adapter"])],
                    [
                        "tasks with an adapter: that adapter kept (maybe with others)",
                        _f(sv["adapter_tasks_keep_their_adapter"]),
                    ],
                    ["tasks without an adapter: base model alone", _f(sv["base_tasks_base_alone"])],
                    ["out-of-pool: base model alone", _f(sv["out_of_pool_base_alone"])],
                ],
            ),
            _table(["class", "served right (selection)"], [[c, _f(v)] for c, v in sv["per_class"].items()]),
        ]
    parts += [
        "## Top-p sweep (calibrated, in-pool prompts)\n",
        _table(["p", "recall", "mean k"], [[s["p"], _f(s["recall"]), _f(s["mean_k"], 3)] for s in rep["p_sweep"]]),
        "## Adapters kept per prompt\n",
        _table(["k", "prompts"], list(sel["k_histogram"].items())),
    ]
    if rep["latency_ms_per_prompt"]:
        lat = rep["latency_ms_per_prompt"]
        parts += [
            "## Latency (predict_proba, tokenisation included)\n",
            _table(["batch", "ms/prompt"], [[1, f"{lat['batch_1']:.3f}"], [32, f"{lat['batch_32']:.3f}"]]),
        ]
    parts += [
        "## Per task (every rendering)\n",
        _table(
            ["task", "support", "accuracy"], [[t, v["support"], _f(v["accuracy"])] for t, v in rep["per_task"].items()]
        ),
        "## Confusion (rows: true task, columns: predicted)\n",
        _table(
            ["true / predicted", *rep["task_names"]], [[t, *row] for t, row in zip(rep["task_names"], rep["confusion"])]
        ),
    ]
    return "\n".join(parts)


def comparison_markdown(reports: Sequence[tuple[str, dict]]) -> str:
    """Routers evaluated on the same prompts, side by side: (label, report) pairs -> a markdown section."""
    rows = []
    for label, rep in reports:
        sel, lat = rep["selection"], rep["latency_ms_per_prompt"] or {"batch_1": float("nan"), "batch_32": float("nan")}
        rows.append(
            [
                label,
                rep["kind"],
                f"{rep['params_total']:,}",
                f"{rep['params_trainable']:,}",
                _f(rep["top1_accuracy"]),
                _f(rep["top1_accuracy_grouped"]),
                _f(sel["recall"]),
                _f(sel["mean_k"], 3),
                f"{lat['batch_1']:.2f}",
                f"{lat['batch_32']:.3f}",
            ]
        )
    return "## Router comparison (same prompts)\n\n" + _table(
        [
            "router",
            "kind",
            "params",
            "trainable",
            "top-1",
            "top-1 grouped",
            f"recall (p={reports[0][1]['selection']['p']})",
            "mean k",
            "ms/prompt b1",
            "ms/prompt b32",
        ],
        rows,
    )
