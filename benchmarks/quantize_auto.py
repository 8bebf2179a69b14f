"""`--quantize auto` against fp32 and int8 on this CPU: decode and prefill of the embedded model, side by side.

Loads the embedded SmolLM2 once and times, in one interleaved run (`dlp_lora.bench.fusion`), the base model and a
fused model with 26 random rank-8 adapters (a merged k=3 mixture at batch 1, a different k=3 mixture per row at
batch 8) on each of fp32, int8 and auto. Writes one entry per CPU into the JSON file (keyed by `--label`, with
the CPU's model name, flags, torch's kernel level and what `auto` chose for each linear shape), so runs on
several machines accumulate in one file:

    python benchmarks/quantize_auto.py --label "EPYC, AVX-512 VNNI" --json docs/quantize_auto.json
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/quantize_auto.py \\
        --label "same CPU limited to AVX2 (no VNNI)" --json docs/quantize_auto.json

The second line caps oneDNN (which runs `torch._int_mm` and the bf16 matmuls) and torch's own kernels at AVX2:
the instruction set of a CPU without VNNI, on this machine. Run on a quiet machine (no training alongside).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dlp_lora.bench.fusion import run_fusion_benchmark
from dlp_lora.config import BenchConfig
from dlp_lora.hardware import cpu_info
from dlp_lora.models import load_base_model
from dlp_lora.quantize import choose_kernels

SCHEMES = ("none", "int8", "auto")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True, help="name of this CPU's entry in the JSON file")
    ap.add_argument("--json", default="docs/quantize_auto.json")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model, _ = load_base_model()
    choices = choose_kernels(model)
    cfg = BenchConfig(
        num_adapters=(26,),
        batch_sizes=(1, 8),
        ks=(3,),
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        quantize=SCHEMES,
    )
    result = run_fusion_benchmark(model, cfg)
    rows = [
        {
            k: r[k]
            for k in ("method", "quantize", "batch", "decode_ms_per_token", "decode_tok_per_s", "prefill_ms")
            if k in r
        }
        for r in result["rows"]
    ]
    entry = {
        "cpu": cpu_info().as_dict(),
        "threads": torch.get_num_threads(),
        "env": {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ},
        "auto_choice": [
            {
                "d_in": c.d_in,
                "d_out": c.d_out,
                "layers": c.layers,
                "fp32_ms": c.fp32_ms,
                "int8_ms": c.int8_ms,
                "int8": c.int8,
            }
            for c in choices
        ],
        "config": {
            "adapters": 26,
            "k": 3,
            "prompt_tokens": cfg.prompt_tokens,
            "new_tokens": cfg.new_tokens,
            "repeats": cfg.repeats,
        },
        "rows": rows,
    }
    path = Path(args.json)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[args.label] = entry
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"{args.label}: {cpu_info()}")
    print("auto chose:", "; ".join(f"{c.d_in}->{c.d_out} {'int8' if c.int8 else 'fp32'}" for c in choices))
    print("| base | method | batch | decode ms/token | tok/s | prefill ms |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['quantize']} | {r['method']} | {r['batch']} | {r['decode_ms_per_token']:.1f} | "
            f"{r['decode_tok_per_s']:.1f} | {r.get('prefill_ms', float('nan')):.0f} |"
        )


if __name__ == "__main__":
    main()
