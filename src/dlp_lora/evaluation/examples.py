"""Per-example scores of one model on one task's examples: what dev curves, the dev gate and paired
bootstrap intervals need (a mean alone cannot be paired).

Multiple choice is scored by the log-likelihood of each full option text after the prompt, as
lm-evaluation-harness does: `acc` (summed) and `acc_norm` (per byte, the headline). Free-form tasks are
generated greedily and scored by their headline metric (token F1 for SQuAD, exact match otherwise).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlp_lora.chat import prompt_ids
from dlp_lora.config import GenerationConfig
from dlp_lora.engine import Engine, Row
from dlp_lora.evaluation.metrics import choice_accuracy, exact_match, numeric_match, token_f1
from dlp_lora.evaluation.stats import Interval, bootstrap_auc
from dlp_lora.scoring import continuation_logprobs, option_choice, per_byte
from dlp_lora.tasks import Example, Task, parse_answer

__all__ = ["ExampleScores", "example_scores", "headline_score", "majority_share", "MCQ_HEADLINE", "COLLAPSE_SHARE"]

MCQ_HEADLINE = "acc_norm"
"""The multiple-choice headline: length-normalised option-text log-likelihood accuracy."""


@dataclass
class ExampleScores:
    """Scores of each example (0 or 100 for accuracy, 0-100 for F1), in example order.

    headline: the task's headline metric; metrics: every per-example metric by name; chosen: for
    multiple choice the option index picked by the headline (for the collapse check), else the parsed
    answer; texts: generated texts (free-form tasks only).
    """

    headline: list[float]
    metrics: dict[str, list[float]] = field(default_factory=dict)
    chosen: list = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.headline) / max(len(self.headline), 1)


def headline_score(metric: str, parsed: str, references: Sequence[str]) -> float:
    """One free-form answer's headline score in [0, 100] (see `Task.headline`)."""
    if metric == "squad":
        return 100.0 * token_f1(parsed, references)
    if metric == "numeric":
        return 100.0 * numeric_match(parsed, references)
    if metric == "exact":
        return 100.0 * exact_match(parsed, references, squad=False)
    raise ValueError(f"no free-form headline for metric {metric!r}; expected squad|numeric|exact")


def generated_score(task: Task, parsed: str, references: Sequence[str]) -> float:
    """One generated answer's score in [0, 100]: the parsed choice's accuracy for multiple choice, else the
    task's free-form headline."""
    if task.kind == "mcq":
        return choice_accuracy([parsed], [references])
    return headline_score(task.metric, parsed, references)


def example_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[Example],
    batch_size: int = 8,
) -> ExampleScores:
    """Score `model` (a plain or peft model, routing already set if fused) on `examples` of `task`."""
    if task.kind == "mcq":
        missing = [ex.uid for ex in examples if not ex.options]
        if missing:
            raise ValueError(f"task {task.name!r}: examples {missing[:3]} have no option texts to score")
        logps = continuation_logprobs(
            model,
            tokenizer,
            [ex.prompt for ex in examples],
            [list(ex.options) for ex in examples],
            batch_size=2 * batch_size,
        )
        return mcq_scores(logps, examples)
    scores = ExampleScores(headline=[])
    engine, params = Engine(model, tokenizer), GenerationConfig(max_new_tokens=task.max_new_tokens)
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        ids = prompt_ids(tokenizer, [ex.prompt for ex in chunk])
        rows = engine.generate([Row(prompt_ids=p, mixture={}, params=params) for p in ids])
        for ex, row in zip(chunk, rows):
            text = engine.text(row)
            parsed = parse_answer(task, text, ex.choices, ex.options)
            scores.headline.append(headline_score(task.metric, parsed, ex.references))
            scores.chosen.append(parsed)
            scores.texts.append(text)
    scores.metrics[task.headline] = scores.headline
    return scores


def mcq_scores(logprobs: Sequence[Sequence[float]], examples: Sequence[Example]) -> ExampleScores:
    """acc and acc_norm per example from each example's option log-likelihoods."""
    acc, norm, chosen = [], [], []
    for lp, ex in zip(logprobs, examples):
        pick = option_choice(lp, ex.options, normalize=True)
        acc.append(100.0 * (option_choice(lp, ex.options, normalize=False) == ex.gold_index))
        norm.append(100.0 * (pick == ex.gold_index))
        chosen.append(pick)
    return ExampleScores(
        headline=norm if MCQ_HEADLINE == "acc_norm" else acc, metrics={"acc": acc, "acc_norm": norm}, chosen=chosen
    )


def pooled_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: dict[str, Task],
    examples: Sequence[Example],
    batch_size: int = 8,
) -> ExampleScores:
    """Examples of several tasks (a generalist's dev split), each scored by its own task (`tasks[ex.task]`):
    headline scores and answers in example order; the mean pools every example."""
    missing = sorted({ex.task for ex in examples} - set(tasks))
    if missing:
        raise ValueError(f"examples of tasks {missing} but no Task for them; known: {sorted(tasks)}")
    headline: list[float] = [0.0] * len(examples)
    chosen: list = [None] * len(examples)
    for name, task in tasks.items():
        idx = [i for i, ex in enumerate(examples) if ex.task == name]
        if not idx:
            continue
        part = example_scores(model, tokenizer, task, [examples[i] for i in idx], batch_size)
        for i, h, c in zip(idx, part.headline, part.chosen):
            headline[i], chosen[i] = h, c
    return ExampleScores(headline=headline, chosen=chosen)


def option_auc(logprobs: Sequence[Sequence[float]], examples: Sequence[Example]) -> Interval | None:
    """On a two-option task, whether the model tells the answers apart or only leans to one: the AUC
    [95% bootstrap interval] of its acc_norm margin of the first option over the second for the examples
    whose gold is the first (0.5: the label prior alone); None for other tasks or one gold answer only."""
    if any(len(ex.options) != 2 for ex in examples) or len({ex.gold_index for ex in examples}) != 2:
        return None
    margin = [first - second for first, second in (per_byte(lp, ex.options) for lp, ex in zip(logprobs, examples))]
    return bootstrap_auc([int(ex.gold_index == 0) for ex in examples], margin)


COLLAPSE_SHARE = 0.8
"""Answers collapse when the most frequent one covers more than this share of prompts (and gold's does not)."""


def majority_share(chosen: Sequence) -> float:
    """Share (0-1) of the most frequent prediction: near 1 when a model answers one option for everything."""
    if not chosen:
        return 0.0
    return Counter(chosen).most_common(1)[0][1] / len(chosen)
