"""Routing granularity cost: decode speed of `sentence` routing against `prompt` routing, router calls included.

Both run the real pipeline (`DLPLoRA.generate`, the trained router, the assets' adapters) on the same
prompts, interleaved per repeat. Time is read from the step callback, which runs after the sentence
policy (router call + `reroute`), so each step's interval holds the forward pass, the sampling and any
re-routing of that step:

- first token ms: from the call to the first step (routing + prefill + first sample);
- decode ms/step: mean interval between later steps (all rows of the batch advance each step).

On the merged path (batch 1) a switch re-merges every targeted weight; `switch_cost` measures that
directly and the break-even against the gathered path, which never re-merges but costs more per token.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from dlp_lora.chat import encode_prompts
from dlp_lora.config import GenerationConfig, RoutingConfig
from dlp_lora.pipeline import DLPLoRA

__all__ = ["ROUTING_BENCH_PROMPTS", "run_routing_benchmark", "switch_cost", "routing_markdown"]

ROUTING_BENCH_PROMPTS: tuple[str, ...] = (
    "A baker makes 14 loaves in the morning and 9 in the afternoon, then sells 17. How many loaves are left?\n"
    "Solve it step by step and end with '#### <number>'.",
    "Sort the following words alphabetically: List: pepper apple mango kiwi banana\n\n"
    "Tom has 3 boxes with 12 pencils each and gives away 10. How many pencils does he keep?",
    "Context: The Danube flows through ten countries before emptying into the Black Sea.\n"
    "Question: Into which sea does the Danube empty?\n\nA train travels 60 km per hour for 3 hours. How far does it go?",
    "Explain why the sky looks blue during the day. Then explain why sunsets look red.",
    "Sara reads 20 pages a day. Her book has 180 pages. After 4 days, how many pages are left to read?\n"
    "Solve it step by step and end with '#### <number>'.",
    'Is the following sentence plausible? "The goalkeeper hit a home run."\n\n'
    "A farmer has 5 rows of 8 apple trees. Each tree gives 10 apples. How many apples in total?",
    "Describe how a plant makes its food from sunlight, water and carbon dioxide, in a few sentences.",
    "not ( True and False ) or False is\n\nA shop sells pens at 3 dollars each. How much do 7 pens and a "
    "2-dollar notebook cost?",
)


def _one_run(dlp: DLPLoRA, prompts: Sequence[str], cfg: RoutingConfig, new_tokens: int) -> dict:
    stamps: list[float] = []
    paths: set[str] = set()

    def on_step(tokens: torch.Tensor, finished: torch.Tensor) -> None:
        stamps.append(time.perf_counter())
        paths.add(str(dlp.fused.active_path))

    t0 = time.perf_counter()
    results = dlp.generate(
        list(prompts), config=GenerationConfig(max_new_tokens=new_tokens), routing_config=cfg, on_step=on_step
    )
    steps = len(stamps)
    decode = (stamps[-1] - stamps[0]) / (steps - 1) if steps > 1 else float("nan")
    tokens = sum(r.completion_tokens for r in results)
    return {
        "paths": paths,
        "first_token_s": stamps[0] - t0,
        "decode_s_per_step": decode,
        "steps": steps,
        "switches": sum(len(r.switches) for r in results),
        "tokens": tokens,
    }


def run_routing_benchmark(
    dlp: DLPLoRA,
    batch_sizes: Sequence[int] = (1, 8),
    new_tokens: int = 48,
    repeats: int = 3,
    sentence: RoutingConfig = RoutingConfig(granularity="sentence"),
    label: str = "auto",
) -> list[dict]:
    """Medians over `repeats` of prompt vs sentence routing per batch size (interleaved per repeat)."""
    settings = {"prompt": RoutingConfig(granularity="prompt"), "sentence": replace(sentence, granularity="sentence")}
    batches = {b: [ROUTING_BENCH_PROMPTS[i % len(ROUTING_BENCH_PROMPTS)] for i in range(b)] for b in batch_sizes}
    _one_run(dlp, batches[max(batch_sizes)], settings["sentence"], 4)  # warm-up
    raw: dict[tuple[int, str], list[dict]] = {}
    for _ in range(repeats):
        for b in batch_sizes:
            for name, cfg in settings.items():
                raw.setdefault((b, name), []).append(_one_run(dlp, batches[b], cfg, new_tokens))
    rows = []
    for (b, name), runs in raw.items():
        decode = statistics.median(r["decode_s_per_step"] for r in runs)
        used = sorted(set().union(*(r["paths"] for r in runs)))
        rows.append(
            {
                "batch": b,
                "granularity": name,
                "fusion": label,
                "path": "+".join(used),
                "first_token_ms": 1000 * statistics.median(r["first_token_s"] for r in runs),
                "decode_ms_per_step": 1000 * decode,
                "tok_per_s": b / decode,
                "switches_per_100_tokens": 100
                * sum(r["switches"] for r in runs)
                / max(1, sum(r["tokens"] for r in runs)),
                "steps": statistics.median(r["steps"] for r in runs),
            }
        )
    for r in rows:
        ref = next(
            x for x in rows if (x["batch"], x["fusion"], x["granularity"]) == (r["batch"], r["fusion"], "prompt")
        )
        r["vs_prompt"] = r["decode_ms_per_step"] / ref["decode_ms_per_step"]
    return rows


@torch.no_grad()
def switch_cost(dlp: DLPLoRA, steps: int = 12) -> dict:
    """Batch 1: ms of a decode step with no switch and with a switch just before it (`reroute`, then
    the forward pass that re-merges), on the pipeline's current path. (ms, ms)."""
    names = dlp.adapter_names
    mixes = [torch.zeros(1, len(names)) for _ in range(2)]
    mixes[0][0, 0], mixes[1][0, 1] = 1.0, 1.0
    ids, mask = encode_prompts(dlp.tokenizer, [ROUTING_BENCH_PROMPTS[0]])
    plain, switched = [], []
    with dlp.fused.routed(mixes[0]) as active:
        path = active.path
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = dlp.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for i in range(2 * steps):
            token = out.logits[:, -1].argmax(-1)
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            positions = positions[:, -1:] + 1
            t0 = time.perf_counter()
            if i % 2:
                dlp.fused.reroute(mixes[(i // 2 + 1) % 2])
            out = dlp.model(
                input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True
            )
            (switched if i % 2 else plain).append(time.perf_counter() - t0)
    return {
        "path": path,
        "step_ms": 1000 * statistics.median(plain),
        "switch_step_ms": 1000 * statistics.median(switched),
    }


def routing_markdown(rows: list[dict], costs: list[dict], command: str, new_tokens: int, repeats: int) -> str:
    """The `## Routing granularity cost` section of docs/performance.md."""
    lines = [
        "## Routing granularity cost",
        "",
        f"Produced by `{command}` on this machine (CPU, fp32, {torch.get_num_threads()} torch threads; no GPU "
        f"was measured). The real pipeline (trained router, 26 adapters), {len(ROUTING_BENCH_PROMPTS)} "
        f"built-in prompts that ask for multi-sentence answers, {new_tokens} new tokens, median of {repeats} "
        "interleaved repeats. Decode ms/step includes the sentence policy's router calls and re-routes. "
        "`vs prompt`: decode time per step against `prompt` routing at the same batch and path.",
        "",
        "| batch | fusion | path | granularity | first token ms | decode ms/step | tok/s | switches / 100 tokens | vs prompt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['fusion']} | {r['path']} | {r['granularity']} | {r['first_token_ms']:.1f} | "
            f"{r['decode_ms_per_step']:.2f} | {r['tok_per_s']:.1f} | {r['switches_per_100_tokens']:.2f} | "
            f"{r['vs_prompt']:.3f} |"
        )
    if costs:
        lines += [
            "",
            "What one switch costs at batch 1 (decode step ms, median; `switch step`: `reroute` to a new "
            "mixture, then the step that runs under it):",
            "",
            "| path | step ms | switch step ms | extra per switch ms |",
            "|---|---|---|---|",
        ]
        for c in costs:
            lines.append(
                f"| {c['path']} | {c['step_ms']:.2f} | {c['switch_step_ms']:.2f} | "
                f"{c['switch_step_ms'] - c['step_ms']:.2f} |"
            )
        merged = next((c for c in costs if c["path"] == "merged"), None)
        gathered = next((c for c in costs if c["path"] == "gathered"), None)
        if merged and gathered and gathered["step_ms"] > merged["step_ms"]:
            extra = merged["switch_step_ms"] - merged["step_ms"]
            even = extra / (gathered["step_ms"] - merged["step_ms"])
            lines += [
                "",
                f"Break-even: the merged path pays {extra:.2f} ms per switch and saves "
                f"{gathered['step_ms'] - merged['step_ms']:.2f} ms per token against the gathered path, so "
                f"it stays cheaper while a row switches less often than every {even:.1f} tokens.",
            ]
    return "\n".join(lines) + "\n"
