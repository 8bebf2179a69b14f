"""Does a greedy request answer the same alone and beside others? The official `openai` client against
`dlp-lora serve`, once per base-weight setting.

    python benchmarks/alone_vs_batched.py --data-dir ../shared/data --quantize none auto --out docs/alone_vs_batched.json

The pool's test prompts (round robin over the tasks, as `serve_vs_llamacpp.py` sends them) go to one server
first one at a time, then all at once from as many client threads, so they share the running batch (each
left padded to the others, mixtures differing). Per setting it reports how many answers are the same text.
An fp32 base must give all of them; an int8 base may not (docs/performance.md says why).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI

from dlp_lora.bench import save_json, server_process
from dlp_lora.bench.serving import pool_prompts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--assets", default="assets/smollm2-135m-26tasks")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--prompts", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--quantize", nargs="+", default=["none", "auto"], choices=["none", "int8", "auto"])
    p.add_argument("--out", default=None)
    ns = p.parse_args(argv)
    prompts = pool_prompts(ns.assets, ns.data_dir, ns.prompts)
    result = {"prompts": len(prompts), "max_tokens": ns.max_tokens, "settings": {}}
    for quantize in ns.quantize:
        with server_process(ns.assets, "--quantize", quantize) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="unused")

            def ask(prompt: str) -> str:
                resp = client.chat.completions.create(
                    model="dlp-lora",
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=ns.max_tokens,
                    temperature=0,
                )
                return resp.choices[0].message.content or ""

            alone = [ask(t) for t in prompts]
            with ThreadPoolExecutor(len(prompts)) as pool:
                together = list(pool.map(ask, prompts))
        same = sum(a == b for a, b in zip(alone, together))
        print(f"--quantize {quantize}: {same} of {len(prompts)} answers the same alone and together")
        result["settings"][quantize] = {"same": same, "alone": alone, "together": together}
    if ns.out:
        save_json(result, ns.out)


if __name__ == "__main__":
    main()
