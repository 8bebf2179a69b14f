"""Log-likelihood of continuations after chat prompts, as lm-evaluation-harness scores multiple choice.

Model-agnostic: training scores dev options with a peft model, the pipeline with the fused model under
each row's routing (it passes `scope`, which sets the routing of each chunk of rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlp_lora.chat import chat_prompt, left_pad

__all__ = ["continuation_logprobs", "option_choice", "Scope"]

Scope = Callable[[list[int]], AbstractContextManager]
"""Given the prompt index of each row of a chunk, a context manager to run that chunk under."""


@torch.no_grad()
def continuation_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    batch_size: int = 16,
    scope: Scope | None = None,
    chat: bool = True,
) -> list[list[float]]:
    """Summed log-probability of each option's tokens after its prompt; shaped like `options`.

    `chat`: the prompt is a user message put in the chat template and the option is the assistant's answer;
    else the prompt is raw text scored as given (a raw completion's context). The option is tokenised on
    its own (as in training, and as lm-evaluation-harness tokenises a continuation). Each prompt is read
    once and its KV cache shared by its options, so an option costs its own tokens only.
    """
    if len(prompts) != len(options):
        raise ValueError(f"expected one option list per prompt, got {len(prompts)} prompts and {len(options)} lists")
    texts = [chat_prompt(tokenizer, p) for p in prompts] if chat else list(prompts)
    ctx = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if not all(ctx):
        raise ValueError("every prompt must tokenize to at least one token")
    conts = [[tokenizer(o, add_special_tokens=False)["input_ids"] for o in opts] for opts in options]
    if any(not c for cs in conts for c in cs):
        raise ValueError("every option must be non-empty text")
    scope = scope or (lambda owners: nullcontext())
    order = sorted(range(len(ctx)), key=lambda i: len(ctx[i]))  # similar lengths side by side: less padding
    out: dict[int, list[float]] = {}
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        scores = _shared_prompt_logprobs(
            model, tokenizer, [ctx[b] for b in chunk], [conts[b] for b in chunk], chunk, scope
        )
        out.update(zip(chunk, scores))
    return [out[b] for b in range(len(ctx))]


def _shared_prompt_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    ctx: list[list[int]],
    conts: list[list[list[int]]],
    owners: list[int],
    scope: Scope,
) -> list[list[float]]:
    """One chunk of prompts: each prompt is read once and its KV cache shared by all of its options (an
    option costs its own few tokens, not prompt + option again). The prompt's last position predicts an
    option's first token; the option's own positions predict the rest."""
    device = next(model.parameters()).device
    ids, mask = left_pad(ctx, tokenizer.pad_token_id or 0)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
    with scope(owners):
        pre = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    prompt_of = [b for b, cs in enumerate(conts) for _ in cs]  # option row -> its prompt in the chunk
    flat = [c for cs in conts for c in cs]
    width = max(map(len, flat))
    opt_ids = torch.tensor([c + [0] * (width - len(c)) for c in flat], device=device)  # right-padded (R, L)
    opt_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in flat], device=device)
    rows = torch.tensor(prompt_of, device=device)
    first = torch.log_softmax(pre.logits[:, -1].float(), -1)[rows].gather(-1, opt_ids[:, :1])[:, 0]  # (R,)
    scores = first
    if width > 1:  # else every option of this chunk is one token: the prompts' last positions said it all
        cache = pre.cache
        cache.batch_select_indices(rows)  # (P, ...) -> (R, ...): every option row attends to its own prompt
        # Right padding after an option is never attended by its real tokens (causal), so it changes nothing.
        with scope([owners[b] for b in prompt_of]):
            logits = model(
                input_ids=opt_ids[:, :-1],
                attention_mask=torch.cat([mask[rows], opt_mask[:, :-1]], 1),
                position_ids=positions[rows, -1:] + 1 + torch.arange(width - 1, device=device),
                cache=cache,
                use_cache=True,
            ).logits  # position j predicts option token j+1
        rest = torch.log_softmax(logits.float(), -1).gather(-1, opt_ids[:, 1:, None])[..., 0] * opt_mask[:, 1:]
        scores = first + rest.sum(-1)
    scores = scores.tolist()
    out, k = [], 0
    for cs in conts:
        out.append(scores[k : k + len(cs)])
        k += len(cs)
    return out


def per_byte(logprobs: Sequence[float], options: Sequence[str]) -> list[float]:
    """Each option's log-likelihood per UTF-8 byte of its text (lm-evaluation-harness's `acc_norm`)."""
    return [lp / max(len(o.encode("utf-8")), 1) for lp, o in zip(logprobs, options)]


def option_choice(logprobs: Sequence[float], options: Sequence[str], normalize: bool) -> int:
    """Index of the best option: highest summed log-likelihood (`acc`), or per UTF-8 byte of the option
    text (`acc_norm`, lm-evaluation-harness's length normalisation). The first wins ties."""
    scores = per_byte(logprobs, options) if normalize else list(logprobs)
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
