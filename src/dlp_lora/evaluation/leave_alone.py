"""Out-of-pool prompts: does a routing leave what no adapter was trained for to the base model?

The trained router has a `none` class for such prompts; Arrow has none (every token goes to its top-k
experts) and a baseline adapter answers everything. Each setting's greedy answers to held-out out-of-pool
prompts are compared with the base model's: the share that are identical, and how much less likely the
base model's own answer becomes under the setting (nats per answer token, teacher-forced).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from dlp_lora.config import GenerationConfig
from dlp_lora.evaluation.harness import plan_mean_k, rows_routing
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.tasks import Example
from dlp_lora.types import ArrowRouting

__all__ = ["evaluate_leave_alone"]


def evaluate_leave_alone(
    dlp: DLPLoRA,
    examples: Sequence[Example],
    settings: Mapping[str, torch.Tensor | ArrowRouting],
    max_new_tokens: int = 32,
    batch_size: int = 8,
) -> dict:
    """Per setting: `same_answer` (share of answers identical to the base model's, 0-1), `drift_nats`
    (mean, over the `scored` prompts the base model answers with some text, of the base answer's
    log-likelihood per token under the base model minus under the setting: 0 when left alone) and
    `mean_k` (adapters per prompt; Arrow's top_k per token).

    settings: name -> (B, bank) weights for these examples, or an `ArrowRouting` for all of them.
    """
    if not examples:
        raise ValueError("out-of-pool comparison needs at least one prompt")
    prompts = [ex.prompt for ex in examples]
    gen = GenerationConfig(max_new_tokens=max_new_tokens)
    base = torch.zeros(len(prompts), len(dlp.adapter_names))

    def answers(setting) -> list[str]:
        return [
            r.text
            for i in range(0, len(prompts), batch_size)
            for r in dlp.generate(
                prompts[i : i + batch_size],
                config=gen,
                routing=rows_routing(setting, range(i, min(i + batch_size, len(prompts)))),
            )
        ]

    base_answers = answers(base)
    # The drift is read on the prompts the base model answers with some text (an empty answer has no tokens
    # to score); rows keep their positions so a setting's weights stay aligned with its prompts.
    scored = [i for i, a in enumerate(base_answers) if a.strip()]

    def logprobs(setting) -> list[float]:
        lps = []
        for i in range(0, len(scored), batch_size):
            rows = scored[i : i + batch_size]
            options = [[base_answers[b]] for b in rows]
            lps += [
                lp[0] for lp in dlp.option_logprobs([prompts[b] for b in rows], options, rows_routing(setting, rows))
            ]
        return lps

    base_lp = logprobs(base)
    tokens = [len(dlp.tokenizer(base_answers[b], add_special_tokens=False)["input_ids"]) for b in scored]
    out: dict = {"prompts": len(prompts), "scored": len(scored), "sources": len({ex.task for ex in examples}),
                 "settings": list(settings)}  # fmt: skip
    for name, setting in tqdm(settings.items(), desc="out-of-pool prompts", total=len(settings)):
        texts, lp = answers(setting), logprobs(setting)
        out[name] = {
            "same_answer": sum(a == b for a, b in zip(texts, base_answers)) / len(prompts),
            "drift_nats": sum((b - s) / n for b, s, n in zip(base_lp, lp, tokens)) / max(len(scored), 1),
            "mean_k": plan_mean_k(setting),
        }
    return out
