"""What a task is: its examples, its kind, how its answers are read and scored. No file reading here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Example", "Task", "Splits", "Metric"]

Metric = Literal["choice", "squad", "numeric", "exact"]


@dataclass(frozen=True)
class Example:
    """One prompt with its training target and scoring references.

    prompt: the user turn the model sees (already rendered with the task's template);
    answer: the target text an adapter is trained to produce;
    references: every acceptable answer for scoring (for `choice` tasks, the gold letter);
    choices: for multiple choice, the option letters in order (scored by log-likelihood), else ().
    uid: stable id "<task>/<source row>", unique within the task, used for resume and disjointness.
    The parts the prompt was rendered from, so it can be rendered other ways (router augmentation):
    question: the stem (with its context), without options or instruction; options: the option texts of a
    multiple-choice example, aligned with `choices`; instruction: the answer-format line ('' if none);
    source_prompt: the prompt as the source itself writes it ('' when it is `prompt`).
    """

    uid: str
    task: str
    prompt: str
    answer: str
    references: tuple[str, ...]
    choices: tuple[str, ...] = ()
    question: str = ""
    options: tuple[str, ...] = ()
    instruction: str = ""
    source_prompt: str = ""

    def __post_init__(self) -> None:
        if not self.prompt.strip() or not self.answer.strip():
            raise ValueError(f"example {self.uid}: prompt and answer must be non-empty")
        if not self.references:
            raise ValueError(f"example {self.uid}: expected at least one reference answer")
        if self.choices and self.references[0] not in self.choices:
            raise ValueError(f"example {self.uid}: gold {self.references[0]!r} is not among choices {self.choices}")
        if self.options and len(self.options) != len(self.choices):
            raise ValueError(f"example {self.uid}: {len(self.options)} option texts for {len(self.choices)} choices")

    @property
    def gold_index(self) -> int:
        """Multiple choice: the position of the gold option (references[0] is its letter)."""
        return self.choices.index(self.references[0])


@dataclass(frozen=True)
class Task:
    """A named task: where its rows come from and how its answers are parsed and scored.

    load(data_dir) returns every example of the task in a fixed order; `splits.load_splits` shuffles
    and cuts them. max_new_tokens bounds generation when evaluating; headline names the score that
    averages use (accuracy for multiple choice, F1 for SQuAD, exact match otherwise).
    """

    name: str
    kind: Literal["mcq", "qa"]
    source: str
    metric: Metric
    load: Callable[[str], list[Example]]
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        if self.kind not in ("mcq", "qa"):
            raise ValueError(f"task {self.name!r}: kind must be mcq|qa, got {self.kind!r}")
        if (self.kind == "mcq") != (self.metric == "choice"):
            raise ValueError(
                f"task {self.name!r}: mcq tasks use the 'choice' metric and qa tasks the others; "
                f"got kind={self.kind!r}, metric={self.metric!r}"
            )

    @property
    def headline(self) -> str:
        """Key of the score that summarises this task."""
        return {"choice": "accuracy", "squad": "f1"}.get(self.metric, "em")


@dataclass(frozen=True)
class Splits:
    """Disjoint train/dev/test examples of one task, and a held-out gate split (possibly empty) that
    neither training nor checkpoint selection sees."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]
    gate: list[Example] = field(default_factory=list)
