"""Task quality of the int8 base against fp32, with the adapters and the router: the paired difference.

Both pipelines (same assets, same router, base weights fp32 vs `--quantize int8`) run the evaluation
harness's `dlp` method on the same test examples; the headline score of each example (acc_norm for
multiple choice, as in docs/results.md; F1 for SQuAD, exact match otherwise) is paired across the two, and
the task-averaged difference gets a stratified bootstrap interval (examples resampled within each task).

    python benchmarks/quant_quality.py --tasks arc_easy boolq --limit 200 --json docs/quant_quality.json \
        --markdown FILE

Predictions are written (and resumed from) under --out, one harness run per base.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlp_lora.assets import DEFAULT_ASSETS
from dlp_lora.bench import write_section
from dlp_lora.config import EvalConfig, SplitConfig
from dlp_lora.evaluation.harness import HEADLINE_SCORES, evaluate_task
from dlp_lora.evaluation.stats import bootstrap_mean, paired_difference, stratified_mean_difference
from dlp_lora.pipeline import DLPLoRA

METHOD = "dlp"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default=DEFAULT_ASSETS)
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--limit", type=int, default=200, help="test examples per task")
    p.add_argument("--out", default="runs/quant_quality")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="write the section into this markdown file")
    p.add_argument(
        "--loglik",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score multiple choice by option log-likelihood (acc_norm, the headline of docs/results.md); "
        "--no-loglik reads the generated answer instead (cheaper)",
    )
    ns = p.parse_args(argv)
    cfg = EvalConfig(methods=(METHOD,), p_sweep=(), limit=ns.limit, loglik=ns.loglik)
    # Both pipelines stay loaded and each task runs on both before the next, so a run cut short still
    # holds paired results for the tasks it finished (and a rerun resumes from the prediction files).
    pipelines = {quant: DLPLoRA.from_assets(ns.assets, quantize=quant) for quant in ("none", "int8")}
    fp32: dict[str, list[float]] = {}
    int8: dict[str, list[float]] = {}
    for name in ns.tasks:
        scores = {
            quant: evaluate_task(dlp, name, Path(ns.out) / quant, cfg, SplitConfig(), ns.data_dir)[METHOD][
                HEADLINE_SCORES
            ]
            for quant, dlp in pipelines.items()
        }
        fp32[name], int8[name] = scores["none"], scores["int8"]
        result = summarise(fp32, int8, argv, ns.loglik)
        if ns.json:
            Path(ns.json).write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print(table)
    if ns.markdown:
        write_section(Path(ns.markdown), "## Quantized base (int8) vs fp32", table)
    return result


def summarise(fp32: dict[str, list[float]], int8: dict[str, list[float]], argv: list[str] | None, loglik: bool) -> dict:
    zeros = {t: [0.0] * len(v) for t, v in fp32.items()}
    return {
        "command": "python benchmarks/quant_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "method": METHOD,
        "mcq_headline": "acc_norm" if loglik else "generated answer accuracy",
        "examples_per_task": {t: len(v) for t, v in fp32.items()},
        "fp32_average": stratified_mean_difference(fp32, zeros).__dict__,
        "int8_average": stratified_mean_difference(int8, zeros).__dict__,
        "int8_minus_fp32": stratified_mean_difference(int8, fp32).__dict__,
        "per_task": {
            t: {
                "fp32": bootstrap_mean(fp32[t]).__dict__,
                "int8": bootstrap_mean(int8[t]).__dict__,
                "int8_minus_fp32": paired_difference(int8[t], fp32[t]).__dict__,
                "same_answer": sum(a == b for a, b in zip(fp32[t], int8[t])) / len(fp32[t]),
            }
            for t in fp32
        },
    }


def _iv(d: dict) -> str:
    return f"{d['estimate']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"


def markdown(r: dict) -> str:
    d = r["int8_minus_fp32"]
    lines = [
        "## Quantized base (int8) vs fp32",
        "",
        f"Produced by `{r['command']}`: the `{r['method']}` method (router + top-p selection, the default "
        "serving path) on the same test examples with the base model in fp32 and in int8 (`--quantize int8`: "
        "int8 weights, per-token int8 activations; adapters fp32). Greedy decoding. Scores are each task's "
        f"headline ({r['mcq_headline']} for multiple choice, F1 for SQuAD, exact match otherwise), in points; "
        "intervals are 95% bootstrap intervals, the average's resampling examples within each task.",
        "",
        f"Task average: fp32 {r['fp32_average']['estimate']:.1f}, int8 {r['int8_average']['estimate']:.1f}; "
        f"int8 - fp32 = **{_iv(d)}** points over {d['n']} examples "
        f"({'beyond noise' if d['low'] > 0 or d['high'] < 0 else 'the interval contains 0'}; target: within 1 "
        f"point).",
        "",
        "| task | examples | fp32 | int8 | int8 - fp32 [95% CI] | same score |",
        "|---|---|---|---|---|---|",
    ]
    for t, v in r["per_task"].items():
        lines.append(
            f"| {t} | {r['examples_per_task'][t]} | {v['fp32']['estimate']:.1f} | {v['int8']['estimate']:.1f} "
            f"| {_iv(v['int8_minus_fp32'])} | {100 * v['same_answer']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
