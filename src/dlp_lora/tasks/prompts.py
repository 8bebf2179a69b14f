"""Prompt templates and answer normalisers shared by every task.

Multiple-choice tasks all use one template (question, lettered options, an instruction to answer with
the correct option), so the router has to recognise a task by its content, not by its formatting, as it
must for real traffic. The training target of a multiple-choice example is the gold option's text, the
continuation whose log-likelihood the headline metric (`acc_norm`) reads; a letter alone gave the model
one token of signal per example and adapters collapsed onto one letter (docs/training.md).
`parse_answer` turns a generated text back into what the task's metric compares.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

from dlp_lora.tasks.types import Example, Task

__all__ = ["LETTERS", "mcq_prompt", "mcq_example", "parse_answer", "normalize_text", "extract_number", "parse_choice"]

LETTERS = string.ascii_uppercase
MCQ_INSTRUCTION = "Answer with the correct option."


def mcq_prompt(question: str, options: Sequence[str]) -> str:
    """'question\\nA. opt\\nB. opt\\n...\\nAnswer with the correct option.'"""
    if not 2 <= len(options) <= len(LETTERS):
        raise ValueError(f"expected 2 to {len(LETTERS)} options, got {len(options)}")
    lines = [question.strip()] + [f"{LETTERS[i]}. {str(o).strip()}" for i, o in enumerate(options)]
    return "\n".join(lines + [MCQ_INSTRUCTION])


def mcq_example(
    uid: str, task: str, question: str, options: Sequence[str], gold: int, source_prompt: str = ""
) -> Example:
    """A multiple-choice example: trained to answer the gold option's text, scored by its letter (reference)."""
    if not 0 <= gold < len(options):
        raise ValueError(f"{uid}: gold option index {gold} out of range for {len(options)} options")
    letters = tuple(LETTERS[: len(options)])
    texts = tuple(str(o).strip() for o in options)
    return Example(
        uid=uid,
        task=task,
        prompt=mcq_prompt(question, options),
        answer=texts[gold],
        references=(letters[gold],),
        choices=letters,
        question=question.strip(),
        options=texts,
        instruction=MCQ_INSTRUCTION,
        source_prompt=source_prompt,
    )


def normalize_text(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def extract_number(text: str) -> str:
    """The answer number of a generated text: after '####' when present, else the last number; '' if none.

    Commas are dropped and integral floats written as integers ('1,000.0' -> '1000').
    """
    tail = text.split("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return ""
    raw = (found[0] if "####" in text else found[-1]).replace(",", "")
    try:
        value = Decimal(raw)  # exact: float() would corrupt integers above 2**53
    except InvalidOperation:
        return raw
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def parse_choice(text: str, choices: Sequence[str], options: Sequence[str] = ()) -> str:
    """The option a generated text names, as its letter; '' when none does.

    With option texts: the option whose normalised text the answer starts with (the longest such option,
    so 'red apple' beats 'red'), else a letter: 'B', '(B)', 'B.', 'Answer: B' ...
    """
    said = normalize_text(text)
    if options and said:
        hits = [
            (len(normalize_text(o)), i)
            for i, o in enumerate(options)
            if normalize_text(o) and (said == normalize_text(o) or said.startswith(normalize_text(o) + " "))
        ]
        if hits:
            return choices[max(hits)[1]]
    allowed = "".join(choices)
    match = re.search(rf"(?<![A-Za-z])\(?([{allowed}])\)?(?![A-Za-z])", text.strip())
    return match.group(1) if match else ""


def parse_answer(task: Task, text: str, choices: Sequence[str] = (), options: Sequence[str] = ()) -> str:
    """What the task's metric compares against the references, read from a generated text."""
    if task.metric == "choice":
        return parse_choice(text, choices or LETTERS, options)
    if task.metric == "numeric":
        return extract_number(text)
    return text.strip().split("\n", 1)[0].strip() if task.metric in ("squad", "exact") else text.strip()
