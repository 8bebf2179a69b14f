"""Load test of `dlp-lora serve`: continuous against static batching, a short-answer and a decode-heavy mix.

For each batching policy (`--batching`, both by default) the script starts `dlp-lora serve` as a
subprocess (so client threads do not compete with it for the GIL) on the given assets, or on a tiny
random model (`--tiny`, a smoke run). For each mix and each client count it sends streaming greedy
`/v1/completions` requests (prompts from several tasks, so rows mix adapters; `ignore_eos`, so every
answer has the mix's length) and reports output tokens/s, time to first token and time per output
token (p50), errors, and the mean rows per decode step the server ran (from its /metrics).
Throughput ratios (N clients against 1) come side by side in one run.

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
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from dlp_lora.bench import free_port, wait_healthy
from dlp_lora.bench.serving import build_tiny_assets, client_load, stream_one

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
MIXES = {"short": 16, "decode-heavy": 128}
"""Mix name -> new tokens per request."""


# Ray in a benchmark: no usage report (the machine may be offline), no metrics agent, quiet replicas, and
# replicas at the same priority as the single-process server (Ray runs workers at nice 15 by default, which
# on a machine shared with other work would hand the comparison to the single-process server).
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_worker_niceness": "0",
}


def _cpus(ns: argparse.Namespace, replicas: int) -> float:
    """Ray CPUs (and torch threads) per replica: as asked, or the machine's cores split evenly."""
    return ns.cpus_per_replica or max(1, (os.cpu_count() or 1) // replicas)


def _ray_args(ns: argparse.Namespace, replicas: int | None) -> list[str]:
    """`dlp-lora serve` flags for Ray Serve with this many replicas (none for the single-process server)."""
    if replicas is None:
        return []
    return [
        "--ray",
        "--replicas",
        str(replicas),
        "--cpus-per-replica",
        str(_cpus(ns, replicas)),
        "--max-ongoing-requests",
        str(2 * ns.max_batch_size),
        "--max-queued-requests",
        "-1",
    ]


@contextmanager
def running_server(ns: argparse.Namespace, assets: Path, batching: str, replicas: int | None = None) -> Iterator[str]:
    """The base URL of a healthy `dlp-lora serve` subprocess with this batching policy (on Ray Serve with
    `replicas` replicas when given); stopped after."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "dlp_lora.cli",
        "serve",
        "--assets",
        str(assets),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-batch-size",
        str(ns.max_batch_size),
        "--batching",
        batching,
        "--batch-window-ms",
        str(ns.batch_window_ms),
        "--max-queue",
        str(max(64, 4 * max(ns.concurrency))),
        "--max-tokens-limit",
        str(max(MIXES.values())),
    ] + _ray_args(ns, replicas)
    if ns.base_model:
        cmd += ["--base-model", ns.base_model]
    # Its own session: should the server not stop on SIGTERM, killing the group also ends the local
    # Ray cluster it started (raylet, GCS, replicas), not only the driver.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=None if ns.verbose else subprocess.DEVNULL,
        env={**os.environ, **(RAY_ENV if replicas else {})},
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, ns.startup_timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _step_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's rows-per-decode-step histogram."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("dlp_lora_step_rows_")}
    return values.get("dlp_lora_step_rows_sum", 0.0), values.get("dlp_lora_step_rows_count", 0.0)


def _body(i: int, max_tokens: int) -> dict:
    return {
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "model": "dlp-lora",
        "stream_options": {"include_usage": True},
    }


def run_level(url: str, clients: int, requests: int, max_tokens: int, timeout: float) -> dict:
    """`requests` streamed completions over `clients` threads; figures for one table row."""
    before = _step_stats(url)
    done, errors, wall = client_load(
        url, "/v1/completions", [_body(i, max_tokens) for i in range(requests)], clients, timeout
    )
    after = _step_stats(url)
    steps = after[1] - before[1]

    def p50(xs: list[float]) -> float:
        return round(float(np.percentile(np.array(xs) * 1000, 50)), 1) if xs else float("nan")

    return {
        "clients": clients,
        "requests": requests,
        "errors": errors,
        "seconds": round(wall, 3),
        "output_tokens_per_s": round(sum(d.tokens for d in done) / wall, 2),
        "ttft_p50_ms": p50([d.ttft for d in done]),
        "tpot_p50_ms": p50([d.per_token for d in done if d.per_token is not None]),
        "latency_p50_ms": p50([d.total for d in done]),
        "mean_rows_per_step": round((after[0] - before[0]) / steps, 2) if steps else None,
    }


def markdown(runs: dict, ns: argparse.Namespace, command: str) -> str:
    target = "a tiny random model (smoke run)" if ns.tiny else f"`{ns.assets}`"
    lines = [
        "## Serving load",
        "",
        f"Produced by `{command}` against {target} on this machine ({os.cpu_count()} CPUs, {platform.machine()}, "
        "no GPU). Every request streams a greedy `/v1/completions` answer of exactly the mix's length "
        f"(`ignore_eos`; short = {MIXES['short']} tokens, decode-heavy = {MIXES['decode-heavy']}), prompts from "
        f"{len(PROMPTS)} tasks routed by the router. Server max_batch_size={ns.max_batch_size}. TTFT: time to the "
        "first streamed token; TPOT: time per output token after it; rows/step: mean rows of the server's decode "
        "steps. Speed-up: output tokens/s against 1 client of the same mix and policy.",
        "",
        "| batching | mix | clients | requests | errors | output tok/s | speed-up | TTFT p50 ms | TPOT p50 ms | "
        "latency p50 ms | rows/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (batching, mix), rows in runs.items():
        one = rows[0]["output_tokens_per_s"] or float("nan")
        for r in rows:
            lines.append(
                f"| {batching} | {mix} | {r['clients']} | {r['requests']} | {r['errors']} | "
                f"{r['output_tokens_per_s']} | {r['output_tokens_per_s'] / one:.2f}x | {r['ttft_p50_ms']} | "
                f"{r['tpot_p50_ms']} | {r['latency_p50_ms']} | {r['mean_rows_per_step']} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="serve a tiny random model built in a temp dir")
    p.add_argument("--assets", default="assets/smollm2-135m-26tasks", help="assets folder to serve")
    p.add_argument("--base-model", default=None, help="override the manifest's base model")
    p.add_argument("--batching", nargs="+", choices=["continuous", "static"], default=["continuous", "static"])
    p.add_argument("--mixes", nargs="+", choices=list(MIXES), default=list(MIXES))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--rounds", type=int, default=2, help="requests per client at each level (default 2)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-window-ms", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout (s)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--markdown", default=None, help="replace/append the '## Serving load' section of this file")
    p.add_argument("--verbose", action="store_true", help="show the server's log")
    p.add_argument("--ray", action="store_true", help="compare the single-process server with Ray Serve replicas")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2], help="Ray Serve replica counts (--ray)")
    p.add_argument(
        "--cpus-per-replica",
        type=float,
        default=None,
        help="Ray CPUs (and torch threads) per replica (--ray; default: the cores split evenly)",
    )
    ns = p.parse_args(argv)
    if min(ns.concurrency) < 1 or ns.rounds < 1:
        p.error("--concurrency and --rounds must be >= 1")
    if ns.ray and min(ns.replicas) < 1:
        p.error("--ray needs --replicas >= 1")
    return ns


def ray_markdown(results: list[dict], ns: argparse.Namespace, command: str, load: float) -> str:
    """The "## Ray Serve" section: one table, the single-process server and each replica count side by side."""
    target = "a tiny random model (smoke run)" if ns.tiny else f"`{ns.assets}`"
    lines = [
        "## Ray Serve",
        "",
        f"Produced by `{command}` against {target} on this machine ({os.cpu_count()} CPUs, {platform.machine()}). "
        f"Each level sends clients x {ns.rounds} streamed greedy `/v1/completions` requests of each mix "
        f"(`ignore_eos`; short = {MIXES['short']} tokens, decode-heavy = {MIXES['decode-heavy']}) from that many "
        "concurrent clients, first to the single-process server (`dlp-lora serve`, uvicorn, continuous batching), "
        "then to `dlp-lora serve --ray` with each replica count (every replica holds the base model, all adapters "
        f"and the router, and batches up to max_batch_size={ns.max_batch_size} itself). Threads are torch threads "
        f"per replica. Load is the machine's 1-minute load average after each row (it was {load:.2f} when the run "
        "started). Servers run one after another: compare rows only where their loads are close.",
        "",
        "| server | threads | mix | clients | requests | errors | seconds | output tok/s | TTFT p50 ms | "
        "TPOT p50 ms | latency p50 ms | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['server']} | {r['threads']} | {r['mix']} | {r['clients']} | {r['requests']} | {r['errors']} | "
        f"{r['seconds']} | {r['output_tokens_per_s']} | {r['ttft_p50_ms']} | {r['tpot_p50_ms']} | "
        f"{r['latency_p50_ms']} | {r['load_average']} |"
        for r in results
    ]
    return "\n".join(lines) + "\n"


def _save_ray(results: list[dict], ns: argparse.Namespace, command: str, load: float) -> str:
    """Write the figures so far (after every row: a run cut short still leaves what it measured)."""
    table = ray_markdown(results, ns, command, load)
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(
            json.dumps({"command": command, "tiny": ns.tiny, "load_average": load, "results": results}, indent=2) + "\n"
        )
    if ns.markdown:
        from dlp_lora.bench import write_section

        write_section(Path(ns.markdown), "## Ray Serve", table)
    return table


def run_ray(ns: argparse.Namespace, command: str) -> int:
    """The single-process server, then Ray Serve at each replica count, on the same mixes and levels."""
    import torch  # only to report the single-process server's default thread count

    results, torch_threads, load = [], torch.get_num_threads(), round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_tiny_assets(Path(tmp)) if ns.tiny else Path(ns.assets)
        if not (assets / "manifest.json").exists():
            raise SystemExit(f"no assets at {assets}; pass --assets DIR or --tiny")
        for replicas in [None, *ns.replicas]:
            with running_server(ns, assets, "continuous", replicas) as url:
                # Warm-up on every replica: first-call allocations and lazy loading stay out of the figures.
                warm = 2 * (replicas or 1)
                run_level(url, warm, warm, 4, ns.timeout)
                label = "uvicorn, 1 process" if replicas is None else f"Ray Serve, {replicas} replica(s)"
                threads = max(1, int(_cpus(ns, replicas))) if replicas else torch_threads
                for mix in ns.mixes:
                    for c in ns.concurrency:
                        r = run_level(url, c, c * ns.rounds, MIXES[mix], ns.timeout)
                        r.update(
                            server=label,
                            mix=mix,
                            replicas=replicas,
                            threads=threads,
                            load_average=round(os.getloadavg()[0], 2),
                        )
                        if replicas:  # /metrics is one replica's only
                            r["mean_rows_per_step"] = None
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
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_tiny_assets(Path(tmp)) if ns.tiny else Path(ns.assets)
        if not (assets / "manifest.json").exists():
            raise SystemExit(f"no assets at {assets}; pass --assets DIR or --tiny")
        for batching in ns.batching:
            with running_server(ns, assets, batching) as url:
                with httpx.Client(timeout=ns.timeout) as http:  # warm-up: first-call allocations stay out
                    for i in range(2):
                        stream_one(http, url, "/v1/completions", _body(i, 4))
                for mix in ns.mixes:
                    rows = runs.setdefault((batching, mix), [])
                    for c in ns.concurrency:
                        rows.append(run_level(url, c, c * ns.rounds, MIXES[mix], ns.timeout))
                        print(json.dumps({"batching": batching, "mix": mix, **rows[-1]}), flush=True)
    table = markdown(runs, ns, command)
    print(table)
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(
            json.dumps(
                {
                    "command": command,
                    "tiny": ns.tiny,
                    "mixes": MIXES,
                    "runs": [{"batching": b, "mix": m, "results": rows} for (b, m), rows in runs.items()],
                },
                indent=2,
            )
            + "\n"
        )
    if ns.markdown:
        from dlp_lora.bench import write_section

        write_section(Path(ns.markdown), "## Serving load", table)
    return 0 if all(r["errors"] == 0 for rows in runs.values() for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
