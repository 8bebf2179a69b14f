"""Benchmarks: the speed and load measurements behind `dlp-lora bench` and the scripts in `benchmarks/`.

`fusion` (base vs peft vs fused mixtures), `routing` (the cost of `sentence` routing), `llamacpp` (the
embedded GGUF through llama.cpp) and `serving` (a tiny assets folder and a server to load); the helpers
every benchmark shares are here. Scripts import these public names only.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

__all__ = ["free_port", "rss_mb", "save_json", "server_process", "timed", "wait_healthy", "write_section"]


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds (by `clock`) one call of `fn` takes."""
    t0 = clock()
    fn()
    return clock() - t0


def rss_mb() -> float:
    """This process's resident memory in MiB (NaN where /proc is missing)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def save_json(result: dict, path: str | Path) -> None:
    """Write a benchmark's result as indented JSON (folders made as needed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace the section that starts with `heading` (up to the next '## ') in a markdown file, or append."""
    text = path.read_text() if path.exists() else "# Performance\n\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + body.rstrip("\n") + ("\n" + text[end:] if end >= 0 else "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    """Wait until `url`/health answers 200; fail early if `proc` (the server) exits first."""
    import httpx

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


@contextmanager
def server_process(
    assets: str | Path, *flags: str, timeout: float = 300, log: str | Path | None = None
) -> Iterator[str]:
    """`dlp-lora serve --assets ASSETS FLAGS...` on a free local port, as a subprocess: yields its base URL
    once /health answers, and stops it afterwards. log: a file that receives the server's output (its kernel
    choice under `--quantize auto`, for one), else it is dropped."""
    port = free_port()
    cmd = [sys.executable, "-m", "dlp_lora.cli", "serve", "--assets", str(assets), "--port", str(port), *flags]
    with open(log, "w") if log is not None else nullcontext(subprocess.DEVNULL) as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, server, timeout)
            yield url
        finally:
            server.terminate()
            server.wait(30)
