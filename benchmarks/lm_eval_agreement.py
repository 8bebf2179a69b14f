"""lm-evaluation-harness through the server vs our own scoring, on the same multiple-choice prompts.

    python benchmarks/lm_eval_agreement.py --lm-eval /tmp/lmeval/bin/lm_eval --tokenizer /tmp/smollm2-tok \
        --tasks truthfulqa_mc1 mmlu --out docs/lm_eval_agreement.json

Per layout (`dlp_lora.bench.lmeval.LAYOUTS`): `chat` is how `dlp-lora evaluate` scores (the prompt as the
chat template's user message, each option as the answer; lm-eval's `--apply_chat_template`), `raw` is
lm-eval's zero-shot `Q: ...\\nA:` with each option after a space. Each task's whole test split is scored
twice, routed (`dlp-lora`):
- by lm-eval 0.4.13 (`local-completions`, 8 concurrent, one request per option: echo, logprobs) against
  `dlp-lora serve` (fp32), which routes each request by its own rule (the chat prompt's user message, or
  the raw context's question);
- in-process by `DLPLoRA.option_logprobs` (what `dlp-lora evaluate` calls; without a routing given it
  routes by the same rule), batch 16, one KV cache per question shared by its options.
Both accuracies are computed lm-eval's way from each side's option log-likelihoods (acc: the highest;
acc_norm: the highest per character of the option), paired per question with a bootstrap interval; the
largest difference between the two sides' option log-likelihoods is reported relative to the first option
(in the chat layout lm-eval also scores the template's newline before the answer, the same for every option).
Throughput: questions per second of each side; lm-eval's process start (a `--limit 1` run) is subtracted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dlp_lora.bench import save_json, server_process
from dlp_lora.bench.lmeval import LmEval, write_tasks
from dlp_lora.evaluation.stats import bootstrap_mean, paired_difference
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.tasks import get_task


def picks(lls: list[float], options: list[str]) -> tuple[int, int]:
    """(acc pick, acc_norm pick) as lm-eval takes them: argmax of the log-likelihood, and of it per character."""
    norm = [ll / max(len(o), 1) for ll, o in zip(lls, options)]
    return max(range(len(lls)), key=lls.__getitem__), max(range(len(norm)), key=norm.__getitem__)


def library_side(dlp: DLPLoRA, examples: list, layout: str) -> tuple[list[list[float]], float]:
    """Each question's option log-likelihoods scored in-process, and the seconds it took."""
    if layout == "chat":
        prompts, options = [ex.prompt for ex in examples], [list(ex.options) for ex in examples]
    else:
        prompts, options = (
            [f"Q: {ex.prompt}\nA:" for ex in examples],
            [[" " + o for o in ex.options] for ex in examples],
        )
    t0 = time.perf_counter()
    lls = dlp.option_logprobs(prompts, options, chat=layout == "chat")
    return lls, time.perf_counter() - t0


def compare(examples: list, ours: list[list[float]], samples: list[dict]) -> dict:
    """Accuracies of both sides, their paired differences and the log-likelihood agreement."""
    theirs = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    acc = {"ours": [], "lm_eval": []}
    norm = {"ours": [], "lm_eval": []}
    worst, differ = 0.0, 0
    for ex, a, b in zip(examples, ours, theirs):
        pa, pb = picks(a, list(ex.options)), picks(b, list(ex.options))
        for side, p in (("ours", pa), ("lm_eval", pb)):
            acc[side].append(100.0 * (p[0] == ex.gold_index))
            norm[side].append(100.0 * (p[1] == ex.gold_index))
        differ += pa != pb
        worst = max(worst, max(abs((x - a[0]) - (y - b[0])) for x, y in zip(a, b)))
    out: dict = {"n": len(examples), "questions_with_a_different_pick": differ, "max_abs_loglik_diff": worst}
    for name, metric in (("acc", acc), ("acc_norm", norm)):
        d = paired_difference(metric["lm_eval"], metric["ours"])
        out[name] = {
            "lm_eval": round(bootstrap_mean(metric["lm_eval"]).estimate, 1),
            "ours": round(bootstrap_mean(metric["ours"]).estimate, 1),
            "lm_eval_minus_ours": [round(d.estimate, 2), round(d.low, 2), round(d.high, 2)],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default="assets/smollm2-135m-26tasks")
    p.add_argument("--tasks", nargs="+", default=["truthfulqa_mc1", "mmlu"], help="multiple-choice tasks")
    p.add_argument("--layouts", nargs="+", default=["chat", "raw"], choices=["chat", "raw"])
    p.add_argument("--lm-eval", required=True, help="the lm_eval executable (its own environment)")
    p.add_argument("--tokenizer", required=True, help="a local tokenizer folder for lm-eval (save_pretrained)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--work", default="runs/lm_eval_agreement")
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="only each task's first N questions (a quick check)")
    p.add_argument("--out", default=None, help="JSON to write")
    ns = p.parse_args(argv)
    if any(get_task(t).kind != "mcq" for t in ns.tasks):
        p.error("--tasks must be multiple-choice tasks")
    work, lm_eval = Path(ns.work), LmEval(ns.lm_eval, ns.tokenizer, ns.concurrent)
    dlp = DLPLoRA.from_assets(ns.assets)
    result: dict = {"command": "python benchmarks/lm_eval_agreement.py " + " ".join(argv or sys.argv[1:]),
                    "assets": ns.assets, "concurrent": ns.concurrent, "limit": ns.limit, "layouts": {}}  # fmt: skip
    with server_process(ns.assets, "--quantize", "none") as url:
        for layout in ns.layouts:
            examples = write_tasks(ns.tasks, work, ns.data_dir, layout)
            _, start = lm_eval.run("dlp-lora", url, ns.tasks[:1], work, layout, limit=1)
            rows: dict = {}
            for t in ns.tasks:  # one lm-eval run per task: each is timed on its own
                samples, seconds = lm_eval.run("dlp-lora", url, [t], work, layout, limit=ns.limit)
                questions = examples[t][: ns.limit]
                ours, own_seconds = library_side(dlp, questions, layout)
                n = len(questions)
                rows[t] = compare(questions, ours, samples[t])
                rows[t]["questions_per_s"] = {
                    "lm_eval": round(n / max(seconds - start, 1e-9), 2),
                    "ours": round(n / own_seconds, 2),
                }
                rows[t]["lm_eval_seconds"] = {"run": round(seconds, 1), "process_start": round(start, 1)}
                rate = rows[t]["questions_per_s"]
                rows[t]["throughput_ratio"] = round(rate["lm_eval"] / rate["ours"], 3)
                print(f"{layout:4s} {t:24s} n={n} acc lm-eval {rows[t]['acc']['lm_eval']} ours "
                      f"{rows[t]['acc']['ours']} norm {rows[t]['acc_norm']['lm_eval']}/{rows[t]['acc_norm']['ours']} "
                      f"picks differ {rows[t]['questions_with_a_different_pick']} max|dll| "
                      f"{rows[t]['max_abs_loglik_diff']:.2e} q/s {rate['lm_eval']} vs {rate['ours']}")  # fmt: skip
            result["layouts"][layout] = rows
    if ns.out:
        save_json(result, ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
