"""Do demonstrations or a preamble in front of a prompt change its route? Whole-prompt against last-segment routing.

Held-out test prompts of every task of the bundled pool, each with 0, 3 or 6 demonstrations in front (other
test prompts with their gold answers, from the same task or from another task, joined by blank lines, as
few-shot prompts are written) or with a long generic system preamble. Each is routed as `dlp-lora serve`
and `DLPLoRA.generate` route it under granularity `prompt` (the whole text, the default) and `segment` (the
last blank-line-separated segment), and compared with the route of the bare prompt: the share of prompts
whose served mixture is unchanged. Router only (no generation): seconds.

    python benchmarks/fewshot_routes.py --data-dir ../shared/data --json docs/fewshot_routes.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from dlp_lora.config import RoutingConfig
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.tasks import get_task, load_splits

PREAMBLE = (
    "You are a helpful, careful assistant. Read the user's request, think about what is being asked, "
    "and answer accurately and concisely. If the request is ambiguous, choose the most likely reading. "
    "Do not add disclaimers or repeat the question. Keep to the format the user asks for."
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", default="assets/smollm2-135m-26tasks")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--per-task", type=int, default=40, help="held-out prompts per task")
    ap.add_argument("--json", default="docs/fewshot_routes.json")
    args = ap.parse_args()

    dlp = DLPLoRA.from_assets(args.assets, quantize="none")
    rng = random.Random(0)
    tasks = [t for t in dlp.task_names if t != "none"]
    pools = {t: load_splits(get_task(t), args.data_dir).test for t in tasks}
    shot = lambda ex: f"{ex.prompt}\n{ex.answer}"  # noqa: E731  (a demonstration: prompt and gold answer)
    settings: dict[str, list[tuple[str, str]]] = {}  # setting -> [(task, text)]
    for task in tasks:
        examples = pools[task][: args.per_task]
        for ex in examples:
            others = [e for e in pools[task] if e.uid != ex.uid]
            other_task = rng.choice([t for t in tasks if t != task])
            for k in (0, 3, 6):
                same = "\n\n".join(shot(e) for e in rng.sample(others, k))
                other = "\n\n".join(shot(e) for e in rng.sample(pools[other_task], k))
                settings.setdefault(f"{k} demos, same task", []).append(
                    (task, f"{same}\n\n{ex.prompt}" if k else ex.prompt)
                )
                if k:
                    settings.setdefault(f"{k} demos, another task", []).append((task, f"{other}\n\n{ex.prompt}"))
            settings.setdefault("generic preamble", []).append((task, f"{PREAMBLE}\n\n{ex.prompt}"))
    bare = [text for _, text in settings["0 demos, same task"]]
    out: dict = {"assets": args.assets, "per_task": args.per_task, "prompts": len(bare), "settings": {}}
    for gran in ("prompt", "segment"):
        cfg = RoutingConfig(granularity=gran)
        zero = dlp.route(bare)  # the bare prompt's route, read whole: the reference
        for name, rows in settings.items():
            routed = dlp.route([text for _, text in rows], cfg)
            same = sum(str(routed.row(i)) == str(zero.row(i)) for i in range(len(rows)))
            out["settings"].setdefault(name, {})[gran] = round(100 * same / len(rows), 1)
    print(
        f"{len(bare)} held-out prompts ({args.per_task} per task): share whose served mixture equals the bare "
        "prompt's, routed on the whole prompt / on its last segment"
    )
    for name, row in out["settings"].items():
        print(f"  {name:28s} {row['prompt']:5.1f}% / {row['segment']:5.1f}%")
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    dlp.close()


if __name__ == "__main__":
    main()
