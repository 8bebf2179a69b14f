"""Which int8 implementation backs `--quantize int8`: speed, error and row independence, side by side.

For each linear shape of SmolLM2-135M (attention 576x576, MLP 1536x576 / 576x1536, the 49152x576 LM
head) at 1 and 8 rows (one decode step at batch 1 and 8) and 1024 rows (a batch-8 prefill of 128 tokens; not
for the head), times in one run, as one thread's CPU time (median):
  fp32                F.linear on the float weight (the yardstick);
  torch_dynamic       torch.ao `quantize_dynamic` (fbgemm): int8 weight per channel, ONE activation scale
                      for the whole input tensor;
  ours_int_mm         `dlp_lora.quantize.Int8Linear`: int8 weight per channel, one activation scale PER
                      TOKEN, torch._int_mm (int32 accumulation);
  torchao_w8 / _w8a8  torchao `Int8WeightOnlyConfig` / `Int8DynamicActivationInt8WeightConfig` in eager
                      mode (only when torchao is installed; it is not a dependency).
It also reports each one's max error against fp32 and whether a row's output changes when other rows
share its batch ("row-dependent"), which breaks the rule that a mixed batch equals its rows alone.

    /work/bench_lock.sh python benchmarks/int8_choice.py --json docs/int8_choice.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dlp_lora.quantize import Int8Linear

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (d_out, d_in)


def _time(fn, reps: int) -> float:
    """Median CPU ms of one thread over `reps` calls after warm-up.

    One torch thread and thread CPU time, not wall time: the kernels are compared on cost, and the number
    holds on a machine shared with other jobs (wall time there measures the neighbours).
    """
    samples = []
    with torch.no_grad():
        for _ in range(3):
            fn()
        for _ in range(reps):
            t0 = time.thread_time()
            fn()
            samples.append(time.thread_time() - t0)
    return 1000 * statistics.median(samples)


def _variants(lin: nn.Linear) -> dict:
    out = {"fp32": lin, "ours_int_mm": Int8Linear.from_linear(lin)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["torch_dynamic"] = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(copy.deepcopy(lin)),
            {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
            dtype=torch.qint8,
        )[0]
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
        for name, cfg in (
            ("torchao_w8", Int8WeightOnlyConfig()),
            ("torchao_w8a8", Int8DynamicActivationInt8WeightConfig()),
        ):
            m = nn.Sequential(copy.deepcopy(lin))
            quantize_(m, cfg)
            out[name] = m
    except ImportError:
        pass
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="int8 implementation choice")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = []
    for d_out, d_in in SHAPES:
        lin = nn.Linear(d_in, d_out, bias=False)
        variants = _variants(lin)
        for batch in (1, 8) if d_out > 10_000 else (1, 8, 1024):
            x = torch.randn(batch, d_in)
            with torch.no_grad():
                ref = F.linear(x, lin.weight)
                for name, m in variants.items():
                    together, alone = m(x), m(x[3 % batch :][:1])
                    reps = ns.reps if not name.startswith("torchao") and batch < 1024 else max(3, ns.reps // 10)
                    rows.append(
                        {
                            "shape": f"{d_out}x{d_in}",
                            "batch": batch,
                            "impl": name,
                            "ms": _time(lambda: m(x), reps),
                            "max_abs_err": (together - ref).abs().max().item(),
                            # float GEMMs differ in the last bits by batch shape; quantization
                            # scales shared across rows differ far more than that
                            "row_dependent": (together[3 % batch] - alone[0]).abs().max().item()
                            > 1e-4 * ref.abs().max().item(),
                        }
                    )
    for r in rows:
        fp32 = next(q["ms"] for q in rows if (q["shape"], q["batch"], q["impl"]) == (r["shape"], r["batch"], "fp32"))
        r["vs_fp32"] = r["ms"] / fp32
        print(
            f"{r['shape']:>10} b{r['batch']} {r['impl']:>14}: {r['ms']:8.3f} ms  x{r['vs_fp32']:6.2f} of fp32  "
            f"err {r['max_abs_err']:.4f}  {'row-dependent' if r['row_dependent'] else 'rows independent'}"
        )
    result = {
        "command": "python benchmarks/int8_choice.py",
        "torch": torch.__version__,
        "threads": 1,
        "timer": "thread CPU time, median",
        "rows": rows,
    }
    if ns.json:
        with open(ns.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
