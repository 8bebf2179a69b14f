"""lm-evaluation-harness as an outside client: our test splits as local lm-eval tasks, run against a server.

lm-eval lives in its own environment (`pip install 'lm-eval[api]==0.4.13'`) and is run as a subprocess;
nothing here imports it. Task files (JSONL + YAML) are written from ../shared/data through our own loaders
into a work folder outside the repository. Two layouts:
- `raw`: lm-eval's zero-shot `Q: {prompt}\\nA:`, no chat template, options after a space;
- `chat`: the prompt as the user message of the model's chat template (`--apply_chat_template`), options
  as the assistant's answer: the prompts and scoring of `dlp-lora evaluate`.
Multiple choice is `output_type: multiple_choice` (lm-eval's `acc` and `acc_norm`); free-form tasks are
`generate_until`, greedy, `until: ["\\n"]`, scored afterwards with our own parser and metric.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dlp_lora.tasks import Example, get_task, load_splits

__all__ = ["LAYOUTS", "LmEval", "write_tasks"]

LAYOUTS = {"raw": ("Q: {{prompt}}\nA:", " "), "chat": ("{{prompt}}", "")}
"""Layout name -> (lm-eval's doc_to_text, target_delimiter)."""


def write_tasks(tasks: list[str], work: Path, data_dir: str | None, layout: str = "raw") -> dict[str, list[Example]]:
    """One JSONL + YAML per task under work/tasks (lm-eval task `{layout}_{task}`); returns each task's test
    examples in doc order."""
    text, delimiter = LAYOUTS[layout]
    folder = work / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in tasks:
        task = get_task(name)
        test = load_splits(task, data_dir).test
        out[name] = test
        rows = [
            {
                "uid": ex.uid,
                "prompt": ex.prompt,
                "options": list(ex.options),
                "gold": ex.gold_index if ex.options else 0,
                "target": ex.references[0],
            }
            for ex in test
        ]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        common = [
            f"task: {layout}_{name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {(folder / f'{name}.jsonl').resolve()}",
            "test_split: test",
            f"doc_to_text: {json.dumps(text)}",
            f"target_delimiter: {json.dumps(delimiter)}",
        ]
        if task.kind == "mcq":
            body = [
                "output_type: multiple_choice",
                'doc_to_choice: "{{options}}"',
                'doc_to_target: "{{gold}}"',
                "metric_list:",
                "  - metric: acc",
                "  - metric: acc_norm",
            ]
        else:
            body = [
                "output_type: generate_until",
                'doc_to_target: "{{target}}"',
                "generation_kwargs:",
                '  until: ["\\n"]',
                f"  max_gen_toks: {task.max_new_tokens}",
                "  do_sample: false",
                "  temperature: 0.0",
                "metric_list:",
                "  - metric: exact_match",
            ]
        (folder / f"{layout}_{name}.yaml").write_text("\n".join(common + body + ["metadata:", "  version: 1.0"]) + "\n")
    return out


@dataclass(frozen=True)
class LmEval:
    """How to run lm-eval against one of our servers: its executable, a local tokenizer folder
    (`save_pretrained`: no hub), the number of concurrent requests."""

    executable: str
    tokenizer: str
    concurrent: int = 8

    def run(
        self, model: str, url: str, tasks: list[str], work: Path, layout: str = "raw", limit: int | None = None
    ) -> tuple[dict, float]:
        """lm-eval once (`local-completions`, model name `model`) on `{layout}_{task}` for each task (the first
        `limit` documents of each, if given); returns (task -> its logged samples in doc order, wall seconds
        of the lm-eval process). A run already finished in `work` is read back, not run again (the
        benchmarks resume; delete work/out to measure afresh)."""
        out = work / "out" / layout / model / (f"limit{limit}" if limit else "all")
        cmd = [
            self.executable, "--model", "local-completions", "--tasks", ",".join(f"{layout}_{t}" for t in tasks),
            "--include_path", str(work / "tasks"), "--log_samples", "--output_path", str(out),
            "--model_args", f"model={model},base_url={url}/v1/completions,tokenizer={self.tokenizer},"
            f"tokenizer_backend=huggingface,num_concurrent={self.concurrent},max_retries=3",
        ]  # fmt: skip
        if layout == "chat":
            cmd.append("--apply_chat_template")
        if limit:
            cmd += ["--limit", str(limit)]
        timing, key = out / "seconds.json", ",".join(tasks)
        runs = json.loads(timing.read_text()) if timing.exists() else {}
        if key in runs and all(self._samples_file(out, layout, t) for t in tasks):
            return self._read(out, layout, tasks), runs[key]  # this run finished before
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        runs[key] = time.perf_counter() - t0
        timing.write_text(json.dumps(runs, indent=1) + "\n")
        return self._read(out, layout, tasks), runs[key]

    @staticmethod
    def _samples_file(out: Path, layout: str, task: str) -> Path | None:
        found = sorted(out.rglob(f"samples_{layout}_{task}_*.jsonl"))
        return found[-1] if found else None

    def _read(self, out: Path, layout: str, tasks: list[str]) -> dict:
        samples = {}
        for t in tasks:
            docs = [json.loads(line) for line in self._samples_file(out, layout, t).read_text().splitlines()]
            samples[t] = sorted(docs, key=lambda d: d["doc_id"])
        return samples
