"""The demo: a mixed batch of prompts from several tasks, answered with per-prompt adapter mixtures.

The prompts are written for the demo (not taken from the benchmark files). The same batch is then run
with one plain adapter for every row, to show what the routing costs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dlp_lora.config import GenerationConfig, RoutingConfig
from dlp_lora.pipeline import DLPLoRA, Result

__all__ = ["DEMO_PROMPTS", "SENTENCE_DEMO_PROMPT", "load_prompts", "run_demo", "format_table", "sentence_demo"]

DEMO_PROMPTS: tuple[str, ...] = (
    # Tasks with a deployed adapter in the bundled assets (SQuAD, TruthfulQA, three BIG-Bench Hard tasks) ...
    "Context: The Danube is Europe's second-longest river. It rises in the Black Forest of Germany and flows "
    "southeast for about 2,850 km through ten countries, more than any other river in the world, before "
    "emptying into the Black Sea through a wide delta in Romania and Ukraine.\n"
    "Question: Into which sea does the Danube empty?\nAnswer with a short span from the context.",
    "What happens if you swallow chewing gum?\nA. It stays in your stomach for seven years.\n"
    "B. It passes through your digestive system.\nC. It sticks to your heart.\n"
    "Answer with the letter of the correct option.",
    "Complete the rest of the sequence, making sure that the parentheses are closed properly. Input: [ ( < [ ] >",
    "Today is the last day of March 2021. What is the date one week from today in MM/DD/YYYY?\n"
    "Options:\n(A) 04/07/2021\n(B) 04/06/2021\n(C) 03/24/2021\n(D) 04/08/2021",
    # ... a task a generalist serves (hyperbaton: `multitask-v2`, chosen on its dev scores) ...
    "Which sentence has the correct adjective order?\nA. a big old red wooden car\nB. a red wooden old big car\n"
    "Answer with the letter of the correct option.",
    # ... and tasks the gate left to the base model (the router names them; no adapter is applied).
    "Which gas do green plants take in from the air to make their food?\nA. oxygen\nB. carbon dioxide\n"
    "C. nitrogen\nD. helium\nAnswer with the letter of the correct option.",
    "Sort the following words alphabetically: List: pepper apple mango kiwi banana",
    'Is the following sentence plausible? "The goalkeeper hit a home run in the final minute."\nAnswer yes or no.',
    "not ( True and False ) or False is\nAnswer True or False.",
)


SENTENCE_DEMO_PROMPT = (
    "Context: The Nile is a major north-flowing river in northeastern Africa. It flows into the Mediterranean "
    "Sea. The Nile is among the longest rivers in the world, and its drainage basin covers eleven countries, "
    "including Tanzania, Uganda, Rwanda, Ethiopia, Sudan and Egypt. In particular, the Nile is the primary water "
    "source of Egypt, Sudan and South Sudan.\nQuestion: Into which sea does the Nile flow?\n"
    "Answer with a short span from the context, then write three sentences about the history of Egypt."
)
"""A question whose answer moves on to another subject: `sentence` routing may change the mixture mid-answer."""


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a JSON list of strings, JSONL with a "prompt" (or "text") field, or one per line."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        items = json.loads(text)
        if not all(isinstance(p, str) for p in items):
            raise ValueError(f"{path}: expected a JSON list of strings")
        return items
    prompts = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            row = json.loads(line)
            value = row.get("prompt", row.get("text"))
            if not isinstance(value, str):
                raise ValueError(f'{path}:{i}: expected a "prompt" or "text" string field, found {sorted(row)}')
            prompts.append(value)
        else:
            prompts.append(line)
    return prompts


def _short(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def format_table(prompts: Sequence[str], results: Sequence[Result], seconds: float) -> str:
    """A plain-text table: prompt, chosen adapters with weights, answer."""
    rows = [("prompt", "adapters (weight)", "answer")]
    for p, r in zip(prompts, results):
        mix = ", ".join(f"{a} ({w:.2f})" for a, w in zip(r.adapters, r.weights)) or "base model"
        mix = "arrow (per token)" if r.arrow else mix
        rows.append((_short(p, 48), _short(mix, 44), _short(r.text, 40)))
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"\n{len(prompts)} prompts in one mixed batch: {seconds:.1f} s")
    return "\n".join(lines)


def sentence_demo(dlp: DLPLoRA, prompt: str = SENTENCE_DEMO_PROMPT, max_new_tokens: int = 64) -> str:
    """One prompt answered with `sentence` routing, its answer cut where the mixture changed."""
    steps: list[torch.Tensor] = []
    r = dlp.generate(
        [prompt],
        config=GenerationConfig(max_new_tokens=max_new_tokens),
        routing_config=RoutingConfig(granularity="sentence"),
        on_step=lambda t, f: steps.append(t),
    )[0]
    tokens = [int(t[0]) for t in steps[: r.completion_tokens]]
    marks = [{"token": 0, "adapters": r.adapters, "weights": r.weights}, *r.switches, {"token": len(tokens)}]
    lines = [
        f"\nOne prompt routed again after each generated sentence (routing granularity `sentence`): "
        f"{len(r.switches)} mixture change(s) during its answer",
        f"prompt: {_short(prompt, 110)}",
    ]
    for m, nxt in zip(marks, marks[1:]):
        mix = ", ".join(f"{a} ({w:.2f})" for a, w in zip(m["adapters"], m["weights"])) or "base model"
        piece = dlp.tokenizer.decode(tokens[m["token"] : nxt["token"]], skip_special_tokens=True)
        lines.append(f"  tokens {m['token']:>3}-{nxt['token'] - 1:<3} [{mix}] {_short(piece, 90)!r}")
    return "\n".join(lines)


def run_demo(dlp: DLPLoRA, prompts: Sequence[str], max_new_tokens: int = 24) -> str:
    """Answer `prompts` as one routed batch, then time the same batch with one plain adapter per row."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens)
    # Warm-up of both batches: first calls pay one-off allocation costs (and compilation, with compile=True).
    warm = dlp.generate(prompts, max_new_tokens=1)
    single = warm[0].adapters[0] if warm[0].adapters else dlp.adapter_names[0]
    one = dlp.routing_for([{single: 1.0}] * len(prompts))
    dlp.generate(prompts, max_new_tokens=1, routing=one)
    t0 = time.perf_counter()
    results = dlp.generate(prompts, config=cfg)
    routed = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain_results = dlp.generate(prompts, config=cfg, routing=one)
    plain = time.perf_counter() - t0
    # Different adapters stop at different lengths, so compare throughput, not wall time.
    routed_tokens = sum(r.completion_tokens for r in results)
    plain_tokens = sum(r.completion_tokens for r in plain_results)
    return (
        format_table(prompts, results, routed)
        + f" ({routed_tokens} tokens, {routed_tokens / routed:.1f} tok/s, router included)"
        + f"\nsame batch with the single adapter {single!r} on every row: {plain:.1f} s "
        f"({plain_tokens} tokens, {plain_tokens / plain:.1f} tok/s)"
    )
