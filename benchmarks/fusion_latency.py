"""Fusion latency benchmark: the same as `dlp-lora bench` (base vs peft vs fused mixtures, side by side).

python benchmarks/fusion_latency.py --quick
python benchmarks/fusion_latency.py --json docs/bench.json --markdown docs/performance.md
"""

from __future__ import annotations

import sys

from dlp_lora.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
