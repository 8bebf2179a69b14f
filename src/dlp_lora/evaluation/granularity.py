"""Composite prompts answered in one generation per prompt, under each routing granularity.

Each composite prompt joins two questions from different tasks with a blank line (`composite.make_pairs`,
the set `dlp-lora evaluate --composite-pairs` uses). Four settings answer it:

- `prompt`, `segment`, `sentence` (`dlp_lora.granularity`): ONE generation of the joined prompt (both
  questions, one stream) under that granularity;
- `split`: the split-and-generate baseline (`composite.evaluate_composite`'s per-segment setting): each
  question generated on its own, routed on its own text (two generations; not available to a user who
  sends one prompt).

Scoring one stream per part needs a rule for which text answers which question; it is the segment
rule of `dlp_lora.granularity` read backwards: the stream answers the last question first. The stream is
cut into pieces at blank lines; piece 1 answers the last part, piece 2 the part before, and a part with
no piece scores as an empty answer. Every part gets the same token budget as in `split` (its task's
`max_new_tokens`), so a stream may use up to the sum of its parts' budgets.

Also reported per setting: the weight on the answered part's true task, averaged over the tokens of
that part's piece (the mixture each token was sampled under), and per-token traces for a plot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dlp_lora.config import GenerationConfig, RoutingConfig
from dlp_lora.evaluation.composite import SEPARATOR, _part_score
from dlp_lora.evaluation.stats import bootstrap_mean, paired_difference
from dlp_lora.pipeline import DLPLoRA, Result
from dlp_lora.tasks import Example, Task

__all__ = ["SETTINGS", "Stream", "assign_pieces", "evaluate_granularity", "weight_plot", "markdown_section"]

SETTINGS = ("prompt", "segment", "sentence", "split")


def assign_pieces(text: str, n_parts: int, marker: str = SEPARATOR) -> list[str]:
    """The stream's answer to each part, in part order: piece i (blank-line separated) answers part n-1-i."""
    pieces = [p.strip() for p in text.split(marker) if p.strip()]
    out = [""] * n_parts
    for i, piece in enumerate(pieces[:n_parts]):
        out[n_parts - 1 - i] = piece
    return out


@dataclass
class Stream:
    """One generated answer: its tokens and the (T, N) bank weights each token was sampled under."""

    result: Result
    tokens: list[int]
    weights: torch.Tensor

    def piece_spans(self, decode, n_parts: int, marker: str = SEPARATOR) -> list[tuple[int, int]]:
        """[start, end) token span of each part's piece (part order); (0, 0) where the part has none."""
        spans: list[tuple[int, int]] = []
        start, seen = 0, ""
        for t in range(len(self.tokens)):
            text = decode(self.tokens[: t + 1])
            if marker in text[len(seen) :].lstrip() and text.strip():  # a blank line closes the piece
                spans.append((start, t + 1))
                start, seen = t + 1, text
        if start < len(self.tokens):
            spans.append((start, len(self.tokens)))
        out = [(0, 0)] * n_parts
        for i, span in enumerate(spans[:n_parts]):
            out[n_parts - 1 - i] = span
        return out


def _task_weight(dlp: DLPLoRA, weights: torch.Tensor, task: str) -> torch.Tensor:
    """(T,) weight on `task`'s adapter; zeros where the base model serves the task (no adapter)."""
    names = dlp.adapter_names
    return weights[:, names.index(task)] if task in names else weights.new_zeros(weights.shape[0])


def _bank_weights(dlp: DLPLoRA, r: Result, num_tokens: int) -> torch.Tensor:
    """(num_tokens, N): the mixture each answer token was sampled under (first mixture, then switches)."""
    names = dlp.adapter_names
    out = torch.zeros(max(num_tokens, 1), len(names))
    for mix in [{"token": 0, "adapters": r.adapters, "weights": r.weights}, *r.switches]:
        row = torch.zeros(len(names))
        for a, w in zip(mix["adapters"], mix["weights"]):
            row[names.index(a)] = w
        out[mix["token"] :] = row
    return out[:num_tokens]


def _generate(
    dlp: DLPLoRA, prompts: Sequence[str], budgets: Sequence[int], routing_config: RoutingConfig | None, batch_size: int
) -> list[Stream]:
    """Greedy streams cut to each row's own budget (rows are independent, so the cut equals a run with it)."""
    streams: list[Stream] = []
    for i in range(0, len(prompts), batch_size):
        rows = slice(i, i + batch_size)
        steps: list[torch.Tensor] = []
        kw = {"routing_config": routing_config} if routing_config is not None else {}
        results = dlp.generate(
            list(prompts[rows]),
            config=GenerationConfig(max_new_tokens=max(budgets[rows])),
            on_step=lambda t, f: steps.append(t.clone()),
            **kw,
        )
        for b, r in enumerate(results):
            n = min(r.completion_tokens, budgets[i + b])
            tokens = [int(s[b]) for s in steps[:n]]
            text = dlp.tokenizer.decode(tokens, skip_special_tokens=True)
            cut = Result(
                text=text,
                adapters=r.adapters,
                weights=r.weights,
                finish_reason=r.finish_reason,
                prompt_tokens=r.prompt_tokens,
                completion_tokens=n,
                switches=[s for s in r.switches if s["token"] < n],
            )
            streams.append(Stream(cut, tokens, _bank_weights(dlp, cut, n)))
    return streams


def evaluate_granularity(
    dlp: DLPLoRA,
    pairs: Sequence[tuple[Example, Example]],
    tasks: Mapping[str, Task],
    batch_size: int = 8,
    routing_config: RoutingConfig | None = None,
) -> dict:
    """Per-part scores (percent) of every setting in SETTINGS, with bootstrap intervals and weight traces.

    routing_config: the sentence / segment settings' other fields (window, sentence ends); its
    granularity is replaced per setting. Returns a JSON-ready dict (see `markdown_section`).
    """
    base = routing_config or RoutingConfig()
    joined = [a.prompt + SEPARATOR + b.prompt for a, b in pairs]
    parts = [list(pair) for pair in pairs]
    budgets = [sum(tasks[ex.task].max_new_tokens for ex in pair) for pair in parts]
    decode = lambda t: dlp.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    out: dict = {"pairs": len(pairs), "settings": {}, "examples": []}
    traces: dict[str, list[Stream]] = {}
    for g in ("prompt", "segment", "sentence"):
        cfg = RoutingConfig(**{**base.__dict__, "granularity": g})
        streams = _generate(dlp, joined, budgets, cfg, batch_size)
        traces[g] = streams
        scores, weights, answered = [], [], []
        for pair, s in zip(parts, streams):
            answers = assign_pieces(s.result.text, len(pair))
            spans = s.piece_spans(decode, len(pair))
            for ex, ans, (lo, hi) in zip(pair, answers, spans):
                scores.append(_part_score(tasks[ex.task], ex, ans))
                answered.append(hi > lo)
                if hi > lo:
                    weights.append(float(_task_weight(dlp, s.weights[lo:hi], ex.task).mean()))
        out["settings"][g] = _summary(scores, weights, answered, streams)
    # split-and-generate: each part alone, routed on its own text, with its own budget.
    flat = [ex for pair in parts for ex in pair]
    split = _generate(dlp, [ex.prompt for ex in flat], [tasks[ex.task].max_new_tokens for ex in flat], None, batch_size)
    out["settings"]["split"] = _summary(
        [_part_score(tasks[ex.task], ex, s.result.text) for ex, s in zip(flat, split)],
        [float(_task_weight(dlp, s.weights, ex.task).mean()) for ex, s in zip(flat, split) if s.tokens],
        [bool(s.tokens) for s in split],
        split,
    )
    ref = out["settings"]
    for g in ("segment", "sentence", "split"):
        ref[g]["vs_prompt"] = _iv(paired_difference(ref[g]["part_scores"], ref["prompt"]["part_scores"]))
    for g in ("prompt", "segment", "sentence"):
        ref[g]["vs_split"] = _iv(paired_difference(ref[g]["part_scores"], ref["split"]["part_scores"]))
    for k, (pair, s) in enumerate(zip(parts, traces["sentence"])):
        out["examples"].append(
            {
                "tasks": [ex.task for ex in pair],
                "text": s.result.text,
                "switches": len(s.result.switches),
                "weights": {ex.task: _trace(dlp, s, ex.task) for ex in pair},
                "prompt_weights": {ex.task: _trace(dlp, traces["prompt"][k], ex.task) for ex in pair},
            }
        )
    return out


def _trace(dlp: DLPLoRA, s: Stream, task: str) -> list[float]:
    return [round(float(w), 4) for w in _task_weight(dlp, s.weights, task)]


def _iv(iv) -> dict:
    return {"estimate": iv.estimate, "low": iv.low, "high": iv.high, "n": iv.n}


def _summary(scores: list[float], weights: list[float], answered: list[bool], streams: list[Stream]) -> dict:
    last = scores[1::2]  # the part each composite prompt ends with (answered first by the rule)
    first = scores[0::2]
    return {
        "part_scores": scores,
        "score": _iv(bootstrap_mean(scores)),
        "last_part": _iv(bootstrap_mean(last)),
        "first_part": _iv(bootstrap_mean(first)),
        "answered_fraction": sum(answered) / len(answered),
        "true_task_weight": sum(weights) / len(weights) if weights else 0.0,
        "switches_per_stream": sum(len(s.result.switches) for s in streams) / len(streams),
        "tokens_per_stream": sum(len(s.tokens) for s in streams) / len(streams),
    }


def weight_plot(result: dict, path: str | Path, examples: int = 4) -> Path:
    """Weight on each part's true task along the generated tokens (`sentence` solid, `prompt` dashed),
    for the streams with the most switches (then the longest)."""
    from matplotlib.figure import Figure

    chosen = sorted(result["examples"], key=lambda e: (-e["switches"], -len(next(iter(e["weights"].values())))))
    chosen = chosen[:examples]
    fig = Figure(figsize=(10, 2.3 * len(chosen)))
    for i, ex in enumerate(chosen):
        ax = fig.add_subplot(len(chosen), 1, i + 1)
        for j, (task, ws) in enumerate(ex["weights"].items()):
            label = f"part {j + 1}: {task}"
            ax.step(range(len(ws)), ws, where="post", color=f"C{j}", label=f"{label} (sentence)")
            pw = ex["prompt_weights"][task]
            ax.step(
                range(len(pw)), pw, where="post", color=f"C{j}", linestyle="--", alpha=0.6, label=f"{label} (prompt)"
            )
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("weight")
        ax.set_title(f"{ex['switches']} switches: {ex['text'][:90]!r}", fontsize=8)
        ax.legend(fontsize=7, loc="center right")
    fig.axes[-1].set_xlabel("generated token")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def markdown_section(result: dict, command: str, plot: str | None = None) -> str:
    """The `## Composite prompts in one generation: routing granularity` section of docs/results.md."""
    s = result["settings"]

    def f(iv: dict) -> str:
        return f"{iv['estimate']:.1f} [{iv['low']:.1f}, {iv['high']:.1f}]"

    lines = [
        "## Composite prompts in one generation: routing granularity",
        "",
        f"Produced by `{command}`. {result['pairs']} composite prompts (two questions from different tasks "
        "joined by a blank line, the same pairs as the section above); `prompt`, `segment` and `sentence` "
        "answer each in ONE greedy generation; `split` is the split-and-generate baseline (each question "
        "generated on its own, routed on its own text). A stream is scored per part by cutting it at blank "
        "lines: the first piece answers the last question (the rule `segment` routing starts the answer "
        "with), the next piece the question before. Scores in percent, 95% bootstrap intervals over parts.",
        "",
        "| routing | mean part score | last part | first part | parts answered | weight on the answered "
        "part's task | switches / stream | tokens / stream | vs prompt (paired) | vs split (paired) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in SETTINGS:
        r = s[g]
        vp = _fmt_diff(r.get("vs_prompt"))
        vs = _fmt_diff(r.get("vs_split"))
        lines.append(
            f"| {g} | {f(r['score'])} | {f(r['last_part'])} | {f(r['first_part'])} | "
            f"{100 * r['answered_fraction']:.0f}% | {r['true_task_weight']:.3f} | "
            f"{r['switches_per_stream']:.2f} | {r['tokens_per_stream']:.1f} | {vp} | {vs} |"
        )
    if plot:
        lines += ["", f"![weight on each part's true task along the generated tokens]({plot})"]
    return "\n".join(lines) + "\n"


def _fmt_diff(iv: dict | None) -> str:
    if iv is None:
        return "-"
    return f"{iv['estimate']:+.1f} [{iv['low']:+.1f}, {iv['high']:+.1f}]"
