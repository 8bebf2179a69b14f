"""PNG figures of a router report: confusion heat map, top-p sweep, reliability diagrams.

Figures are built without pyplot, so no global backend or figure registry is touched (Agg canvas).
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

__all__ = ["plot_confusion", "plot_sweep", "plot_reliability"]


def plot_confusion(matrix: list[list[int]], rows: list[str], cols: list[str], title: str, path: Path) -> None:
    """Heat map of counts [row][col]."""
    size = max(4.0, 0.35 * max(len(rows), len(cols)) + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(cols)), labels=cols, rotation=90, fontsize=8)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    if len(cols) <= 15:  # counts stay legible only on small matrices
        for r, row in enumerate(matrix):
            for c, count in enumerate(row):
                if count:
                    ax.text(c, r, str(count), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _point_labels(sweep: list[dict]) -> list[tuple[tuple[float, float], str]]:
    """One label per distinct (mean k, recall) point, naming every p that lands on it."""
    groups: dict[tuple[float, float], list[str]] = {}
    for s in sweep:
        groups.setdefault((s["mean_k"], s["recall"]), []).append(str(s["p"]))
    return [(xy, "p=" + ", ".join(ps)) for xy, ps in groups.items()]


def plot_sweep(sweep: list[dict], chosen_p: float, path: Path) -> None:
    """Recall against mean adapters kept, one point per p; the chosen p is marked."""
    fig = Figure(figsize=(5.5, 4))
    ax = fig.add_subplot()
    ax.plot([s["mean_k"] for s in sweep], [s["recall"] for s in sweep], marker="o")
    for i, (xy, label) in enumerate(_point_labels(sweep)):
        # Neighbouring points often sit close together: alternate labels below and above.
        ax.annotate(label, xy, textcoords="offset points", xytext=(4, -12 if i % 2 == 0 else 6), fontsize=7)
    chosen = [s for s in sweep if s["p"] == chosen_p]
    if chosen:
        ax.plot(
            [chosen[0]["mean_k"]],
            [chosen[0]["recall"]],
            marker="*",
            markersize=14,
            color="red",
            label=f"default p={chosen_p}",
        )
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("mean adapters kept per prompt")
    ax.set_ylabel("recall (true task kept)")
    ax.set_title("Top-p sweep (calibrated)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_reliability(before: list[dict], after: list[dict], ece: tuple[float, float], path: Path) -> None:
    """Two reliability diagrams side by side: accuracy per confidence bin before and after calibration."""
    fig = Figure(figsize=(9, 4))
    for i, (bins, title) in enumerate(
        ((before, f"before (T=1), ECE {ece[0]:.4f}"), (after, f"after temperature scaling, ECE {ece[1]:.4f}"))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        full = [b for b in bins if b["count"]]
        width = full[0]["hi"] - full[0]["lo"] if full else 0.1
        ax.bar(
            [b["lo"] for b in full],
            [b["accuracy"] for b in full],
            width=width,
            align="edge",
            edgecolor="black",
            alpha=0.7,
            label="accuracy",
        )
        ax.plot([b["confidence"] for b in full], [b["confidence"] for b in full], "r.", label="mean confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(title, fontsize=9)
        ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
