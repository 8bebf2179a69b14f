"""Fuzz `dlp-lora serve` from its own OpenAPI document with schemathesis (`make fuzz`).

Serves a tiny random model (real tokenizer, 4 random adapters, untrained router; `dlp_lora.bench.serving.build_tiny_assets`)
as a `dlp-lora serve` subprocess, then runs `schemathesis run` against /openapi.json with the checks that
matter for a server: no 5xx, every status code and body as the document states, and schema-invalid
requests refused with a 4xx. Valid-but-refused requests (an unknown adapter name, a prompt over the
token limit) are 400/404 by design, so `positive_data_acceptance` is not among the checks.
Exit status: schemathesis's (0 when every check passed).

    python benchmarks/fuzz_server.py --max-examples 150
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dlp_lora.bench import server_process
from dlp_lora.bench.serving import build_tiny_assets

CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "response_headers_conformance,negative_data_rejection"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=150, help="examples per operation (default 150)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", default=None, help="write schemathesis's JUnit XML report here")
    ns = parser.parse_args()
    st = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_tiny_assets(Path(tmp))
        flags = ["--max-tokens-limit", "16", "--default-max-tokens", "4", "--max-prompt-tokens", "256"]
        flags += ["--max-queue", "256", "--allow-runtime-adapters"]
        with server_process(assets, *flags) as url:
            cmd = [
                st,
                "run",
                f"{url}/openapi.json",
                "--checks",
                CHECKS,
                "--max-examples",
                str(ns.max_examples),
                "--seed",
                str(ns.seed),
                "--request-timeout",
                "60",
                "--workers",
                "2",
                "--suppress-health-check",
                "all",
            ]
            if ns.report:
                cmd += ["--report", "junit", "--report-junit-path", ns.report]
            print("$", " ".join(cmd), flush=True)
            return subprocess.call(cmd)


if __name__ == "__main__":
    raise SystemExit(main())
