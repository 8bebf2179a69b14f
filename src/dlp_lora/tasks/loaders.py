"""Readers for the benchmark file formats in ../shared/data, user files, and Hugging Face datasets.

Each reader returns every example of one task in file order; splitting happens elsewhere. Formats are
described in ../shared/data/SOURCES.md. Errors name the file and what was expected.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dlp_lora.tasks.prompts import mcq_example
from dlp_lora.tasks.types import Example

__all__ = [
    "resolve_data_dir",
    "read_rows",
    "nutcracker",
    "llm_adapters_boolq",
    "bbh_choice",
    "bbh_free",
    "squad",
    "gsm8k",
    "user_file",
    "hf_dataset",
]


def _default_data_dir() -> Path:
    # ../shared/data beside the repository (editable install), else beside the working directory.
    repo = Path(__file__).resolve().parents[3]
    candidates = [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The benchmark data root: the argument, else $DLP_LORA_DATA, else ../shared/data beside the repo."""
    chosen = data_dir or os.environ.get("DLP_LORA_DATA")
    path = Path(chosen) if chosen else _default_data_dir()
    if not path.is_dir():
        hint = "" if chosen else " (the default, ../shared/data beside the repository)"
        raise FileNotFoundError(
            f"no benchmark data directory at {path}{hint}; pass --data-dir DIR or set "
            "DLP_LORA_DATA to the folder that holds bbh/, gsm8k/, nutcracker-db/ ..."
        )
    return path


def read_rows(path: Path) -> list[Any]:
    """A JSON list (or object) or JSON lines file -> list of rows."""
    if not path.exists():
        raise FileNotFoundError(f"expected a data file at {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg})") from err
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
    return rows


def nutcracker(
    task: str, folders: Iterable[str], files: Iterable[str] = ("dev.json", "test.json"), shuffle_options: bool = False
):
    """Loader for nutcracker-db folders: {"centerpiece", "options", "correct_options_idx", ["context"]}.

    shuffle_options: reorder each example's options with a seed derived from its uid, for sources that
    always put the right answer first (TruthfulQA MC1): otherwise "always A" would score 100%.
    """
    folders, files = tuple(folders), tuple(files)

    def load(root: str) -> list[Example]:
        out = []
        for folder in folders:
            for name in files:
                path = Path(root) / "nutcracker-db" / folder / name
                if not path.exists() and len(files) > 1:
                    continue  # some tasks have no dev pool
                for i, row in enumerate(read_rows(path)):
                    question = row["centerpiece"]
                    if row.get("context"):
                        question = f"{row['context']}\nQuestion: {question}"
                    uid, options, gold = (
                        f"{task}/{folder}/{name}:{i}",
                        list(row["options"]),
                        row["correct_options_idx"][0],
                    )
                    if shuffle_options:
                        order = list(range(len(options)))
                        random.Random(uid).shuffle(order)  # str seeds are hashed with sha512: stable across runs
                        options, gold = [options[j] for j in order], order.index(gold)
                    out.append(mcq_example(uid, task, question, options, gold))
        if not out:
            raise FileNotFoundError(f"no nutcracker-db files for {task} under {root}/nutcracker-db/{folders[0]}")
        return out

    return load


def llm_adapters_boolq(task: str):
    """BoolQ as LLM-Adapters ships it: question only, answer true/false, rendered as two options."""

    def load(root: str) -> list[Example]:
        out = []
        for name in ("train.json", "test.json"):
            for i, row in enumerate(read_rows(Path(root) / "llm-adapters" / "boolq" / name)):
                question = re.search(r"question:\s*(.*?)\s*(?:\n|$)", row["instruction"]).group(1)
                question = question[0].upper() + question[1:].rstrip("?") + "?"
                out.append(
                    mcq_example(
                        f"{task}/{name}:{i}", task, question, ["true", "false"], 0 if row["answer"] == "true" else 1
                    )
                )
        return out

    return load


_OPTION = re.compile(r"^\(([A-Z])\)\s*(.*)$")


def _bbh_examples(root: str, name: str) -> list[dict]:
    return json.loads((Path(root) / "bbh" / f"{name}.json").read_text())["examples"]


def bbh_choice(task: str, name: str):
    """A BIG-Bench Hard task whose input lists 'Options:' ((A) ... or - Yes), re-rendered with letters."""

    def load(root: str) -> list[Example]:
        out = []
        for i, row in enumerate(_bbh_examples(root, name)):
            question, sep, opts = row["input"].rpartition("\nOptions:\n")
            if not sep:
                raise ValueError(f"bbh/{name}.json example {i}: expected an 'Options:' block in the input")
            lines = [ln.strip() for ln in opts.strip().splitlines() if ln.strip()]
            if len(lines) < 2:
                continue  # a truncated row in the source (snarks #61 stops mid-option): nothing to ask
            lettered = [_OPTION.match(ln) for ln in lines]
            if all(lettered):
                options = [m.group(2) for m in lettered]
                gold = [m.group(1) for m in lettered].index(row["target"].strip("()"))
            else:  # '- Yes' / '- No' options, target is the option text
                options = [ln.lstrip("- ").strip() for ln in lines]
                gold = options.index(row["target"])
            out.append(mcq_example(f"{task}/{i}", task, question, options, gold, source_prompt=row["input"]))
        return out

    return load


def bbh_free(task: str, name: str, instruction: str):
    """A free-form BIG-Bench Hard task; the answer is the target text."""

    def load(root: str) -> list[Example]:
        return [
            Example(
                uid=f"{task}/{i}",
                task=task,
                prompt=f"{row['input'].strip()}\n{instruction}".strip(),
                answer=row["target"],
                references=(row["target"],),
                question=row["input"].strip(),
                instruction=instruction,
                source_prompt=row["input"],
            )
            for i, row in enumerate(_bbh_examples(root, name))
        ]

    return load


def squad(task: str):
    """SQuAD v1.1 (official JSON); the first answer is the training target, all answers are references."""

    def load(root: str) -> list[Example]:
        data = json.loads((Path(root) / "squad-v1.1-dev" / "dev-v1.1.json").read_text())["data"]
        out = []
        for article in data:
            for para in article["paragraphs"]:
                for qa in para["qas"]:
                    refs = tuple(dict.fromkeys(a["text"].strip() for a in qa["answers"]))
                    question = f"Context: {para['context'].strip()}\nQuestion: {qa['question'].strip()}"
                    instruction = "Answer with a short span from the context."
                    out.append(
                        Example(
                            uid=f"{task}/{qa['id']}",
                            task=task,
                            prompt=f"{question}\n{instruction}",
                            answer=refs[0],
                            references=refs,
                            question=question,
                            instruction=instruction,
                        )
                    )
        return out

    return load


_CALC = re.compile(r"<<[^>]*>>")


def gsm8k(task: str):
    """GSM8K: worked solutions (calculator annotations removed) ending in '#### <number>'."""

    def load(root: str) -> list[Example]:
        out = []
        for i, row in enumerate(read_rows(Path(root) / "gsm8k" / "train.jsonl")):
            solution = _CALC.sub("", row["answer"]).strip()
            final = solution.rsplit("####", 1)[1].strip().replace(",", "")
            instruction = "Solve it step by step and end with '#### <number>'."
            out.append(
                Example(
                    uid=f"{task}/{i}",
                    task=task,
                    prompt=f"{row['question'].strip()}\n{instruction}",
                    answer=solution,
                    references=(final,),
                    question=row["question"].strip(),
                    instruction=instruction,
                )
            )
        return out

    return load


def user_file(task: str, path: str | os.PathLike):
    """A user's JSON list or JSONL of {"input", "output"} pairs (the format of the paper's code)."""

    def load(_root: str) -> list[Example]:
        out = []
        for i, row in enumerate(read_rows(Path(path))):
            if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) and row[k].strip() for k in ("input", "output")
            ):
                raise ValueError(
                    f'{path}: row {i}: expected {{"input": str, "output": str}} with non-empty '
                    f"strings, got {row!r:.120}"
                )
            out.append(
                Example(
                    uid=f"{task}/{i}",
                    task=task,
                    prompt=row["input"],
                    answer=row["output"],
                    references=(row["output"],),
                    question=row["input"],
                )
            )
        if not out:
            raise ValueError(f"{path}: no rows")
        return out

    return load


def hf_dataset(task: str, dataset: str, split: str = "train", input_field: str = "input", output_field: str = "output"):
    """A Hugging Face dataset with input/output text columns (needs `datasets` and network access)."""

    def load(_root: str) -> list[Example]:
        try:
            import datasets
        except ImportError as err:
            raise ModuleNotFoundError("loading a Hugging Face dataset needs `pip install datasets`") from err
        rows = datasets.load_dataset(dataset, split=split)
        return [
            Example(
                uid=f"{task}/{i}",
                task=task,
                prompt=str(r[input_field]),
                answer=str(r[output_field]),
                references=(str(r[output_field]),),
            )
            for i, r in enumerate(rows)
        ]

    return load
