"""Fusion latency benchmark: base vs peft vs fused mixtures, timed side by side in one process.

Every configuration decodes with the same loop (transformers' `generate`, greedy, a fixed number of new
tokens), so the ratios compare the LoRA machinery and nothing else. Timings are medians over repeats,
and the configurations of one repeat are interleaved so that machine drift hits all of them alike.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from dlp_lora.adapters.io import LoraModuleWeights, write_peft_adapter
from dlp_lora.config import BenchConfig
from dlp_lora.fusion.inject import FusedLoRAModel

__all__ = ["run_fusion_benchmark", "markdown_table", "save_json"]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _random_adapters(model: torch.nn.Module, n: int, rank: int, root: Path, seed: int) -> dict[str, Path]:
    g = torch.Generator().manual_seed(seed)
    targets = [name for name, m in model.named_modules() if name.endswith(("q_proj", "v_proj"))]
    out = {}
    for i in range(n):
        modules = {}
        for name in targets:
            layer = model.get_submodule(name)
            A = torch.randn(rank, layer.in_features, generator=g) / layer.in_features ** 0.5
            B = torch.randn(layer.out_features, rank, generator=g) * 0.01
            modules[name] = LoraModuleWeights(A=A, B=B, scale=2.0)
        out[f"task{i:03d}"] = write_peft_adapter(root / f"task{i:03d}", modules, "bench")
    return out


def _mixtures(batch: int, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(batch, n) weights: each row k distinct adapters with random positive weights summing to one."""
    w = torch.zeros(batch, n)
    for b in range(batch):
        idx = torch.randperm(n, generator=g)[:k]
        w[b, idx] = torch.softmax(torch.randn(k, generator=g), 0)
    return w


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _generate(model, ids: torch.Tensor, n: int) -> None:
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                   do_sample=False, pad_token_id=0)


def _measure(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens) with one shared decoding loop.

    Decode is the difference between generating new_tokens and generating one token, so prefill and
    the loop's set-up cancel out; it is scaled back to new_tokens steps.
    """
    with torch.no_grad():
        prefill = _time(lambda: _generate(model, ids, 1))
        total = _time(lambda: _generate(model, ids, new_tokens))
    return prefill, (total - prefill) * new_tokens / max(new_tokens - 1, 1)


def _one_repeat(model, cfg: BenchConfig, paths: dict[str, Path], prompts: dict[int, torch.Tensor],
                g: torch.Generator, bar) -> list[dict]:
    from peft import PeftModel

    rows: list[dict] = []

    def record(method: str, n: int, k: int, b: int, path: str, extra: dict | None = None) -> None:
        prefill, decode = _measure(model, prompts[b], cfg.new_tokens)
        rows.append({"method": method, "N": n, "k": k, "batch": b, "path": path, "prefill_s": prefill,
                     "decode_s": decode, **(extra or {})})
        bar.update(1)

    for b in cfg.batch_sizes:
        record("base", 0, 0, b, "-")
    peft_model = PeftModel.from_pretrained(model, paths["task000"])
    for b in cfg.batch_sizes:
        record("peft", 1, 1, b, "peft")
    peft_model.unload()
    for n in cfg.num_adapters:
        fused = FusedLoRAModel(model, {name: paths[name] for name in list(paths)[:n]})
        mem = {"bank_mb": fused.bank.num_bytes() / 2**20, "rss_mb": _rss_mb()}
        try:
            for b in cfg.batch_sizes:
                for k in cfg.ks:
                    with fused.routed(_mixtures(b, n, min(k, n), g)) as active:
                        record("fused", n, k, b, active.path, mem)
        finally:
            fused.remove()
    return rows


def run_fusion_benchmark(model: torch.nn.Module, cfg: BenchConfig = BenchConfig(), progress: bool = True) -> dict:
    """Run every configuration `cfg.repeats` times; return raw rows, medians and the headline ratios."""
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = model.get_input_embeddings().num_embeddings
    prompts = {b: torch.randint(100, vocab, (b, cfg.prompt_tokens), generator=g) for b in cfg.batch_sizes}
    per_repeat = len(cfg.batch_sizes) * (2 + len(cfg.num_adapters) * len(cfg.ks))
    raw: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=per_repeat * cfg.repeats, desc="bench",
                                                     disable=not progress) as bar:
        paths = _random_adapters(model, max(cfg.num_adapters), cfg.rank, Path(tmp), cfg.seed)
        _measure(model, prompts[max(cfg.batch_sizes)], 2)  # warm-up: first calls pay one-time allocation costs
        for rep in range(cfg.repeats):
            raw += [{**row, "repeat": rep} for row in _one_repeat(model, cfg, paths, prompts, g, bar)]
    table = _medians(raw, cfg)
    return {"config": asdict(cfg), "torch_threads": torch.get_num_threads(), "rows": table,
            "ratios": _ratios(table), "peak_rss_mb": _peak_rss_mb(), "raw": raw}


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _medians(raw: list[dict], cfg: BenchConfig) -> list[dict]:
    keys = sorted({(r["method"], r["N"], r["k"], r["batch"]) for r in raw},
                  key=lambda t: (t[3], ["base", "peft", "fused"].index(t[0]), t[1], t[2]))
    out = []
    for key in keys:
        rows = [r for r in raw if (r["method"], r["N"], r["k"], r["batch"]) == key]
        decode = statistics.median(r["decode_s"] for r in rows)
        out.append({"method": key[0], "N": key[1], "k": key[2], "batch": key[3], "path": rows[0]["path"],
                    "prefill_ms": 1000 * statistics.median(r["prefill_s"] for r in rows),
                    "decode_ms_per_token": 1000 * decode / cfg.new_tokens,
                    "decode_tok_per_s": key[3] * cfg.new_tokens / decode if decode else float("nan"),
                    "bank_mb": rows[0].get("bank_mb"), "rss_mb": rows[0].get("rss_mb")})
    return out


def _ratios(table: list[dict]) -> dict:
    """Decode-time ratios behind the targets: vs base, vs peft (same batch), and N=max vs N=min (same k)."""
    def get(method: str, b: int, n: int = 0, k: int = 0) -> float | None:
        hit = [r["decode_ms_per_token"] for r in table if (r["method"], r["batch"], r["N"], r["k"]) == (method, b, n, k)]
        return hit[0] if hit else None

    out: dict[str, float] = {}
    ns = sorted({r["N"] for r in table if r["method"] == "fused"})
    for r in table:
        if r["method"] != "fused":
            continue
        tag = f"N{r['N']}_k{r['k']}_b{r['batch']}"
        base, peft = get("base", r["batch"]), get("peft", r["batch"], 1, 1)
        small = get("fused", r["batch"], ns[0], r["k"])
        out[f"{tag}_vs_base"] = r["decode_ms_per_token"] / base if base else float("nan")
        out[f"{tag}_vs_peft"] = r["decode_ms_per_token"] / peft if peft else float("nan")
        if small:
            out[f"{tag}_vs_N{ns[0]}"] = r["decode_ms_per_token"] / small
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(result: dict, command: str) -> str:
    """The benchmark as a markdown section (what docs/performance.md holds)."""
    cfg = result["config"]
    lines = [
        "## Fusion latency", "",
        f"Produced by `{command}` on this machine ({result['torch_threads']} torch threads, CPU, fp32). "
        f"Prompts of {cfg['prompt_tokens']} tokens, {cfg['new_tokens']} new tokens, median of {cfg['repeats']} "
        f"interleaved repeats; random rank-{cfg['rank']} q_proj/v_proj adapters. Decode ratios are against "
        "the base model and against one adapter through peft at the same batch size; at batch > 1 every row "
        "has a different mixture.", "",
        "| method | N loaded | k fused | batch | path | prefill ms | decode ms/token | tok/s | vs base | vs peft |"
        " bank MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = result["ratios"]
    for r in result["rows"]:
        tag = f"N{r['N']}_k{r['k']}_b{r['batch']}"
        vb = ratios.get(f"{tag}_vs_base") if r["method"] == "fused" else None
        vp = ratios.get(f"{tag}_vs_peft") if r["method"] == "fused" else None
        lines.append(
            f"| {r['method']} | {r['N'] or '-'} | {r['k'] or '-'} | {r['batch']} | {r['path']} | "
            f"{r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | {r['decode_tok_per_s']:.1f} | "
            f"{_fmt(vb, 3)} | {_fmt(vp, 3)} | "
            f"{_fmt(r['bank_mb'])} |"
        )
    lines += ["", f"Peak resident memory of the whole run: {result['peak_rss_mb']:.0f} MB.", ""]
    return "\n".join(lines)


def save_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
