"""Arrow routing: PEFT's `create_arrow_model` against our fused layers, timed side by side in one run.

    python benchmarks/arrow_speed.py --compile --json docs/arrow_speed.json --markdown docs/performance.md

The embedded SmolLM2 (fp32) with N = 5, 26, 100 random rank-8 LoRAs on q_proj and v_proj (PEFT's Arrow
needs equal ranks and targets); both route every token among all N with top_k 3. Each configuration
decodes greedily with the library's loop (`dlp_lora.bench.fusion.time_generation`: prefill = one token,
decode = the rest per token), batch 1 and 8, a 64-token prompt, 16 new tokens; medians over interleaved
repeats. `--compile` times every model (base, PEFT's, ours) a second time with the decode steps compiled
over a static KV cache (`dlp_lora.compiled.CompiledDecoder`, the library's `compile=True`), so each is
compared eager to eager and compiled to compiled. Run it on a quiet machine (nothing else using the cores).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dlp_lora.bench import save_json, write_section
from dlp_lora.bench.fusion import random_adapters, time_generation
from dlp_lora.compiled import CompiledDecoder
from dlp_lora.fusion.inject import FusedLoRAModel
from dlp_lora.models import load_base_model
from dlp_lora.types import ArrowRouting


def _time_all(model, prompts: dict[int, torch.Tensor], ns, times: dict, key: tuple) -> None:
    """Time `model` as routed now at every batch size, eager and (with --compile) compiled, into `times`.

    Each batch size is warmed up first (the compiled one compiles there, outside the timing)."""
    decoders = {"eager": None}
    if ns.compile:
        torch._dynamo.reset()  # earlier models' graphs would count against dynamo's recompile limit
        # A fresh decoder per model: its graph is specialised to the modules it saw (base, PEFT's, ours).
        decoders["compiled"] = CompiledDecoder(model, length_step=ns.prompt_tokens + ns.new_tokens)
    for dec in decoders.values():
        for b in ns.batch_sizes:
            time_generation(model, prompts[b], 2, compiled=dec)
    for _ in range(ns.repeats):
        for mode, dec in decoders.items():
            for b in ns.batch_sizes:
                times.setdefault((*key, mode, b), []).append(
                    time_generation(model, prompts[b], ns.new_tokens, compiled=dec)
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-adapters", type=int, nargs="*", default=[5, 26, 100])
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 8])
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time every model with compiled decode steps")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    ns = p.parse_args(argv)
    from peft import ArrowConfig, create_arrow_model

    model, _ = load_base_model()
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    prompts = {b: torch.randint(100, vocab, (b, ns.prompt_tokens), generator=g) for b in ns.batch_sizes}
    modes = ["eager", "compiled"] if ns.compile else ["eager"]
    times: dict[tuple, list[tuple[float, float]]] = {}
    # The ceiling: the base model alone, no adapter and no routing (neither Arrow can decode faster).
    _time_all(model, prompts, ns, times, ("base",))
    with tempfile.TemporaryDirectory() as tmp:
        for n in ns.num_adapters:
            paths = random_adapters(model, n, 8, Path(tmp) / f"n{n}", seed=n)
            peft_model = create_arrow_model(model, [str(q) for q in paths.values()],
                                            ArrowConfig(top_k=ns.top_k, rng_seed=0)).eval()  # fmt: skip
            _time_all(peft_model, prompts, ns, times, ("peft", n))
            peft_model.unload()
            fused = FusedLoRAModel(model, paths)
            with fused.routed(ArrowRouting(tuple(range(n)), ns.top_k)):
                _time_all(model, prompts, ns, times, ("ours", n))
            fused.remove()
    rows = []
    for mode in modes:
        for n in ns.num_adapters:
            for b in ns.batch_sizes:
                keys = {"peft": ("peft", n, mode, b), "ours": ("ours", n, mode, b), "base": ("base", mode, b)}
                med = {who: [statistics.median(x) for x in zip(*times[k])] for who, k in keys.items()}
                r = {"decode": mode, "N": n, "batch": b}
                for who in keys:
                    r[f"{who}_prefill_ms"] = 1e3 * med[who][0]
                    r[f"{who}_decode_tok_s"] = b * ns.new_tokens / med[who][1]
                r["decode_speedup"] = r["ours_decode_tok_s"] / r["peft_decode_tok_s"]
                # The most any Arrow implementation could gain over PEFT's: the base model's speed over PEFT's.
                r["decode_ceiling"] = r["base_decode_tok_s"] / r["peft_decode_tok_s"]
                r["prefill_speedup"] = r["peft_prefill_ms"] / r["ours_prefill_ms"]
                # Against PEFT's Arrow as a PEFT user runs it (eager `generate`-style decoding).
                peft_eager = statistics.median(x[1] for x in times[("peft", n, "eager", b)])
                r["speedup_vs_peft_eager"] = r["ours_decode_tok_s"] / (b * ns.new_tokens / peft_eager)
                rows.append(r)
                print(f"{mode:8s} N={n:3d} batch={b}: decode {r['ours_decode_tok_s']:.1f} vs "
                      f"{r['peft_decode_tok_s']:.1f} tok/s ({r['decode_speedup']:.2f}x, {r['speedup_vs_peft_eager']:.2f}x "
                      f"PEFT eager; base model alone {r['base_decode_tok_s']:.1f}, ceiling {r['decode_ceiling']:.2f}x); "
                      f"prefill {r['ours_prefill_ms']:.0f} vs {r['peft_prefill_ms']:.0f} ms ({r['prefill_speedup']:.2f}x)")  # fmt: skip
    command = "python benchmarks/arrow_speed.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    result = {"command": command, "date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(),
              "config": vars(ns), "rows": rows}  # fmt: skip
    if ns.json:
        save_json(result, ns.json)
    if ns.markdown:
        lines = [
            "## Arrow routing: PEFT's create_arrow_model vs ours",
            "",
            f"Produced by `{command}` ({result['date']}, {result['torch_threads']} torch threads, CPU, fp32, the "
            f"embedded SmolLM2; N random rank-8 LoRAs on q/v, top_k {ns.top_k}, a {ns.prompt_tokens}-token prompt, "
            f"{ns.new_tokens} new tokens, medians of {ns.repeats} interleaved repeats). Both route every token among "
            "all N; PEFT forms every expert's output (tokens x N x d_out) and weights it, ours applies the N "
            "experts' rank rows as one dense matmul masked by each token's coefficients. The base model alone "
            "(no adapter, no routing) is the ceiling of both: its speed over PEFT's is the most any Arrow could gain. "
            "`compiled` rows run every model's decode steps compiled over a static KV cache (prefill stays eager); "
            "the last column compares ours with PEFT's Arrow as PEFT runs it, eager.",
            "",
            "| decode | N | batch | decode tok/s ours | decode tok/s PEFT | ours / PEFT | base model alone tok/s | "
            "ceiling (base / PEFT) | prefill ms ours | prefill ms PEFT | prefill ms base | prefill speedup | "
            "ours / PEFT eager |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]  # fmt: skip
        for r in rows:
            lines.append(f"| {r['decode']} | {r['N']} | {r['batch']} | {r['ours_decode_tok_s']:.1f} | "
                         f"{r['peft_decode_tok_s']:.1f} | {r['decode_speedup']:.2f}x | {r['base_decode_tok_s']:.1f} | "
                         f"{r['decode_ceiling']:.2f}x | {r['ours_prefill_ms']:.0f} | {r['peft_prefill_ms']:.0f} | "
                         f"{r['base_prefill_ms']:.0f} | {r['prefill_speedup']:.2f}x | {r['speedup_vs_peft_eager']:.2f}x |")  # fmt: skip
        write_section(Path(ns.markdown), "## Arrow routing", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
