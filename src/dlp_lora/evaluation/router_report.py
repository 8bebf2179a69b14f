"""How well a trained router routes: accuracy, top-p recall vs adapters kept, confusion, latency.

Writes ``report.json``, ``report.md`` and two PNGs (confusion heat map, p sweep) into one folder.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..config import SelectionConfig
from ..router import Router, select_with

__all__ = ["router_report", "comparison_markdown", "kept_stats", "confusion_matrix", "latency_per_prompt"]


def kept_stats(probs: torch.Tensor, truth: torch.Tensor, cfg: SelectionConfig) -> dict:
    """Recall (true task kept), mean kept count and its histogram, for probs (B, N) and truth (B,)."""
    routing = select_with(probs, cfg)
    kept = routing.weights > 0  # padding slots (and zero-probability top-k slots) are not "kept"
    hit = ((routing.indices == truth.unsqueeze(1)) & kept).any(dim=1)
    counts = kept.sum(dim=1)
    hist = Counter(int(k) for k in counts)
    return {"recall": float(hit.float().mean()), "mean_k": float(counts.float().mean()),
            "k_histogram": {str(k): hist[k] for k in sorted(hist)}}


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


def _per_task(truth: torch.Tensor, pred: torch.Tensor, names: Sequence[str]) -> dict[str, dict]:
    out = {}
    for i, name in enumerate(names):
        rows = truth == i
        support = int(rows.sum())
        acc = float((pred[rows] == i).float().mean()) if support else None
        out[name] = {"support": support, "accuracy": acc}
    return out


def _group_ids(names: Sequence[str], same_task: Sequence[Sequence[str]]) -> torch.Tensor:
    """(N,) group id per task: tasks listed together share the id of the first, others keep their own."""
    ids = torch.arange(len(names))
    for grp in same_task:
        unknown = [t for t in grp if t not in names]
        if unknown:
            raise ValueError(f"same_task names {unknown} are not among the router's tasks {list(names)}")
        first = names.index(grp[0])
        for t in grp:
            ids[names.index(t)] = first
    return ids


def _truth_ids(labels: Sequence[str], names: Sequence[str], num_texts: int) -> torch.Tensor:
    if len(labels) != num_texts:
        raise ValueError(f"got {num_texts} texts but {len(labels)} labels")
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise ValueError(f"labels {unknown} are not among the router's tasks {list(names)}")
    return torch.tensor([index[lab] for lab in labels], dtype=torch.long)


def router_report(
    router: Router,
    texts: Sequence[str],
    labels: list[str],
    out_dir: str | os.PathLike,
    p_values: Sequence[float] = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
    selection: SelectionConfig = SelectionConfig(),
    same_task: Sequence[Sequence[str]] = (),
) -> dict:
    """Evaluate router on labelled prompts and write report.json / report.md / PNGs into out_dir.

    same_task: groups of tasks that text cannot tell apart (e.g. ARC-Easy and ARC-Challenge draw the
    same kind of question); `top1_accuracy_grouped` counts a prediction inside the true task's group as right.
    """
    names = router.task_names
    truth = _truth_ids(labels, names, len(texts))
    probs = router.predict_proba(texts)
    pred = probs.argmax(dim=1)
    group = _group_ids(names, same_task)
    report = {
        "num_prompts": len(texts),
        "task_names": list(names),
        "kind": router.cfg.kind,
        "params_total": router.num_parameters(),
        "params_trainable": router.num_parameters(trainable_only=True),
        "top1_accuracy": float((pred == truth).float().mean()),
        "same_task_groups": [list(g) for g in same_task],
        "top1_accuracy_grouped": float((group[pred] == group[truth]).float().mean()),
        "selection": {"strategy": selection.strategy, "p": selection.p, "k": selection.k,
                      "threshold": selection.threshold, "max_k": selection.max_k, "weighting": selection.weighting,
                      **kept_stats(probs, truth, selection)},
        "p_sweep": [{"p": p, **kept_stats(probs, truth, replace(selection, strategy="top_p", p=p))} for p in p_values],
        "per_task": _per_task(truth, pred, names),
        "confusion": confusion_matrix(truth, pred, len(names)),
        "latency_ms_per_prompt": {f"batch_{b}": 1000 * latency_per_prompt(router, texts, b) for b in (1, 32)},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    _plot_confusion(report, out / "confusion.png")
    _plot_sweep(report, out / "p_sweep.png")
    return report


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _markdown(rep: dict) -> str:
    sel, lat = rep["selection"], rep["latency_ms_per_prompt"]
    parts = [
        f"# Router report ({rep['kind']}, {len(rep['task_names'])} tasks, {rep['num_prompts']} prompts)\n",
        _table(["metric", "value"], [
            ["top-1 accuracy", f"{rep['top1_accuracy']:.4f}"],
            ["top-1 accuracy, indistinguishable tasks merged "
             f"({'; '.join(' = '.join(g) for g in rep['same_task_groups']) or 'none'})",
             f"{rep['top1_accuracy_grouped']:.4f}"],
            [f"{sel['strategy']} recall (p={sel['p']})", f"{sel['recall']:.4f}"],
            ["mean adapters kept", f"{sel['mean_k']:.3f}"],
            ["parameters (total / trainable)", f"{rep['params_total']:,} / {rep['params_trainable']:,}"],
            ["latency ms/prompt, batch 1", f"{lat['batch_1']:.3f}"],
            ["latency ms/prompt, batch 32", f"{lat['batch_32']:.3f}"],
        ]),
        "## Adapters kept per prompt\n",
        _table(["k", "prompts"], list(sel["k_histogram"].items())),
        "## Top-p sweep\n",
        _table(["p", "recall", "mean k"],
               [[s["p"], f"{s['recall']:.4f}", f"{s['mean_k']:.3f}"] for s in rep["p_sweep"]]),
        "## Per task\n",
        _table(["task", "support", "accuracy"],
               [[t, v["support"], "-" if v["accuracy"] is None else f"{v['accuracy']:.4f}"]
                for t, v in rep["per_task"].items()]),
        "## Confusion (rows: true task, columns: predicted)\n",
        _table(["true / predicted", *rep["task_names"]],
               [[t, *row] for t, row in zip(rep["task_names"], rep["confusion"])]),
    ]
    return "\n".join(parts)


def comparison_markdown(reports: Sequence[tuple[str, dict]]) -> str:
    """Routers evaluated on the same prompts, side by side: (label, report) pairs -> a markdown section."""
    rows = []
    for label, rep in reports:
        sel, lat = rep["selection"], rep["latency_ms_per_prompt"]
        rows.append([label, rep["kind"], f"{rep['params_total']:,}", f"{rep['params_trainable']:,}",
                     f"{rep['top1_accuracy']:.4f}", f"{rep['top1_accuracy_grouped']:.4f}",
                     f"{sel['recall']:.4f}", f"{sel['mean_k']:.3f}", f"{lat['batch_1']:.2f}", f"{lat['batch_32']:.3f}"])
    return "## Router comparison (same prompts)\n\n" + _table(
        ["router", "kind", "params", "trainable", "top-1", "top-1 grouped", f"recall (p={reports[0][1]['selection']['p']})",
         "mean k", "ms/prompt b1", "ms/prompt b32"], rows)


def _plot_confusion(rep: dict, path: Path) -> None:
    # Figure without pyplot: no global backend or figure registry is touched (Agg canvas by default).
    names, n = rep["task_names"], len(rep["task_names"])
    size = max(4.0, 0.35 * n + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(rep["confusion"], cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(n), labels=names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels=names, fontsize=8)
    if n <= 15:  # counts stay legible only on small matrices
        for (row, col), count in _cells(rep["confusion"]):
            ax.text(col, row, str(count), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted task")
    ax.set_ylabel("true task")
    ax.set_title(f"Router confusion (top-1 accuracy {rep['top1_accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cells(matrix: list[list[int]]) -> list[tuple[tuple[int, int], int]]:
    return [((r, c), v) for r, row in enumerate(matrix) for c, v in enumerate(row) if v]


def _point_labels(sweep: list[dict]) -> list[tuple[tuple[float, float], str]]:
    """One label per distinct (mean k, recall) point, naming every p that lands on it."""
    groups: dict[tuple[float, float], list[str]] = {}
    for s in sweep:
        groups.setdefault((s["mean_k"], s["recall"]), []).append(str(s["p"]))
    return [(xy, "p=" + ", ".join(ps)) for xy, ps in groups.items()]


def _plot_sweep(rep: dict, path: Path) -> None:
    sweep = rep["p_sweep"]
    fig = Figure(figsize=(5, 4))
    ax = fig.add_subplot()
    ax.plot([s["mean_k"] for s in sweep], [s["recall"] for s in sweep], marker="o")
    for i, (xy, label) in enumerate(_point_labels(sweep)):
        # Neighbouring points often sit close together: alternate labels below and above.
        ax.annotate(label, xy, textcoords="offset points", xytext=(4, -12 if i % 2 == 0 else 6), fontsize=8)
    ax.set_xlabel("mean adapters kept per prompt")
    ax.set_ylabel("recall (true task kept)")
    ax.set_title("Top-p sweep")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
