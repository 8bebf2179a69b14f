"""The task registry (26 tasks from ../shared/data: 17 multiple choice, 9 free-form QA) and its splits.

The pool is what the bundled assets serve. Tasks replaced in it (docs/tasks.md says why) stay loadable
by name (`EXTRA_TASKS`), e.g. for evaluation or as out-of-pool prompts for the router.

Splits are deterministic: a task's examples are de-duplicated by prompt (so no prompt can sit in two
splits), shuffled with a seed derived from the task name and `SplitConfig.seed`, then cut into test,
dev and train in that order; the training split is capped at `train_cap`.
"""

from __future__ import annotations

import hashlib
import os
import random
from functools import lru_cache
from pathlib import Path

from dlp_lora.config import SplitConfig
from dlp_lora.tasks import loaders as L
from dlp_lora.tasks.types import Example, Splits, Task

__all__ = [
    "TASKS",
    "EXTRA_TASKS",
    "REPLACEMENTS",
    "get_task",
    "task_names",
    "load_examples",
    "load_splits",
    "pool_table",
]


def _mcq(name: str, source: str, load) -> Task:
    return Task(name=name, kind="mcq", source=source, metric="choice", load=load, max_new_tokens=4)


def _mmlu(task: str):
    def load(root: str) -> list[Example]:
        folders = sorted(p.name for p in (Path(root) / "nutcracker-db").glob("mmlu-*"))
        return L.nutcracker(task, folders)(root)

    return load


def _bbh_mcq(name: str) -> Task:
    return _mcq(f"bbh_{name}", f"bbh/{name}.json", L.bbh_choice(f"bbh_{name}", name))


def _bbh_qa(name: str, metric: str, instruction: str, max_new_tokens: int) -> Task:
    return Task(
        name=f"bbh_{name}",
        kind="qa",
        source=f"bbh/{name}.json",
        metric=metric,  # type: ignore[arg-type]
        load=L.bbh_free(f"bbh_{name}", name, instruction),
        max_new_tokens=max_new_tokens,
    )


def _builtin() -> dict[str, Task]:
    nut = "nutcracker-db/"
    tasks = [
        _mcq("arc_challenge", nut + "arc-challenge", L.nutcracker("arc_challenge", ["arc-challenge"])),
        _mcq("arc_easy", nut + "arc-easy", L.nutcracker("arc_easy", ["arc-easy"])),
        _mcq("openbookqa", nut + "openbookqa", L.nutcracker("openbookqa", ["openbookqa"])),
        _mcq("piqa", nut + "piqa", L.nutcracker("piqa", ["piqa"])),
        _mcq("socialiqa", nut + "socialiqa", L.nutcracker("socialiqa", ["socialiqa"])),
        _mcq("winogrande", nut + "winogrande", L.nutcracker("winogrande", ["winogrande"])),
        _mcq("commonsenseqa", nut + "commonsenseqa", L.nutcracker("commonsenseqa", ["commonsenseqa"])),
        _mcq(
            "truthfulqa_mc1",
            nut + "truthfulqa-mc1 (options shuffled)",
            L.nutcracker("truthfulqa_mc1", ["truthfulqa-mc1"], ("test.json",), shuffle_options=True),
        ),
        _mcq("mmlu", nut + "mmlu-* (57 subjects)", _mmlu("mmlu")),
        _mcq("boolq", "llm-adapters/boolq (question only)", L.llm_adapters_boolq("boolq")),
        _bbh_mcq("date_understanding"),
        _bbh_mcq("logical_deduction_three_objects"),
        _bbh_mcq("tracking_shuffled_objects_three_objects"),
        _bbh_mcq("navigate"),
        _bbh_mcq("hyperbaton"),
        _bbh_mcq("snarks"),
        _bbh_mcq("movie_recommendation"),
        Task(
            name="squad",
            kind="qa",
            source="squad-v1.1-dev/dev-v1.1.json",
            metric="squad",
            load=L.squad("squad"),
            max_new_tokens=24,
        ),
        _bbh_qa("formal_fallacies", "exact", "Answer valid or invalid.", 4),
        _bbh_qa("causal_judgement", "exact", "Answer Yes or No.", 4),
        _bbh_qa("object_counting", "numeric", "Answer with a number.", 6),
        _bbh_qa("boolean_expressions", "exact", "Answer True or False.", 4),
        _bbh_qa("web_of_lies", "exact", "Answer Yes or No.", 4),
        _bbh_qa("sports_understanding", "exact", "Answer yes or no.", 4),
        _bbh_qa("word_sorting", "exact", "", 64),
        _bbh_qa("dyck_languages", "exact", "", 24),
    ]
    return {t.name: t for t in tasks}


def _replaced() -> dict[str, Task]:
    tasks = [
        Task(
            name="gsm8k",
            kind="qa",
            source="gsm8k/train.jsonl",
            metric="numeric",
            load=L.gsm8k("gsm8k"),
            max_new_tokens=160,
        ),
        _bbh_qa("multistep_arithmetic_two", "numeric", "Answer with a number.", 8),
    ]
    return {t.name: t for t in tasks}


REPLACEMENTS: dict[str, tuple[str, str]] = {
    "gsm8k": (
        "bbh_formal_fallacies",
        "0.0 for every method, the base model and its own adapter included (30 test examples, v1 assets): "
        "multi-step arithmetic in a worked solution is beyond a 135M model, so it measured nothing about "
        "routing",
    ),
    "bbh_multistep_arithmetic_two": (
        "bbh_causal_judgement",
        "3.3 (one example in 30) for the base model, its adapter and every routed method "
        "(v1 assets): the answer is one number computed in several steps, right only by luck at 135M",
    ),
}
"""Tasks taken out of the pool: name -> (the task that took its place, why). Both replacements are
BIG-Bench Hard tasks with a short answer a small model can learn the format and some of the content of."""

TASKS: dict[str, Task] = _builtin()
"""The built-in pool. User tasks (e.g. `loaders.user_file`) are `Task` objects passed where a task is taken."""
EXTRA_TASKS: dict[str, Task] = _replaced()
"""Built-in tasks outside the pool (replaced as unlearnable at 135M: 0 and 3 points for every method)."""


def task_names() -> list[str]:
    """The built-in pool in registry order (17 mcq first, then 9 qa)."""
    return list(TASKS)


def get_task(name: str | Task) -> Task:
    """A built-in task by name (a `Task` is returned as is); ValueError listing the known names otherwise."""
    if isinstance(name, Task):
        return name
    task = TASKS.get(name) or EXTRA_TASKS.get(name)
    if task is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {task_names()} and {list(EXTRA_TASKS)}")
    return task


@lru_cache(maxsize=64)
def _load_cached(name: str, root: str) -> tuple[Example, ...]:
    return tuple(get_task(name).load(root))


def load_examples(task: Task, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """Every example of a task, de-duplicated by prompt (first occurrence kept), in file order."""
    builtin = (TASKS.get(task.name) or EXTRA_TASKS.get(task.name)) is task
    # User tasks read their own files: they must work where no benchmark data exists.
    root = str(L.resolve_data_dir(data_dir)) if builtin else str(data_dir or "")
    seen: set[str] = set()
    out = []
    for ex in _load_cached(task.name, root) if builtin else task.load(root):
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out


def _seed(task: str, seed: int) -> int:
    # Stable across processes (unlike hash()), different per task.
    return int.from_bytes(hashlib.sha256(f"{task}:{seed}".encode()).digest()[:8], "big")


def load_splits(task: Task, data_dir: str | os.PathLike | None = None, cfg: SplitConfig = SplitConfig()) -> Splits:
    """Seeded disjoint splits: test = min(test_size, 30%), dev = min(dev_size, 10%), train = the rest, capped,
    gate = up to gate_size of what the cap left over."""
    examples = load_examples(task, data_dir)
    if len(examples) < 3:
        raise ValueError(f"task {task.name!r}: need at least 3 distinct examples to split, found {len(examples)}")
    random.Random(_seed(task.name, cfg.seed)).shuffle(examples)
    n = len(examples)
    n_test = max(1, min(cfg.test_size, int(0.3 * n)))
    n_dev = min(cfg.dev_size, n // 10)
    test, dev = examples[:n_test], examples[n_test : n_test + n_dev]
    rest = examples[n_test + n_dev :]
    train, gate = rest[: cfg.train_cap], rest[cfg.train_cap :][: cfg.gate_size]
    return Splits(train=train, dev=dev, test=test, gate=gate)


def pool_table(
    data_dir: str | os.PathLike | None = None, cfg: SplitConfig = SplitConfig(), results: dict | None = None
) -> str:
    """The pool as a markdown table: task, kind, source, examples, split sizes, metric; with `results` (an
    evaluation's results.json) also the base model's and the task's own adapter's (`oracle`) test scores."""
    scored = results["per_task"] if results else {}
    extra = " base | oracle |" if scored else ""
    lines = [
        "# Task pool",
        "",
        f"Generated by `dlp-lora tasks --markdown docs/tasks.md{' --results docs/results.json' if scored else ''}` "
        f"(split seed {cfg.seed}, train cap {cfg.train_cap}, dev <= {cfg.dev_size}, test <= {cfg.test_size}, "
        f"gate <= {cfg.gate_size}). "
        "Data: ../shared/data (see its SOURCES.md). Every multiple-choice task uses one template (question, "
        "lettered options, 'Answer with the correct option.'); an adapter is trained to answer the gold "
        "option's text and scored by `acc_norm` (the option text with the highest log-likelihood per byte). "
        "Splits are seeded shuffles of the de-duplicated examples, so no prompt appears in two splits; the "
        "gate split (what the training cap leaves, held out for the deployment gate) is empty for small tasks, "
        "which are gated on dev.",
        "",
        "| # | task | kind | source | examples | train | dev | test | gate | metric (headline) |" + extra,
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if scored else ""),
    ]
    for i, name in enumerate(task_names(), 1):
        task = get_task(name)
        total = len(load_examples(task, data_dir))
        s = load_splits(task, data_dir, cfg)
        head = "acc_norm" if task.kind == "mcq" else task.headline
        row = (
            f"| {i} | {name} | {task.kind} | {task.source} | {total} | {len(s.train)} | {len(s.dev)} | "
            f"{len(s.test)} | {len(s.gate)} | {task.metric} ({head}) |"
        )
        if scored:
            got = scored.get(name, {})
            row += "".join(f" {got[m][head]:.1f} |" if head in got.get(m, {}) else " - |" for m in ("base", "oracle"))
        lines.append(row)
    kinds = [get_task(n).kind for n in task_names()]
    lines += [
        "",
        f"{len(kinds)} tasks: {kinds.count('mcq')} multiple choice, {kinds.count('qa')} question answering.",
        "",
        "## Replaced tasks",
        "",
        "Taken out of the pool as unlearnable at 135M (their loaders stay: `get_task` still knows them).",
        "",
        "| task | replaced by | why |",
        "|---|---|---|",
    ]
    lines += [f"| {old} | {new} | {why} |" for old, (new, why) in REPLACEMENTS.items()]
    return "\n".join(lines) + "\n"
