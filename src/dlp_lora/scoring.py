"""Log-likelihood of continuations after chat prompts, as lm-evaluation-harness scores multiple choice.

Model-agnostic: training scores dev options with a peft model, the pipeline with the fused model under
each row's routing (it passes `scope`, which sets the routing of each chunk of rows).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlp_lora.chat import chat_prompt, left_pad

__all__ = ["continuation_logprobs", "option_choice", "Scope"]

Scope = Callable[[list[int]], AbstractContextManager]
"""Given the prompt index of each row of a chunk, a context manager to run that chunk under."""


@torch.no_grad()
def continuation_logprobs(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
    options: Sequence[Sequence[str]], batch_size: int = 16, scope: Scope | None = None,
) -> list[list[float]]:
    """Summed log-probability of each option's tokens after its prompt's chat template; shaped like `options`.

    The option is the assistant's answer, tokenised on its own as in training. When every option is one
    token (letters) one forward pass per prompt gives them all; otherwise each (prompt, option) is a row.
    """
    if len(prompts) != len(options):
        raise ValueError(f"expected one option list per prompt, got {len(prompts)} prompts and {len(options)} lists")
    ctx = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    conts = [[tokenizer(o, add_special_tokens=False)["input_ids"] for o in opts] for opts in options]
    if any(not c for cs in conts for c in cs):
        raise ValueError("every option must be non-empty text")
    scope = scope or (lambda owners: nullcontext())
    if all(len(c) == 1 for cs in conts for c in cs):
        last = _last_logprobs(model, tokenizer, ctx, list(range(len(ctx))), batch_size, 1, scope)
        return [[float(lp[0, c[0]]) for c in cs] for lp, cs in zip(last, conts)]
    rows, owners, opts = [], [], []
    for b, cs in enumerate(conts):
        for c in cs:
            rows.append(ctx[b] + c)
            owners.append(b)
            opts.append(c)
    logps = _last_logprobs(model, tokenizer, rows, owners, batch_size, max(map(len, opts)) + 1, scope)
    # lp holds the row's last positions; the n option tokens are predicted by lp[-n-1], ..., lp[-2].
    scores = [float(sum(lp[j - len(c) - 1, t] for j, t in enumerate(c))) for lp, c in zip(logps, opts)]
    out, k = [], 0
    for cs in conts:
        out.append(scores[k: k + len(cs)])
        k += len(cs)
    return out


def _last_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[list[int]],
                   owners: list[int], batch_size: int, keep_last: int, scope: Scope) -> list[torch.Tensor]:
    """Log-softmax over the vocabulary at each row's last `keep_last` positions: list of (keep_last, V)."""
    # Similar lengths side by side: less padding per chunk.
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    by_row: dict[int, torch.Tensor] = {}
    for i in range(0, len(order), batch_size):
        chunk = order[i: i + batch_size]
        ids, mask = left_pad([rows[j] for j in chunk], tokenizer.pad_token_id or 0)
        device = next(model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
        with scope([owners[j] for j in chunk]):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           logits_to_keep=keep_last).logits
        for j, lp in zip(chunk, torch.log_softmax(logits.float(), -1).cpu()):  # read per token on the host
            by_row[j] = lp
    return [by_row[j] for j in range(len(rows))]


def option_choice(logprobs: Sequence[float], options: Sequence[str], normalize: bool) -> int:
    """Index of the best option: highest summed log-likelihood (`acc`), or per UTF-8 byte of the option
    text (`acc_norm`, lm-evaluation-harness's length normalisation). The first wins ties."""
    scores = [lp / max(len(o.encode("utf-8")), 1) if normalize else lp for lp, o in zip(logprobs, options)]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
