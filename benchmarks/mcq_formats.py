"""How the plain base model does on multiple choice under each way of scoring it (docs/training.md).

On each task's dev split: the letter with the highest log-likelihood after the prompt (what the v1
adapters were trained to answer), the full option text after the prompt with its options listed (`acc`,
summed, and `acc_norm`, per byte, as lm-evaluation-harness scores), and the option text after the bare
question (cloze, lm-evaluation-harness's default for ARC and PIQA). The headline metric is the one an
adapter is trained on, so this picks both.

    python benchmarks/mcq_formats.py --tasks arc_easy piqa commonsenseqa --json docs/mcq_formats.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def probe(tasks: list[str], data_dir: str | None, limit: int) -> dict[str, dict[str, float]]:
    from dlp_lora.models import load_base_model
    from dlp_lora.scoring import continuation_logprobs, option_choice
    from dlp_lora.tasks import get_task, load_splits

    model, tok = load_base_model()
    out = {}
    for name in tasks:
        exs = load_splits(get_task(name), data_dir).dev[:limit]
        gold = [ex.gold_index for ex in exs]

        def acc(prompts: list[str], options: list[list[str]], normalize: bool) -> float:
            lps = continuation_logprobs(model, tok, prompts, options)
            hits = [option_choice(lp, opts, normalize) == g for lp, opts, g in zip(lps, options, gold)]
            return round(100 * sum(hits) / len(hits), 1)

        listed, cloze = [ex.prompt for ex in exs], [ex.question for ex in exs]
        texts = [list(ex.options) for ex in exs]
        out[name] = {
            "examples": len(exs),
            "letter": acc(listed, [list(ex.choices) for ex in exs], False),
            "listed_acc": acc(listed, texts, False),
            "listed_acc_norm": acc(listed, texts, True),
            "cloze_acc": acc(cloze, texts, False),
            "cloze_acc_norm": acc(cloze, texts, True),
        }
        print(name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa", "commonsenseqa"])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--limit", type=int, default=50, help="dev examples per task")
    ap.add_argument("--json", type=Path, default=None)
    ns = ap.parse_args()
    res = probe(ns.tasks, ns.data_dir, ns.limit)
    if ns.json:
        ns.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
