"""Our server against llama.cpp's own server on a many-adapter workload: same CPU, same GGUF, same client load.

    python benchmarks/serve_vs_llamacpp.py --llama-cpp /path/to/llama.cpp --out docs/serve_vs_llamacpp.json \
        --markdown docs/performance.md

llama.cpp: `llama-server`, built from the llama.cpp source that the `llama-cpp-python` sdist vendors (the
registries carry no server binary; `llama_cpp.server`, the Python binding's server, takes no per-request
adapter scales):

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF && cmake --build build -j --target llama-server     # ~25 min on 2 cores

`--llama-cpp` is that `vendor/llama.cpp` folder. Every deployed adapter of the assets is converted with
llama.cpp's own `convert_lora_to_gguf.py` (f32) and loaded with `--lora ... --lora-init-without-apply`; the
base model is the embedded GGUF itself (the file our fp32 weights are dequantised from).

The load: the pool's test prompts, round robin over the tasks, each as one user message; both servers get
the same requests through `/v1/chat/completions`, streamed, greedy, `ignore_eos` (every answer is exactly
16 or 128 tokens), from 1, 4, 16 and 32 concurrent clients (2 requests per client per level). Ours routes each
prompt itself (`model: dlp-lora`); llama.cpp gets, per request, the adapter scales our router chose for that
prompt (`lora: [{id, scale}]`, asked of our `/v1/route` beforehand), so both do the same work. llama.cpp does
not batch requests whose adapter settings differ. Per level: output tokens/s (all answers' tokens over the
wall time), time to first token and time per token after it (p50, p90). The servers run one after another.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from dlp_lora.assets import Manifest
from dlp_lora.bench import free_port, save_json, server_process, wait_healthy, write_section
from dlp_lora.bench.serving import client_load, pool_prompts
from dlp_lora.models import embedded_gguf_path

LENGTHS = (128, 16)
CLIENTS = (1, 4, 16, 32)


def convert_adapters(llama_cpp: Path, assets: Path, out: Path) -> dict[str, Path]:
    """Adapter name -> its GGUF LoRA (converted once with llama.cpp's converter, f32): every deployed
    specialist, and every baseline some class is served by (the generalist), so a prompt our router sends
    to the generalist costs llama.cpp its adapter too."""
    from dlp_lora.models import embedded_cache_dir, load_base_model

    load_base_model()  # makes the fp32 cache, whose config.json the converter reads
    manifest = Manifest.load(assets)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    env = {**os.environ, "PYTHONPATH": f"{llama_cpp / 'gguf-py'}{os.pathsep}{llama_cpp}"}
    serving = {n for mixture in manifest.serve.values() for n in mixture}
    baselines = {n: p for n, p in manifest.baseline_paths(assets).items() if n in serving}
    for name, path in {**manifest.adapter_paths(assets), **baselines}.items():
        if path is None:
            continue
        files[name] = out / f"{name}.gguf"
        if not files[name].exists():
            cmd = [sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--outtype", "f32",
                   "--base", str(embedded_cache_dir()), "--outfile", str(files[name]), str(path)]  # fmt: skip
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"converting {name} failed:\n{done.stderr[-2000:]}")
    return files


@contextmanager
def llama_server(binary: Path, loras: list[Path], threads: int, slots: int, ctx_per_slot: int):
    """`llama-server` on the embedded GGUF with every adapter loaded at scale 0; yields its base URL."""
    port = free_port()
    cmd = [str(binary), "-m", str(embedded_gguf_path()), "--port", str(port), "--host", "127.0.0.1",
           "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
           "--lora-init-without-apply", "--no-webui"]  # fmt: skip
    for f in loras:
        cmd += ["--lora", str(f)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, 120)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def level(url: str, bodies: list[dict], clients: int) -> dict:
    done, errors, wall = client_load(url, "/v1/chat/completions", bodies, clients, timeout=1800)

    def pct(xs: list[float], q: int) -> float:
        return round(float(np.percentile(xs, q)), 4) if xs else float("nan")

    per_token = [d.per_token for d in done if d.per_token is not None]
    return {
        "requests": len(bodies),
        "errors": errors,
        "seconds": round(wall, 2),
        "tok_s": round(sum(d.tokens for d in done) / wall, 2),
        "ttft_s": pct([d.ttft for d in done], 50),
        "ttft_p90_s": pct([d.ttft for d in done], 90),
        "ms_per_token": round(1000 * pct(per_token, 50), 2),
        "ms_per_token_p90": round(1000 * pct(per_token, 90), 2),
        "tokens_per_answer": sorted({d.tokens for d in done}),
    }


def build_info(binary: Path, llama_cpp: Path) -> dict:
    """llama-server's version line and the build's cache flags that decide its kernels."""
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    cache = llama_cpp / "build" / "CMakeCache.txt"
    flags = {}
    if cache.exists():
        for line in cache.read_text().splitlines():
            m = re.match(r"(GGML_[A-Z0-9_]+|CMAKE_BUILD_TYPE|CMAKE_C_FLAGS):[A-Z]+=(.*)", line)
            if m and m.group(2) not in ("", "OFF") and "DIR" not in m.group(1):
                flags[m.group(1)] = m.group(2)
    return {"version": (version.stdout + version.stderr).strip().splitlines()[-2:], "cmake": flags}


def markdown(result: dict) -> str:
    compiled = any("ours_compiled_tok_s" in r for rows in result["results"].values() for r in rows.values())
    lines = [
        "## Serving against llama.cpp's server",
        "",
        f"Produced by `{result['command']}` on this machine ({result['cpu']}, {result['threads']} threads each, "
        f"no GPU; 1-minute load average {result['load_average']} at the start). Ours: `dlp-lora serve --quantize {result['quantize']}` (max batch "
        f"{result['max_batch_size']}); llama.cpp: `llama-server` {result['llama_cpp']['version'][0]} on the "
        "embedded GGUF, every adapter loaded as a GGUF LoRA, per request the scales our router chose. Streamed "
        f"greedy chat answers of exactly the given length from concurrent clients, {result['rounds']} requests per "
        "client, prompts "
        "round robin over the pool's tasks. Time per token is p50 after the first token.",
        "Ours: eager decode" + (", and `--compile` (compiled)" if compiled else "") + ".",
        *(
            f"`--quantize auto` at the {variant} server's start: {line.split(': quantize auto on ')[-1]}."
            for variant, lines in result.get("kernels", {}).items()
            for line in lines
        ),
        "",
        "| answer tokens | clients | ours tok/s | "
        + ("ours compiled tok/s | " if compiled else "")
        + "llama.cpp tok/s | best ours/llama.cpp | ours TTFT s | "
        + ("compiled TTFT s | " if compiled else "")
        + "llama.cpp TTFT s | ours ms/token | "
        + ("compiled ms/token | " if compiled else "")
        + "llama.cpp ms/token | errors ours / llama.cpp |",
        "|---" * (10 + 3 * compiled) + "|",
    ]
    for length, rows in result["results"].items():
        for clients, r in rows.items():
            k = [f"{r[key]} | " if compiled else "" for key in _COMPILED]
            best = max(r["ours_tok_s"], r.get("ours_compiled_tok_s", 0))
            errors = r["ours"]["errors"] + (r["ours_compiled"]["errors"] if compiled else 0)
            lines.append(
                f"| {length} | {clients} | {r['ours_tok_s']} | {k[0]}{r['llamacpp_tok_s']} | "
                f"{best / r['llamacpp_tok_s']:.2f}x | {r['ours_ttft_s']} | {k[1]}{r['llamacpp_ttft_s']} | "
                f"{r['ours_ms_per_token']} | {k[2]}{r['llamacpp_ms_per_token']} | "
                f"{errors} / {r['llamacpp']['errors']} |"
            )
    return "\n".join(lines) + "\n"


_COMPILED = ("ours_compiled_tok_s", "ours_compiled_ttft_s", "ours_compiled_ms_per_token")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source folder with build/bin/llama-server")
    p.add_argument("--assets", default="assets/smollm2-135m-26tasks", type=Path)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--work", default="runs/serve_vs_llamacpp", type=Path, help="where the GGUF adapters go")
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    p.add_argument("--rounds", type=int, default=2, help="requests per client at each level")
    p.add_argument("--quantize", default="auto", choices=["auto", "int8", "none"], help="our server's base")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--compile", action="store_true", help="also run our server with --compile (same load)")
    p.add_argument("--compile-context", type=int, default=512, help="our compiled server's --compile-context")
    p.add_argument("--out", default=None)
    p.add_argument("--markdown", default=None, help="replace/append this section of a markdown file")
    ns = p.parse_args(argv)
    binary = ns.llama_cpp / "build" / "bin" / "llama-server"
    if not binary.exists():
        p.error(f"no llama-server at {binary}; build it as this script's docstring shows")
    files = convert_adapters(ns.llama_cpp, ns.assets, ns.work / "lora")
    names = list(files)
    top = max(ns.clients)
    prompts = pool_prompts(ns.assets, ns.data_dir, top * ns.rounds)
    batch = str(max(ns.clients))
    result: dict = {
        "command": "python benchmarks/serve_vs_llamacpp.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "threads": ns.threads, "quantize": ns.quantize, "max_batch_size": int(batch), "rounds": ns.rounds,
        "load_average": round(os.getloadavg()[0], 2),
        "llama_cpp": build_info(binary, ns.llama_cpp), "adapters": names, "results": {},
    }  # fmt: skip
    os.environ["OMP_NUM_THREADS"] = str(ns.threads)  # our server's torch threads (it inherits the environment)
    flags = ["--quantize", ns.quantize, "--max-batch-size", batch, "--max-queue", "256"]
    ours: dict = {}
    for variant in ["eager", "compiled"] if ns.compile else ["eager"]:
        extra = ["--compile", "--compile-context", str(ns.compile_context)] if variant == "compiled" else []
        # Compiling takes about a minute per slot count at start.
        log = Path(tempfile.mkdtemp()) / f"serve-{variant}.log"
        with server_process(ns.assets, *flags, *extra, timeout=1800, log=log) as url:
            with httpx.Client(timeout=120) as http:
                routes = [http.post(f"{url}/v1/route", json={"prompt": t}).json() for t in prompts]
            for length in ns.lengths:
                client_load(url, "/v1/chat/completions", [_body(prompts[0], 4)] * 2, 1, 600)  # warm-up
                for c in ns.clients:
                    bodies = [{**_body(t, length), "model": "dlp-lora"} for t in prompts[: c * ns.rounds]]
                    ours[(variant, length, c)] = level(url, bodies, c)
                    print("ours", variant, length, c, ours[(variant, length, c)], flush=True)
        # What `--quantize auto` chose at this server's start (it times int8 against fp32 per shape).
        result.setdefault("kernels", {})[variant] = [
            ln.strip() for ln in log.read_text().splitlines() if "quantize " in ln
        ]
    theirs: dict = {}
    with llama_server(binary, [files[n] for n in names], ns.threads, top, 1536) as url:
        for length in ns.lengths:
            client_load(url, "/v1/chat/completions", [_body(prompts[0], 4)] * 2, 1, 600)
            for c in ns.clients:
                bodies = [
                    {**_body(t, length), "lora": _scales(names, r)} for t, r in zip(prompts[: c * ns.rounds], routes)
                ]
                theirs[(length, c)] = level(url, bodies, c)
                print("llama.cpp", length, c, theirs[(length, c)], flush=True)
    for (length, c), b in theirs.items():
        a = ours[("eager", length, c)]
        row = result["results"].setdefault(str(length), {})[str(c)] = {
            "ours_tok_s": a["tok_s"], "llamacpp_tok_s": b["tok_s"],
            "ours_ttft_s": a["ttft_s"], "llamacpp_ttft_s": b["ttft_s"],
            "ours_ms_per_token": a["ms_per_token"], "llamacpp_ms_per_token": b["ms_per_token"],
            "ours": a, "llamacpp": b,
        }  # fmt: skip
        if ("compiled", length, c) in ours:  # `--compile`: the same load on our compiled decode
            k = ours[("compiled", length, c)]
            row.update(ours_compiled_tok_s=k["tok_s"], ours_compiled_ttft_s=k["ttft_s"],
                       ours_compiled_ms_per_token=k["ms_per_token"], ours_compiled=k)  # fmt: skip
    result["routed_mixtures"] = sum(1 for r in routes if r["adapters"]) / len(routes)
    if ns.out:
        save_json(result, ns.out)
    table = markdown(result)
    print(table)
    if ns.markdown:
        write_section(Path(ns.markdown), "## Serving against llama.cpp's server", table)
    return 0


def _body(prompt: str, length: int) -> dict:
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": length,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }


def _scales(names: list[str], route: dict) -> list[dict]:
    """llama.cpp's per-request adapter scales: the weights our router chose (0 for the rest)."""
    chosen = dict(zip(route["adapters"], route["weights"]))
    return [{"id": i, "scale": float(chosen.get(n, 0.0))} for i, n in enumerate(names)]


if __name__ == "__main__":
    raise SystemExit(main())
