"""One example, many ways to write its prompt: the formats real users send, for router training and testing.

A rendering is a pure function (example, seeded rng) -> prompt text built from the parts an `Example`
keeps (question, option texts, instruction line, the source's own prompt). Renderings vary what a
router must *not* key on: the option style ("(A)" / "A." / "1)" / inline), the instruction line, a chat
wrapper, case and whitespace noise, and head or tail truncation.

Two disjoint families: `TRAIN_RENDERINGS` may be used to train a router; `HELD_OUT_RENDERINGS` are
formats (other wrappers, option styles, instruction wordings, noise and cuts) that training never sees,
so a test on them measures format robustness, not memory of a template.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dlp_lora.tasks.types import Example

__all__ = [
    "Rendering",
    "RENDERINGS",
    "TRAIN_RENDERINGS",
    "HELD_OUT_RENDERINGS",
    "render",
    "render_many",
    "rendering_rng",
]

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CHATML = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
# Held-out instruction wordings (never in training): what a user might write instead of the project's line.
_PARAPHRASES_MCQ = (
    "Choose the best answer.",
    "Which option is correct?",
    "Pick one option and explain briefly.",
    "Select the right choice.",
)
_PARAPHRASES_QA = ("Give only the final answer.", "Reply briefly.", "What is the answer?")


@dataclass(frozen=True)
class Rendering:
    """A named prompt format; held_out formats are never used for training."""

    name: str
    held_out: bool
    fn: Callable[[Example, random.Random], str]


# ---- parts -----------------------------------------------------------------------------------------


def _options(ex: Example, style: str) -> str:
    """The option block of a multiple-choice example in one style; '' for free-form examples."""
    if not ex.options:
        return ""
    marks = {
        "dot": [f"{_LETTERS[i]}. " for i in range(len(ex.options))],
        "paren": [f"({_LETTERS[i]}) " for i in range(len(ex.options))],
        "num": [f"{i + 1}) " for i in range(len(ex.options))],
        "bracket": [f"[{_LETTERS[i]}] " for i in range(len(ex.options))],
        "lower": [f"{_LETTERS[i].lower()}) " for i in range(len(ex.options))],
        "dash": ["- " for _ in ex.options],
    }
    if style == "inline":
        return " ".join(f"({_LETTERS[i]}) {o}" for i, o in enumerate(ex.options))
    if style == "pipe":
        return " | ".join(f"{_LETTERS[i]}: {o}" for i, o in enumerate(ex.options))
    if style == "options_paren":  # BIG-Bench Hard's own layout
        return "Options:\n" + "\n".join(m + o for m, o in zip(marks["paren"], ex.options))
    return "\n".join(m + o for m, o in zip(marks[style], ex.options))


# Training-only option markup (none of it is a held-out style): markers, and one-line separators.
_MIXED_MARKS = ("{L}) ", "({n}) ", "Option {L} ", "* ", "{L} = ", "{n}. ")
_MIXED_SEPS = ("\n", "; ", ", ", " / ", "  ")


def _mixed_options(ex: Example, rng: random.Random) -> str:
    """Question and options in a random training-only markup, on their own lines or on one line, with the
    example's instruction or none: so the router stops keying on how options are written."""
    if not ex.options:
        return _compose(ex, "paren", rng.choice((None, "")))
    mark, sep = rng.choice(_MIXED_MARKS), rng.choice(_MIXED_SEPS)
    block = sep.join(mark.format(L=_LETTERS[i], n=i + 1) + o for i, o in enumerate(ex.options))
    line = rng.choice((ex.instruction, ""))
    return "\n".join(part for part in (_question(ex), block, line) if part)


def _question(ex: Example) -> str:
    return ex.question or ex.prompt


def _compose(ex: Example, style: str, instruction: str | None) -> str:
    """Question, options in `style`, then the instruction (the example's own when None, none when '')."""
    line = ex.instruction if instruction is None else instruction
    return "\n".join(part for part in (_question(ex), _options(ex, style), line) if part)


def _source(ex: Example) -> str:
    return ex.source_prompt.strip() or ex.prompt


def _base(ex: Example, rng: random.Random) -> str:
    """One of the plain training formats, for the wrappers and noise to act on."""
    return rng.choice((ex.prompt, _source(ex), _compose(ex, "paren", None), _compose(ex, "dot", "")))


def _paraphrase(ex: Example, rng: random.Random) -> str:
    return rng.choice(_PARAPHRASES_MCQ if ex.options else _PARAPHRASES_QA)


def _cut(text: str, keep: float, from_head: bool) -> str:
    """Keep a `keep` fraction of the words, dropping them from the head (True) or the tail."""
    words = text.split(" ")
    n = max(1, round(keep * len(words)))
    return " ".join(words[len(words) - n :] if from_head else words[:n])


def _whitespace_noise(text: str, rng: random.Random) -> str:
    """Doubled spaces, tabs, collapsed or doubled newlines, stray leading/trailing blanks."""
    out = []
    for ch in text:
        if ch == " " and rng.random() < 0.15:
            out.append(rng.choice(("  ", "\t", "   ")))
        elif ch == "\n":
            out.append(rng.choice((" ", "\n\n", "\n", "\n ")))
        else:
            out.append(ch)
    return rng.choice(("", " ", "\n")) + "".join(out) + rng.choice(("", " ", "\n"))


def _case_swap(text: str, rng: random.Random, rate: float = 0.15) -> str:
    """Capitalise or upper-case a random fraction of the words (held-out case noise)."""
    return re.sub(
        r"[A-Za-z]+",
        lambda m: (
            (m.group(0).upper() if rng.random() < 0.5 else m.group(0).capitalize())
            if rng.random() < rate
            else m.group(0)
        ),
        text,
    )


# ---- the renderings ---------------------------------------------------------------------------------

_TRAIN: tuple[Rendering, ...] = (
    Rendering("template", False, lambda ex, rng: ex.prompt),
    Rendering("source", False, lambda ex, rng: _source(ex)),
    Rendering("paren", False, lambda ex, rng: _compose(ex, "paren", None)),
    Rendering("numbered", False, lambda ex, rng: _compose(ex, "num", None)),
    Rendering("inline", False, lambda ex, rng: _compose(ex, "inline", rng.choice((None, "")))),
    Rendering("mixed_options", False, _mixed_options),
    Rendering("no_instruction", False, lambda ex, rng: _compose(ex, rng.choice(("dot", "paren")), "")),
    Rendering("chatml", False, lambda ex, rng: _CHATML.format(_base(ex, rng))),
    Rendering("user_assistant", False, lambda ex, rng: f"User: {_base(ex, rng)}\nAssistant:"),
    Rendering("lowercase", False, lambda ex, rng: _base(ex, rng).lower()),
    Rendering("whitespace", False, lambda ex, rng: _whitespace_noise(_base(ex, rng), rng)),
    Rendering("head_cut", False, lambda ex, rng: _cut(_base(ex, rng), rng.uniform(0.5, 0.8), from_head=True)),
    Rendering("tail_cut", False, lambda ex, rng: _cut(_base(ex, rng), rng.uniform(0.5, 0.8), from_head=False)),
)
_HELD_OUT: tuple[Rendering, ...] = (
    Rendering("bbh_options", True, lambda ex, rng: _compose(ex, "options_paren", "")),
    Rendering("bracket_paraphrase", True, lambda ex, rng: _compose(ex, "bracket", _paraphrase(ex, rng))),
    Rendering("lower_letters", True, lambda ex, rng: _compose(ex, "lower", "")),
    Rendering("pipe_options", True, lambda ex, rng: _compose(ex, "pipe", _paraphrase(ex, rng))),
    Rendering("dash_options", True, lambda ex, rng: _compose(ex, "dash", None)),
    Rendering("alpaca", True, lambda ex, rng: f"### Instruction:\n{ex.prompt}\n\n### Response:\n"),
    Rendering("llama_inst", True, lambda ex, rng: f"[INST] {_source(ex)} [/INST]"),
    Rendering("qa_wrapper", True, lambda ex, rng: f"Q: {_compose(ex, 'inline', '')}\nA:"),
    Rendering("case_noise", True, lambda ex, rng: _case_swap(ex.prompt, rng)),
    Rendering(
        "both_cut",
        True,
        lambda ex, rng: _cut(_cut(ex.prompt, rng.uniform(0.75, 0.9), True), rng.uniform(0.75, 0.9), False),
    ),
)

RENDERINGS: dict[str, Rendering] = {r.name: r for r in _TRAIN + _HELD_OUT}
TRAIN_RENDERINGS: tuple[str, ...] = tuple(r.name for r in _TRAIN)
"""Formats a router may be trained on."""
HELD_OUT_RENDERINGS: tuple[str, ...] = tuple(r.name for r in _HELD_OUT)
"""Formats kept out of training, to test format robustness."""


def rendering_rng(ex: Example, name: str, seed: int = 0) -> random.Random:
    """The rng a rendering of one example uses: fixed by (uid, rendering, seed), stable across processes."""
    digest = hashlib.sha256(f"{ex.uid}|{name}|{seed}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def render(ex: Example, name: str, seed: int = 0) -> str:
    """The prompt of `ex` in rendering `name` (deterministic for a given seed); never empty."""
    rendering = RENDERINGS.get(name)
    if rendering is None:
        raise ValueError(f"unknown rendering {name!r}; known renderings: {list(RENDERINGS)}")
    text = rendering.fn(ex, rendering_rng(ex, name, seed))
    return text if text.strip() else ex.prompt


def render_many(
    examples: Sequence[Example], names: Sequence[str], per_example: int | None = None, seed: int = 0
) -> list[tuple[Example, str, str]]:
    """(example, rendering name, text) triples: every name per example, or `per_example` names drawn per
    example without replacement (seeded by the example's uid, so a subset of examples draws the same)."""
    unknown = [n for n in names if n not in RENDERINGS]
    if unknown:
        raise ValueError(f"unknown renderings {unknown}; known renderings: {list(RENDERINGS)}")
    if per_example is not None and not 1 <= per_example <= len(names):
        raise ValueError(f"per_example must be in [1, {len(names)}], got {per_example}")
    out = []
    for ex in examples:
        chosen = (
            list(names) if per_example is None else rendering_rng(ex, "draw", seed).sample(list(names), per_example)
        )
        out += [(ex, n, render(ex, n, seed)) for n in chosen]
    return out
