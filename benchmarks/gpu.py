"""Fusion latency and peak memory on an accelerator: base vs peft vs fused banks of N = 26 / 50 / 100.

    python benchmarks/gpu.py                                   # cuda, bfloat16, the embedded SmolLM2
    python benchmarks/gpu.py --dtype float32 --json docs/gpu.json --markdown docs/gpu.md
    python benchmarks/gpu.py --device cpu --quick              # smoke run where there is no GPU

Every configuration decodes with the library's loop (`dlp_lora.bench.fusion.decode_tokens` over `Engine.generate`,
greedy, a fixed number of new tokens: EOS is never a stop here) and is timed with `torch.cuda.synchronize()` on both
sides, so the ratios compare the LoRA machinery and nothing else. Peak memory is
`torch.cuda.max_memory_allocated` over each configuration (reset before it). Medians over interleaved
repeats. It refuses `--device cuda` where CUDA is missing, rather than timing a CPU by mistake.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dlp_lora.bench.fusion import decode_tokens, random_adapters, random_mixtures
from dlp_lora.fusion.inject import FusedLoRAModel
from dlp_lora.models import load_base_model, resolve_device, resolve_dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(model, ids: torch.Tensor, new_tokens: int, device: torch.device) -> dict:
    """Prefill ms (one token generated), decode ms per token, peak memory MB of one configuration."""

    def timed(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        decode_tokens(model, ids, n)
        _sync(device)
        return time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill = timed(1)
    total = timed(new_tokens)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {
        "prefill_ms": 1000 * prefill,
        "decode_ms_per_token": 1000 * (total - prefill) / max(new_tokens - 1, 1),
        "peak_mb": peak,
    }


def _one_repeat(model, args, paths: dict[str, Path], prompts: dict[int, torch.Tensor], device, g) -> list[dict]:
    from peft import PeftModel

    rows = []

    def record(method: str, n: int, b: int, path: str, ref=None) -> None:
        rows.append(
            {
                "method": method,
                "N": n,
                "k": args.k if method == "fused" else (1 if n else 0),
                "batch": b,
                "path": path,
                **_measure(ref or model, prompts[b], args.new_tokens, device),
            }
        )

    for b in args.batch_sizes:
        record("base", 0, b, "-")
    peft_model = PeftModel.from_pretrained(model, paths["task000"]).to(device)  # fp32 LoRA weights, as peft keeps
    for b in args.batch_sizes:
        record("peft", 1, b, "peft", peft_model)
    peft_model.unload()
    for n in args.num_adapters:
        fused = FusedLoRAModel(model, {name: paths[name] for name in list(paths)[:n]})
        try:
            for b in args.batch_sizes:
                with fused.routed(random_mixtures(b, n, min(args.k, n), g)) as active:
                    record("fused", n, b, active.path)
        finally:
            fused.remove()
    return rows


def run(args: argparse.Namespace) -> dict:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: this benchmark needs one (use --device cpu for a smoke run)")
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    model, _ = load_base_model(args.base_model, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    prompts = {b: torch.randint(100, vocab, (b, args.prompt_tokens), generator=g).to(device) for b in args.batch_sizes}
    raw: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = random_adapters(
            model, max(args.num_adapters), args.rank, Path(tmp), targets=("q_proj", "k_proj", "v_proj", "o_proj")
        )
        _measure(model, prompts[max(args.batch_sizes)], 2, device)  # warm-up: kernels, allocator
        for rep in range(args.repeats):
            raw += [{**r, "repeat": rep} for r in _one_repeat(model, args, paths, prompts, device, g)]
    keys = list(dict.fromkeys((r["method"], r["N"], r["batch"]) for r in raw))
    table = []
    for key in keys:
        rows = [r for r in raw if (r["method"], r["N"], r["batch"]) == key]
        table.append(
            {
                **{k: rows[0][k] for k in ("method", "N", "k", "batch", "path")},
                **{m: statistics.median(r[m] for r in rows) for m in ("prefill_ms", "decode_ms_per_token")},
                "peak_mb": max(r["peak_mb"] for r in rows),
            }
        )
    for r in table:
        same = {m["method"]: m["decode_ms_per_token"] for m in table if m["batch"] == r["batch"] and m["N"] <= 1}
        r["vs_base"] = r["decode_ms_per_token"] / same["base"]
        r["vs_peft"] = r["decode_ms_per_token"] / same["peft"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "config": vars(args),
        "rows": table,
        "raw": raw,
    }


def markdown(result: dict, command: str) -> str:
    cfg = result["config"]
    lines = [
        "## Fusion on an accelerator",
        "",
        f"Produced by `{command}` on {result['device']} ({result['dtype']}, torch {result['torch']}). "
        f"Prompts of {cfg['prompt_tokens']} tokens, {cfg['new_tokens']} new tokens, median of {cfg['repeats']} "
        f"interleaved repeats; random rank-{cfg['rank']} q/k/v/o adapters, k = {cfg['k']} per row, every row "
        "its own mixture; peak memory is torch.cuda.max_memory_allocated.",
        "",
        "| method | N loaded | k | batch | path | prefill ms | decode ms/token | vs base | vs peft | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {r['N'] or '-'} | {r['k'] or '-'} | {r['batch']} | {r['path']} | "
            f"{r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | {r['vs_base']:.3f} | "
            f"{r['vs_peft']:.3f} | {r['peak_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="default: cuda (refused where CUDA is missing)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--base-model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--num-adapters", type=int, nargs="+", default=[26, 50, 100])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--k", type=int, default=2, help="adapters fused per row")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="N 26, batch 1 and 4, 8 new tokens, 1 repeat")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    if args.quick:
        args.num_adapters, args.batch_sizes, args.new_tokens, args.repeats, args.prompt_tokens = [26], [1, 4], 8, 1, 32
    result = run(args)
    table = markdown(
        result, "python benchmarks/gpu.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    )
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)


if __name__ == "__main__":
    main()
