"""CLI start-up time: `dlp-lora --help` (and `dlp-lora serve --help`) against a bare `import torch`.

Each command runs in a fresh interpreter `--repeats` times; the median wall time is reported. Target
(issue 14): `dlp-lora --help` under 0.5 s. Run through the benchmark lock on a shared machine:

    /work/bench_lock.sh python benchmarks/cli_startup.py --json docs/cli_startup.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "dlp-lora --help": "from dlp_lora.cli import main; main(['--help'])",
    "dlp-lora serve --help": "from dlp_lora.cli import main; main(['serve', '--help'])",
    "python -c 'import dlp_lora'": "import dlp_lora",
    "python -c 'import torch' (reference)": "import torch",
}


def time_case(code: str, repeats: int) -> list[float]:
    """Wall seconds of `repeats` fresh interpreters running `code` (output discarded)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    rows = []
    for name, code in CASES.items():
        times = time_case(code, args.repeats)
        rows.append(
            {
                "command": name,
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "repeats": args.repeats,
            }
        )
    print("| command | median s | min s | max s |\n|---|---|---|---|")
    for r in rows:
        print(f"| `{r['command']}` | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['max_s']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
