"""Raw `/v1/completions` as lm-evaluation-harness sends them, on our test splits: routed vs the base model.

    python benchmarks/lm_eval_raw.py --lm-eval /tmp/lmeval/bin/lm_eval --tokenizer /tmp/smollm2-tok \
        --assets assets/smollm2-135m-26tasks --out docs/lm_eval_raw.json

For each task (default: those with a deployed adapter) the whole test split is written as local lm-eval
task files (JSONL + YAML under --work, from ../shared/data through our own loaders; nothing is copied into
the repository) in lm-eval's raw zero-shot layout `Q: {prompt}\\nA:`, with no chat template:
- multiple choice: `output_type: multiple_choice`, each option text after the prompt, scored by
  log-likelihood (lm-eval's `acc` and `acc_norm`, the latter the headline as in our harness);
- free-form: `output_type: generate_until`, greedy, `until: ["\\n"]`, the answer scored afterwards from
  lm-eval's logged samples with our own parser and metric (`parse_answer`, `headline_score`), so the
  figure means what `dlp-lora evaluate` reports.
One `dlp-lora serve` is started; lm-eval (`local-completions`, 8 concurrent) runs once per model name:
`dlp-lora` (routed) and the base model. Paired bootstrap intervals (routed - base) per task; empty
answers counted. lm-eval lives in its own environment (`--lm-eval`: `pip install 'lm-eval[api]==0.4.13'`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

from dlp_lora.assets import Manifest
from dlp_lora.bench import save_json, server_process
from dlp_lora.bench.lmeval import LAYOUTS, LmEval, write_tasks
from dlp_lora.evaluation.examples import headline_score
from dlp_lora.evaluation.stats import bootstrap_mean, paired_difference
from dlp_lora.tasks import get_task, parse_answer

LAYOUT = LAYOUTS["raw"][0]


def scores_of(name: str, samples: list[dict], examples: list) -> tuple[list[float], int]:
    """Per-example headline scores (0-100) and the number of empty answers (free-form only)."""
    task = get_task(name)
    if task.kind == "mcq":
        return [100.0 * float(s["acc_norm"]) for s in samples], 0
    scores, empty = [], 0
    for s, ex in zip(samples, examples):
        text = s["filtered_resps"][0] if isinstance(s["filtered_resps"][0], str) else s["filtered_resps"][0][0]
        empty += not text.strip()
        scores.append(headline_score(task.metric, parse_answer(task, text, ex.choices, ex.options), ex.references))
    return scores, empty


def own_route_share(url: str, task: str, examples: list) -> float:
    """Percent of the task's prompts, written as lm-eval sends them, whose first adapter is the task's own."""
    with httpx.Client(timeout=60) as http:
        hits = [
            (http.post(f"{url}/v1/route", json={"prompt": LAYOUT.replace("{{prompt}}", ex.prompt)}).json()["adapters"]
             or [None])[0] == task
            for ex in examples
        ]  # fmt: skip
    return round(100.0 * sum(hits) / len(hits), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default="assets/smollm2-135m-26tasks")
    p.add_argument("--tasks", nargs="*", default=None, help="default: every task with a deployed adapter")
    p.add_argument("--lm-eval", required=True, help="the lm_eval executable (its own environment)")
    p.add_argument("--tokenizer", required=True, help="a local tokenizer folder for lm-eval (save_pretrained)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--work", default="runs/lm_eval_raw")
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--out", default=None, help="JSON to write")
    p.add_argument("--label", default="", help="what the assets are (kept in the JSON)")
    p.add_argument(
        "--models", nargs="+", default=[], help="more model names to run beside routed and base (e.g. multitask)"
    )
    ns = p.parse_args(argv)
    manifest = Manifest.load(ns.assets)
    tasks = ns.tasks or [t for t, a in manifest.adapters.items() if a is not None]
    work = Path(ns.work)
    examples = write_tasks(tasks, work, ns.data_dir)
    with server_process(ns.assets, "--quantize", "none") as url:
        base_name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        lm_eval = LmEval(ns.lm_eval, ns.tokenizer, ns.concurrent)
        runs = {m: lm_eval.run(m, url, tasks, work) for m in ("dlp-lora", base_name, *ns.models)}
        own = {t: own_route_share(url, t, examples[t]) for t in tasks}
    result = {"command": "python benchmarks/lm_eval_raw.py " + " ".join(argv or sys.argv[1:]), "label": ns.label,
              "assets": ns.assets, "layout": LAYOUT, "seconds": {m: round(s, 1) for m, (_, s) in runs.items()},
              "tasks": {}}  # fmt: skip
    routed, base = runs["dlp-lora"][0], runs[base_name][0]
    for t in tasks:
        r, r_empty = scores_of(t, routed[t], examples[t])
        b, b_empty = scores_of(t, base[t], examples[t])
        diff = paired_difference(r, b)
        result["tasks"][t] = {
            "n": len(r), "routed": round(bootstrap_mean(r).estimate, 1), "base": round(bootstrap_mean(b).estimate, 1),
            "routed_minus_base": [round(diff.estimate, 1), round(diff.low, 1), round(diff.high, 1)],
            "empty_routed": r_empty, "empty_base": b_empty, "routed_to_own_adapter": own[t],
        }  # fmt: skip
        for m in ns.models:  # e.g. the multitask LoRA by name, against routed
            o, o_empty = scores_of(t, runs[m][0][t], examples[t])
            d = paired_difference(r, o)
            result["tasks"][t][m] = round(bootstrap_mean(o).estimate, 1)
            result["tasks"][t][f"empty_{m}"] = o_empty
            result["tasks"][t][f"routed_minus_{m}"] = [round(d.estimate, 1), round(d.low, 1), round(d.high, 1)]
        row = result["tasks"][t]
        print(f"{t:32s} n={row['n']:4d} routed {row['routed']:5.1f} base {row['base']:5.1f} "
              f"diff {diff.estimate:+5.1f} [{diff.low:+.1f}, {diff.high:+.1f}] empty {r_empty}/{b_empty} own route {own[t]}%")  # fmt: skip
    if ns.out:
        save_json(result, ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
