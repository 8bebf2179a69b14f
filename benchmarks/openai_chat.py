"""The official `openai` client on `/v1/chat/completions`: a task's whole test split, routed vs named models.

    python benchmarks/openai_chat.py --tasks bbh_hyperbaton --models multitask --out docs/openai_chat.json

One `dlp-lora serve` is started (fp32). Each test prompt is sent as the user message, greedy, at most the
task's answer length (or --max-tokens), from 8 client threads, once per model name: `dlp-lora` (routed), the base model and
each of --models (e.g. the multitask generalist). Answers are scored with the task's own parser and metric
(what `dlp-lora evaluate` reports as "generated" accuracy; its headline for multiple choice scores option
log-likelihoods instead). For the routed model the adapters each response says served it are counted, so
the check also shows which class choice (specialist, generalist, base) the server applied.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from openai import OpenAI

from dlp_lora.bench import save_json, server_process
from dlp_lora.evaluation.examples import generated_score
from dlp_lora.evaluation.stats import bootstrap_mean, paired_difference
from dlp_lora.tasks import get_task, load_splits, parse_answer

ROUTED = "dlp-lora"


def ask(client: OpenAI, model: str, prompts: list[str], max_tokens: int) -> list[tuple[str, list[str]]]:
    """(answer, adapters the response names) per prompt, in order."""

    def one(prompt: str) -> tuple[str, list[str]]:
        resp = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
        )
        routing = (resp.model_extra or {}).get("routing") or {}
        return resp.choices[0].message.content or "", list(routing.get("adapters") or [])

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


def _interval(d) -> list[float]:
    return [round(d.estimate, 1), round(d.low, 1), round(d.high, 1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", default="assets/smollm2-135m-26tasks")
    p.add_argument("--tasks", nargs="+", required=True)
    p.add_argument("--models", nargs="*", default=[], help="more model names beside routed and base")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="answer length (default: the task's own)")
    p.add_argument("--out", default=None, help="JSON to write")
    ns = p.parse_args(argv)
    result: dict = {"command": "python benchmarks/openai_chat.py " + " ".join(argv or sys.argv[1:]),
                    "assets": ns.assets, "tasks": {}}  # fmt: skip
    with server_process(ns.assets, "--quantize", "none") as url:
        base = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        for name in ns.tasks:
            task = get_task(name)
            test = load_splits(task, ns.data_dir).test
            answers = {m: ask(client, m, [ex.prompt for ex in test], ns.max_tokens or task.max_new_tokens)
                       for m in (ROUTED, base, *ns.models)}  # fmt: skip
            scores = {
                m: [generated_score(task, parse_answer(task, a, ex.choices, ex.options), ex.references)
                    for ex, (a, _) in zip(test, rows)]
                for m, rows in answers.items()
            }  # fmt: skip
            served = Counter("+".join(ads) or "base model" for _, ads in answers[ROUTED])
            row = {"n": len(test), "max_tokens": ns.max_tokens or task.max_new_tokens,
                   "routed_served_by": dict(served.most_common())}  # fmt: skip
            row |= {m: round(bootstrap_mean(s).estimate, 1) for m, s in scores.items()}
            row |= {f"routed_minus_{m}": _interval(paired_difference(scores[ROUTED], s))
                    for m, s in scores.items() if m != ROUTED}  # fmt: skip
            result["tasks"][name] = row
            print(name, row, flush=True)
    if ns.out:
        save_json(result, ns.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
