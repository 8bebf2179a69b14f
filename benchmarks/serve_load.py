"""Load test of `dlp-lora serve`: throughput and latency at several client concurrencies.

Starts the server as a subprocess (so client threads do not compete with it for the GIL) on the given
assets, or on a tiny random model built in a temp dir (`--tiny`, a smoke run), or uses a running server
(`--url`). For each concurrency level, that many client threads send `--requests` greedy completion
requests in total (prompts from several tasks, so batches mix adapters) and the script reports requests/s,
completion tokens/s, p50/p99 end-to-end latency, errors, and the mean batch size the server formed
(from its /metrics).

    python benchmarks/serve_load.py --tiny
    python benchmarks/serve_load.py --assets assets/smollm2-135m-26tasks --json docs/serve_load.json \
        --markdown docs/performance.md

`--ray` compares, in one run, the single-process server with `dlp-lora serve --ray` at each of `--replicas`
(each replica gets `--cpus-per-replica` Ray CPUs and as many torch threads; by default the cores split
evenly) and writes a "## Ray Serve" section instead:

    python benchmarks/serve_load.py --ray --replicas 1 2 --json docs/serve_load_ray.json \
        --markdown docs/performance.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np

PROMPTS = [
    "What is 17 + 25? Answer with a number.",
    "Translate to French: The cat sleeps on the sofa.",
    "Is the following review positive or negative? 'A dull, overlong film.'",
    "Which planet is known as the red planet?",
    "Summarize in one sentence: The city council voted to expand the bike lane network next year.",
    "Write a Python function that returns the square of a number.",
    "Does 'The man is sleeping' follow from 'A man naps on a bench'? Answer yes or no.",
    "Name the capital of Canada.",
]


# Ray in a benchmark: no usage report (the machine may be offline), no metrics agent, quiet replicas, and
# replicas at the same priority as the single-process server (Ray runs workers at nice 15 by default, which
# on a machine shared with other work would hand the comparison to the single-process server).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0", "RAY_SERVE_LOG_TO_STDERR": "0",
           "RAY_worker_niceness": "0"}


def build_tiny_assets(root: Path) -> Path:
    """A complete assets folder on a tiny random Llama with the real tokenizer: 4 random adapters and an
    untrained router. Answers are gibberish; only the serving machinery is exercised."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlp_lora.assets import Manifest
    from dlp_lora.config import RouterConfig
    from dlp_lora.models import load_tokenizer
    from dlp_lora.router import Router

    tasks = ("arithmetic", "translation", "sentiment", "trivia")
    tok = load_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=tok.eos_token_id)).eval()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, task in enumerate(tasks):
        torch.manual_seed(i + 1)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
        peft_model.save_pretrained(root / "adapters" / task, safe_serialization=True)
        model = peft_model.unload()
    Router(RouterConfig(task_names=tasks, embed_dim=8, hidden_dim=16)).save(root / "router")
    Manifest(base_model=str(root / "base"), tasks=list(tasks), adapters={t: f"adapters/{t}" for t in tasks},
             router="router", selection={"p": 0.6}).save(root)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"no healthy server at {url} after {timeout:.0f} s")


def _cpus(ns: argparse.Namespace, replicas: int) -> float:
    """Ray CPUs (and torch threads) per replica: as asked, or the machine's cores split evenly."""
    return ns.cpus_per_replica or max(1, (os.cpu_count() or 1) // replicas)


def _ray_args(ns: argparse.Namespace, replicas: int | None) -> list[str]:
    """`dlp-lora serve` flags for Ray Serve with this many replicas (none for the single-process server)."""
    if replicas is None:
        return []
    return ["--ray", "--replicas", str(replicas), "--cpus-per-replica", str(_cpus(ns, replicas)),
            "--max-ongoing-requests", str(2 * ns.max_batch_size), "--max-queued-requests", "-1"]


@contextmanager
def running_server(ns: argparse.Namespace, replicas: int | None = None) -> Iterator[str]:
    """The base URL of a healthy server: the given --url, or a `dlp-lora serve` subprocess we stop after
    (on Ray Serve with `replicas` replicas when given)."""
    if ns.url:
        _wait_healthy(ns.url.rstrip("/"), None, ns.startup_timeout)
        yield ns.url.rstrip("/")
        return
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_tiny_assets(Path(tmp)) if ns.tiny else Path(ns.assets)
        if not (assets / "manifest.json").exists():
            raise SystemExit(f"no assets at {assets}; pass --assets DIR, --tiny or --url")
        port = _free_port()
        cmd = [sys.executable, "-m", "dlp_lora.cli", "serve", "--assets", str(assets), "--host", "127.0.0.1",
               "--port", str(port), "--max-batch-size", str(ns.max_batch_size), "--batch-window-ms",
               str(ns.batch_window_ms), "--max-queue", str(max(64, 2 * max(ns.concurrency))),
               "--max-tokens-limit", str(max(256, ns.max_tokens))] + _ray_args(ns, replicas)
        if ns.base_model:
            cmd += ["--base-model", ns.base_model]
        # Its own session: should the server not stop on SIGTERM, killing the group also ends the local
        # Ray cluster it started (raylet, GCS, replicas), not only the driver.
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=None if ns.verbose else subprocess.DEVNULL,
                                env={**os.environ, **(RAY_ENV if replicas else {})}, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(url, proc, ns.startup_timeout)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("dlp_lora_batch_size_")}
    return values.get("dlp_lora_batch_size_sum", 0.0), values.get("dlp_lora_batch_size_count", 0.0)


def run_level(url: str, concurrency: int, requests: int, max_tokens: int, timeout: float) -> dict:
    """`requests` completions over `concurrency` client threads; figures for one table row."""
    latencies: list[float] = []
    tokens, errors, lock, counter = [0], [0], threading.Lock(), iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=timeout) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
                start = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/completions", json=body)
                    ok = r.status_code == 200
                    n = r.json()["usage"]["completion_tokens"] if ok else 0
                except (httpx.HTTPError, ValueError, KeyError):
                    ok, n = False, 0
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - start)
                    tokens[0] += n
                    errors[0] += 0 if ok else 1

    before = _batch_stats(url)
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = _batch_stats(url)
    batches = after[1] - before[1]
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"concurrency": concurrency, "requests": requests, "errors": errors[0], "seconds": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 3), "completion_tokens_per_s": round(tokens[0] / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "mean_batch": round((after[0] - before[0]) / batches, 2) if batches else None}


def markdown(results: list[dict], ns: argparse.Namespace, command: str) -> str:
    target = "a tiny random model (smoke run)" if ns.tiny else (ns.url or f"`{ns.assets}`")
    lines = [
        "## Serving load", "",
        f"Produced by `{command}` against {target} on this machine ({os.cpu_count()} CPUs, "
        f"{platform.machine()}). Each level sends {ns.requests} greedy `/v1/completions` requests "
        f"(max_tokens={ns.max_tokens}, prompts from {len(PROMPTS)} tasks) from that many concurrent clients. "
        + ("" if ns.url else f"Server max_batch_size={ns.max_batch_size}, batch_window_ms={ns.batch_window_ms}. ")
        + "Latency is end to end "
        "(HTTP, queueing, batching, decoding); mean batch is the server's own count.", "",
        "| concurrency | requests | errors | seconds | req/s | completion tok/s | p50 ms | p99 ms | mean batch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['seconds']} | {r['requests_per_s']} | "
              f"{r['completion_tokens_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['mean_batch']} |" for r in results]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", help="a running server's base URL (e.g. http://127.0.0.1:8000)")
    src.add_argument("--tiny", action="store_true", help="serve a tiny random model built in a temp dir")
    p.add_argument("--assets", default="assets/smollm2-135m-26tasks", help="assets folder to serve")
    p.add_argument("--base-model", default=None, help="override the manifest's base model")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-window-ms", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout (s)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--markdown", default=None, help="replace/append the '## Serving load' section of this file")
    p.add_argument("--verbose", action="store_true", help="show the server's log")
    p.add_argument("--ray", action="store_true", help="compare the single-process server with Ray Serve replicas")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="Ray Serve replica counts (--ray)")
    p.add_argument("--cpus-per-replica", type=float, default=None,
                   help="Ray CPUs (and torch threads) per replica (--ray; default: the cores split evenly)")
    ns = p.parse_args(argv)
    if min(ns.concurrency) < 1 or ns.requests < 1 or ns.max_tokens < 1:
        p.error("--concurrency, --requests and --max-tokens must be >= 1")
    if ns.ray and (ns.url or min(ns.replicas) < 1):
        p.error("--ray starts its own servers (no --url) and needs --replicas >= 1")
    return ns


def ray_markdown(results: list[dict], ns: argparse.Namespace, command: str, load: float) -> str:
    """The "## Ray Serve" section: one table, the single-process server and each replica count side by side."""
    target = "a tiny random model (smoke run)" if ns.tiny else f"`{ns.assets}`"
    lines = [
        "## Ray Serve", "",
        f"Produced by `{command}` against {target} on this machine ({os.cpu_count()} CPUs, {platform.machine()}). "
        f"Each level sends {ns.requests} greedy `/v1/completions` requests (max_tokens={ns.max_tokens}) from that "
        f"many concurrent clients, first to the single-process server (`dlp-lora serve`, uvicorn), then to "
        f"`dlp-lora serve --ray` with each replica count (every replica holds the base model, all adapters and "
        f"the router, and batches up to max_batch_size={ns.max_batch_size} itself). Threads are torch threads "
        f"per replica. Load is the machine's 1-minute load average after each row (other work shares these 2 cores; it "
        f"was {load:.2f} when the run started). Servers run one after another: compare rows only where their loads are "
        "close.", "",
        "| server | threads | concurrency | requests | errors | seconds | req/s | completion tok/s | p50 ms | p99 ms | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['server']} | {r['threads']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
              f"{r['seconds']} | {r['requests_per_s']} | {r['completion_tokens_per_s']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['load_average']} |" for r in results]
    return "\n".join(lines) + "\n"


def _save_ray(results: list[dict], ns: argparse.Namespace, command: str, load: float) -> str:
    """Write the figures so far (after every row: a run cut short still leaves what it measured)."""
    table = ray_markdown(results, ns, command, load)
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps({"command": command, "tiny": ns.tiny, "max_tokens": ns.max_tokens,
                                             "load_average": load, "results": results}, indent=2) + "\n")
    if ns.markdown:
        from dlp_lora.cli import _write_section

        _write_section(Path(ns.markdown), "## Ray Serve", table)
    return table


def run_ray(ns: argparse.Namespace, command: str) -> int:
    """The single-process server, then Ray Serve at each replica count, on the same levels."""
    import torch  # only to report the single-process server's default thread count

    results, torch_threads, load = [], torch.get_num_threads(), round(os.getloadavg()[0], 2)
    for replicas in [None, *ns.replicas]:
        with running_server(ns, replicas) as url:
            # Warm-up on every replica: first-call allocations and lazy loading stay out of the figures.
            warm = 2 * (replicas or 1)
            run_level(url, warm, warm, 4, ns.timeout)
            label = "uvicorn, 1 process" if replicas is None else f"Ray Serve, {replicas} replica(s)"
            threads = max(1, int(_cpus(ns, replicas))) if replicas else torch_threads
            for c in ns.concurrency:
                r = run_level(url, c, ns.requests, ns.max_tokens, ns.timeout)
                r.update(server=label, replicas=replicas, threads=threads, load_average=round(os.getloadavg()[0], 2))
                r["mean_batch"] = None if replicas else r["mean_batch"]  # /metrics is one replica's only
                results.append(r)
                print(json.dumps(r), flush=True)
                _save_ray(results, ns, command, load)
    print(_save_ray(results, ns, command, load))
    return 0 if all(r["errors"] == 0 for r in results) else 1


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    # `timeout` or a scheduler ends us with SIGTERM: unwind, so the server we started (its own session,
    # with its Ray cluster) is stopped too.
    signal.signal(signal.SIGTERM, _terminated)
    command = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if ns.ray:
        return run_ray(ns, command)
    with running_server(ns) as url:
        for i in range(2):  # warm-up: first-call allocations and lazy loading stay out of the figures
            httpx.post(f"{url}/v1/completions", json={"prompt": PROMPTS[i], "max_tokens": 4}, timeout=ns.timeout)
        results = []
        for c in ns.concurrency:
            results.append(run_level(url, c, ns.requests, ns.max_tokens, ns.timeout))
            print(json.dumps(results[-1]), flush=True)
    table = markdown(results, ns, command)
    print(table)
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps({"command": command, "tiny": ns.tiny, "max_tokens": ns.max_tokens,
                                             "results": results}, indent=2) + "\n")
    if ns.markdown:
        from dlp_lora.cli import _write_section

        _write_section(Path(ns.markdown), "## Serving load", table)
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
