"""Composite prompts answered in one generation under `prompt` / `segment` / `sentence` routing, against the
split-and-generate baseline; per-part scores with bootstrap intervals and a per-token weight plot.

    python benchmarks/composite_granularity.py --assets assets/smollm2-135m-26tasks \
        --json docs/granularity.json --markdown docs/results.md --plot docs/granularity_weights.png

Same composite pairs as `dlp-lora evaluate --limit 30 --composite-pairs 24` (pairs drawn from the first
`--limit` test examples of every task, split seed 0). Greedy, so one run is exact. Not timed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--assets", default="assets/smollm2-135m-26tasks")
    p.add_argument("--data-dir", default=None, help="benchmark data root (default: ../shared/data)")
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--limit", type=int, default=30, help="test examples per task the pairs are drawn from")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None, help="write the section into this file (e.g. docs/results.md)")
    p.add_argument("--plot", default=None, help="PNG of the per-token weights (e.g. docs/granularity_weights.png)")
    ns = p.parse_args()

    from dlp_lora.config import SplitConfig
    from dlp_lora.evaluation.composite import make_pairs
    from dlp_lora.evaluation.granularity import evaluate_granularity, markdown_section, weight_plot
    from dlp_lora.pipeline import DLPLoRA
    from dlp_lora.tasks import get_task, load_splits

    dlp = DLPLoRA.from_assets(ns.assets)
    tasks = {n: get_task(n) for n in dlp.task_names}
    split = SplitConfig()
    pools = {n: load_splits(t, ns.data_dir, split).test[: ns.limit] for n, t in tasks.items()}
    pairs = make_pairs(pools, ns.pairs, split.seed)
    result = evaluate_granularity(dlp, pairs, tasks, batch_size=ns.batch_size)
    result["command"] = "python benchmarks/composite_granularity.py " + " ".join(sys.argv[1:])
    plot = None
    if ns.plot:
        path = weight_plot(result, ns.plot)
        plot = str(path.relative_to(Path(ns.markdown).parent)) if ns.markdown else str(path)
    section = markdown_section(result, result["command"], plot)
    print(section)
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=1) + "\n")
    if ns.markdown:
        from dlp_lora.bench import write_section

        write_section(Path(ns.markdown), "## Composite prompts in one generation", section)


if __name__ == "__main__":
    main()
