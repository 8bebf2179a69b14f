"""Fusion latency benchmark: base vs peft vs fused mixtures, timed side by side in one process.

Every configuration decodes with the library's own loop (`Engine.generate`, greedy, a fixed number of
new tokens, EOS ignored), so the ratios compare the LoRA machinery and nothing else. Each
configuration runs on the fp32 base and on its int8 copy (`cfg.quantize`), eagerly and, with `cfg.compile`,
also compiled (`dlp_lora.compiled`; its one-time compilation is done before timing), and optionally
llama.cpp runs the embedded GGUF at batch 1. Timings are medians over repeats, and the configurations of
one repeat are interleaved so that machine drift hits all of them alike.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dlp_lora.adapters.io import LoraModuleWeights, write_peft_adapter
from dlp_lora.bench import rss_mb, timed
from dlp_lora.compiled import CompiledDecoder
from dlp_lora.config import BenchConfig, GenerationConfig
from dlp_lora.engine import Decoder, Engine, Row
from dlp_lora.fusion.inject import FusedLoRAModel
from dlp_lora.quantize import quantize_model

__all__ = [
    "decode_tokens",
    "time_generation",
    "run_fusion_benchmark",
    "markdown_table",
    "random_adapters",
    "random_mixtures",
]


def random_adapters(
    model: torch.nn.Module,
    n: int,
    rank: int,
    root: Path,
    seed: int = 0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
) -> dict[str, Path]:
    """n random rank-`rank` LoRAs on every linear named by `targets`, written as PEFT dirs (fp16 on disk)."""
    g = torch.Generator().manual_seed(seed)
    names = [name for name, m in model.named_modules() if name.endswith(targets)]
    out = {}
    for i in range(n):
        modules = {}
        for name in names:
            layer = model.get_submodule(name)
            A = torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5
            B = torch.randn(layer.out_features, rank, generator=g) * 0.01
            modules[name] = LoraModuleWeights(A=A, B=B, scale=2.0)
        out[f"task{i:03d}"] = write_peft_adapter(root / f"task{i:03d}", modules, "bench")
    return out


def random_mixtures(batch: int, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(batch, n) weights: each row k distinct adapters with random positive weights summing to one."""
    w = torch.zeros(batch, n)
    for b in range(batch):
        idx = torch.randperm(n, generator=g)[:k]
        w[b, idx] = torch.softmax(torch.randn(k, generator=g), 0)
    return w


def clock_of(cfg: BenchConfig) -> Callable[[], float]:
    """perf_counter for wall time; process_time (CPU time of every thread of this process) for `cpu`."""
    return time.process_time if cfg.clock == "cpu" else time.perf_counter


class _NoText:
    """What `Engine` needs of a tokenizer when every row decodes a fixed number of tokens and no text."""

    eos_token_id = None
    pad_token_id = 0


def decode_tokens(model: torch.nn.Module, ids: torch.Tensor, n: int, decoder: Decoder | None = None) -> None:
    """n greedy tokens for every row of ids (B, T): the prefill gives the first, n - 1 steps the rest. The
    model runs as the caller routed it (the engine sees a plain model and rows without mixtures)."""
    params = GenerationConfig(max_new_tokens=n, ignore_eos=True)
    Engine(model, _NoText(), decoder).generate([Row(prompt_ids=r, mixture={}, params=params) for r in ids.tolist()])


def time_generation(
    model,
    ids: torch.Tensor,
    new_tokens: int,
    clock: Callable[[], float] = time.perf_counter,
    compiled: Decoder | None = None,
) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens) with one shared decoding loop (eager unless a
    compiled decoder is given).

    Decode is the difference between generating new_tokens and generating one token, so prefill and
    the loop's set-up cancel out; it is scaled back to new_tokens steps.
    """

    with torch.no_grad():
        prefill = timed(lambda: decode_tokens(model, ids, 1, compiled), clock)
        total = timed(lambda: decode_tokens(model, ids, new_tokens, compiled), clock)
    return prefill, (total - prefill) * new_tokens / max(new_tokens - 1, 1)


def _one_repeat(
    model,
    quant: str,
    cfg: BenchConfig,
    paths: dict[str, Path],
    prompts: dict[int, torch.Tensor],
    g: torch.Generator,
    bar,
    compiled: Decoder | None = None,
    warmed: set | None = None,
) -> list[dict]:
    """One pass over the configurations on `model`; with `compiled`, base and fused rows run twice (eager,
    compiled). `warmed`: the compiled configurations already compiled (kept across repeats)."""
    from peft import PeftModel

    rows: list[dict] = []

    def record(method: str, n: int, k: int, b: int, path: str, extra: dict | None = None) -> None:
        for dec in (None, compiled) if method != "peft" else (None,):
            if dec is not None and (method, n, k, b) not in warmed:  # compile now, outside the timing
                time_generation(model, prompts[b], 2, compiled=dec)
                warmed.add((method, n, k, b))
            prefill, decode = time_generation(model, prompts[b], cfg.new_tokens, clock_of(cfg), dec)
            rows.append(
                {
                    "method": method,
                    "quantize": quant,
                    "compiled": dec is not None,
                    "N": n,
                    "k": k,
                    "batch": b,
                    "path": path,
                    "prefill_s": prefill,
                    "decode_s": decode,
                    **(extra or {}),
                }
            )
            bar.update(1)

    for b in cfg.batch_sizes:
        record("base", 0, 0, b, "-")
    if quant == "none":  # peft wraps float nn.Linear layers only; its row is the fp32 yardstick
        peft_model = PeftModel.from_pretrained(model, paths["task000"])
        for b in cfg.batch_sizes:
            record("peft", 1, 1, b, "peft")
        peft_model.unload()
    for n in cfg.num_adapters:
        fused = FusedLoRAModel(model, {name: paths[name] for name in list(paths)[:n]})
        mem = {"bank_mb": fused.bank.num_bytes() / 2**20, "rss_mb": rss_mb()}
        try:
            for b in cfg.batch_sizes:
                for k in cfg.ks:
                    with fused.routed(random_mixtures(b, n, min(k, n), g)) as active:
                        record("fused", n, k, b, active.path, mem)
        finally:
            fused.remove()
    return rows


def run_fusion_benchmark(model: torch.nn.Module, cfg: BenchConfig = BenchConfig(), progress: bool = True) -> dict:
    """Run every configuration `cfg.repeats` times; return raw rows, medians and the headline ratios."""
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = model.get_input_embeddings().num_embeddings
    prompts = {b: torch.randint(100, vocab, (b, cfg.prompt_tokens), generator=g) for b in cfg.batch_sizes}
    # The fp32 model is the caller's; the int8 one a copy, so both are timed in one interleaved run.
    models = {q: model if q == "none" else quantize_model(copy.deepcopy(model), q) for q in cfg.quantize}
    llama = None
    if cfg.llamacpp:
        from dlp_lora.bench.llamacpp import LlamaCppTimer

        llama = LlamaCppTimer(cfg.prompt_tokens, cfg.new_tokens, torch.get_num_threads(), clock_of(cfg))
        prompts.setdefault(1, torch.randint(100, vocab, (1, cfg.prompt_tokens), generator=g))
    runs = 2 if cfg.compile else 1  # base and fused rows: eager, and compiled
    per_quant = runs * (1 + len(cfg.num_adapters) * len(cfg.ks))  # base, fused rows; peft once, fp32 only
    per_repeat = sum(len(cfg.batch_sizes) * ((q == "none") + per_quant) for q in cfg.quantize) + (llama is not None)
    compiled = {q: CompiledDecoder(m) for q, m in models.items()} if cfg.compile else {}
    warmed: dict[str, set] = {q: set() for q in models}
    raw: list[dict] = []
    # Every (batch, path, k, N) is its own graph: more than dynamo's default of 8 per function.
    limits = torch._dynamo.config.patch(recompile_limit=256) if cfg.compile else contextlib.nullcontext()
    with (
        limits,
        tempfile.TemporaryDirectory() as tmp,
        tqdm(total=per_repeat * cfg.repeats, desc="bench", disable=not progress) as bar,
    ):
        paths = random_adapters(model, max(cfg.num_adapters), cfg.rank, Path(tmp), cfg.seed)
        for m in models.values():  # warm-up: first calls pay one-time allocation costs
            time_generation(m, prompts[max(cfg.batch_sizes)], 2)
        if llama is not None:
            llama.measure(prompts[1])
        for rep in range(cfg.repeats):
            for quant, m in models.items():
                raw += [
                    {**row, "repeat": rep}
                    for row in _one_repeat(m, quant, cfg, paths, prompts, g, bar, compiled.get(quant), warmed[quant])
                ]
            if llama is not None:
                prefill, decode = llama.measure(prompts[1])
                raw.append(
                    {
                        "method": "llama.cpp",
                        "quantize": "gguf",
                        "compiled": False,
                        "N": 0,
                        "k": 0,
                        "batch": 1,
                        "path": "-",
                        "prefill_s": prefill,
                        "decode_s": decode,
                        "repeat": rep,
                    }
                )
                bar.update(1)
    table = _medians(raw, cfg)
    return {
        "config": asdict(cfg),
        "torch_threads": torch.get_num_threads(),
        "rows": table,
        "ratios": _ratios(table),
        "peak_rss_mb": _peakrss_mb(),
        "llamacpp": None if llama is None else {"version": llama.version, "gguf": llama.gguf.name},
        "raw": raw,
    }


def _peakrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_METHODS = ["llama.cpp", "base", "peft", "fused"]
_BASES = {"none": "fp32", "int8": "int8", "auto": "auto (int8 where faster)", "gguf": "Q4_1 GGUF"}


def _key(r: dict) -> tuple:
    return r["method"], r["quantize"], r["N"], r["k"], r["batch"], r["compiled"]


def _medians(raw: list[dict], cfg: BenchConfig) -> list[dict]:
    keys = sorted(
        {_key(r) for r in raw},
        key=lambda t: (t[4], _METHODS.index(t[0]) > 1, t[2], t[3], _METHODS.index(t[0]), t[1] != "none", t[5]),
    )
    out = []
    for key in keys:
        rows = [r for r in raw if _key(r) == key]
        decode = statistics.median(r["decode_s"] for r in rows)
        out.append(
            {
                "method": key[0],
                "quantize": key[1],
                "compiled": key[5],
                "N": key[2],
                "k": key[3],
                "batch": key[4],
                "path": rows[0]["path"],
                "prefill_ms": 1000 * statistics.median(r["prefill_s"] for r in rows),
                "decode_ms_per_token": 1000 * decode / cfg.new_tokens,
                "decode_tok_per_s": key[4] * cfg.new_tokens / decode if decode else float("nan"),
                "bank_mb": rows[0].get("bank_mb"),
                "rss_mb": rows[0].get("rss_mb"),
            }
        )
    return out


def _tag(r: dict) -> str:
    """fp32 eager rows keep the historical keys (N26_k3_b8); int8 and compiled rows are prefixed
    (int8_N26_k3_b8, int8_compiled_N26_k3_b8)."""
    body = "base" if r["method"] == "base" else f"N{r['N']}_k{r['k']}"
    return (
        ("" if r["quantize"] == "none" else r["quantize"] + "_")
        + ("compiled_" if r["compiled"] else "")
        + f"{body}_b{r['batch']}"
    )


def _ratios(table: list[dict]) -> dict:
    """Decode-time ratios behind the targets, each between two rows of the same run.

    vs_base / vs_N<min>: against the same base weights and decoder (eager or compiled); vs_peft: against
    one adapter through peft (fp32, eager);
    vs_fp32: an int8 row against the same configuration on fp32 (ms/token; < 1 is faster);
    tok_s_vs_fp32_base: int8 tokens/s against the plain fp32 base at the same batch, eager (> 1 is faster);
    vs_eager: a compiled row against the same row run eagerly;
    vs_llamacpp: a batch-1 row against llama.cpp's ms/token on the GGUF.
    """

    def get(method: str, b: int, n: int = 0, k: int = 0, quant: str = "none", compiled: bool = False) -> dict | None:
        return next((r for r in table if _key(r) == (method, quant, n, k, b, compiled)), None)

    out: dict[str, float] = {}
    ns = sorted({r["N"] for r in table if r["method"] == "fused"})
    llama = get("llama.cpp", 1, quant="gguf")
    for r in table:
        if r["method"] not in ("base", "fused"):
            continue
        tag, ms, q, b, c = _tag(r), r["decode_ms_per_token"], r["quantize"], r["batch"], r["compiled"]
        if c:
            eager = get(r["method"], b, r["N"], r["k"], q)
            if eager:
                out[f"{tag}_vs_eager"] = ms / eager["decode_ms_per_token"]
        if r["method"] == "fused":
            base, peft = get("base", b, quant=q, compiled=c), get("peft", b, 1, 1)
            small = get("fused", b, ns[0], r["k"], q, c)
            out[f"{tag}_vs_base"] = ms / base["decode_ms_per_token"] if base else float("nan")
            out[f"{tag}_vs_peft"] = ms / peft["decode_ms_per_token"] if peft else float("nan")
            if small:
                out[f"{tag}_vs_N{ns[0]}"] = ms / small["decode_ms_per_token"]
        if q != "none":
            same, fp32_base = get(r["method"], b, r["N"], r["k"], compiled=c), get("base", b)
            if same:
                out[f"{tag}_vs_fp32"] = ms / same["decode_ms_per_token"]
            if fp32_base:
                out[f"{tag}_tok_s_vs_fp32_base"] = r["decode_tok_per_s"] / fp32_base["decode_tok_per_s"]
        if llama and b == 1:
            out[f"{tag}_vs_llamacpp"] = ms / llama["decode_ms_per_token"]
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(result: dict, command: str) -> str:
    """The benchmark as a markdown section (what docs/performance.md holds)."""
    cfg = result["config"]
    llama = result.get("llamacpp")
    lines = [
        "## Fusion latency",
        "",
        f"Produced by `{command}` on this machine ({result['torch_threads']} torch threads, CPU; "
        + ("times are this process's CPU time, not wall time). " if cfg.get("clock") == "cpu" else "wall time). ")
        + f"Prompts of {cfg['prompt_tokens']} tokens, {cfg['new_tokens']} new tokens, median of {cfg['repeats']} "
        f"interleaved repeats; random rank-{cfg['rank']} q_proj/v_proj adapters. Base weights: fp32 and/or "
        "int8 (`--quantize int8`: int8 weights, per-token int8 activations; adapters stay fp32). Decode "
        "ratios are against the base model with the same weights and decoder, against one adapter through peft "
        "(fp32, eager) at the same batch size, against the same row on fp32 (int8 rows), against the same row "
        "run eagerly (compiled rows: `--compile`, torch.compile over a static KV cache, compiled before timing)"
        + (
            f", and against llama.cpp (llama-cpp-python {llama['version']}, {llama['gguf']}) at batch 1"
            if llama
            else ""
        )
        + "; at batch > 1 every row has a different mixture.",
        "",
        "| base weights | method | decoder | N loaded | k fused | batch | path | prefill ms | decode ms/token | "
        "tok/s | vs base | vs peft | vs fp32 | vs eager | vs llama.cpp | bank MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = result["ratios"]
    for r in result["rows"]:
        tag = _tag(r) if r["method"] in ("base", "fused") else ""
        fused = r["method"] == "fused"
        lines.append(
            f"| {_BASES[r['quantize']]} | {r['method']} | {'compiled' if r['compiled'] else 'eager'} | "
            f"{r['N'] or '-'} | {r['k'] or '-'} | {r['batch']} | "
            f"{r['path']} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | {r['decode_tok_per_s']:.1f} | "
            f"{_fmt(ratios.get(f'{tag}_vs_base') if fused else None, 3)} | "
            f"{_fmt(ratios.get(f'{tag}_vs_peft') if fused else None, 3)} | "
            f"{_fmt(ratios.get(f'{tag}_vs_fp32') if tag else None, 3)} | "
            f"{_fmt(ratios.get(f'{tag}_vs_eager') if tag else None, 3)} | "
            f"{_fmt(ratios.get(f'{tag}_vs_llamacpp') if tag else None, 2)} | {_fmt(r['bank_mb'])} |"
        )
    lines += ["", f"Peak resident memory of the whole run: {result['peak_rss_mb']:.0f} MB.", ""]
    return "\n".join(lines)
