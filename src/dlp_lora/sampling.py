"""How a row's next token is chosen and when its answer ends: sampling, EOS and stop strings.

The engine (`engine.py`) calls these for every row at every step; nothing else samples a token.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlp_lora.config import GenerationConfig

__all__ = ["eos_ids", "sample_next", "cut_at_stop", "stop_reached", "STOP_WINDOW_SLACK"]

STOP_WINDOW_SLACK = 8
"""Tokens decoded beyond 4 per stop-string character when looking for it at the end of an answer (a
character is at most 4 UTF-8 bytes and a byte-level token at least one byte): room for special tokens,
which decode to nothing."""


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token id that ends a row: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else ({gen_eos} if gen_eos is not None else set())
    return ids


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits: (B, V) -> (B,) next token ids, greedy or temperature + nucleus sampling."""
    if not cfg.do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # Drop a token when the mass before it already reaches top_p; the top token always survives.
        drop = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p
        drop[..., 0] = False  # also when top_p rounds to 0 in the logits' dtype (a denormal top_p)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(text up to the first stop string, whether one was found)."""
    cuts = [text.find(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def stop_reached(tokenizer: PreTrainedTokenizerBase, tokens: list[int], stop: tuple[str, ...]) -> bool:
    """Whether the answer `tokens` now holds a stop string, given that it held none one token ago.

    Only the tail that the newest token can have completed a stop string in is decoded (4 tokens per
    character of the longest stop string, plus `STOP_WINDOW_SLACK`), so the check costs the same at the 1st and the 1,000th token;
    the answer's text is decoded whole once, when the row ends (`cut_at_stop`).
    """
    if not stop:
        return False
    window = 4 * max(len(s) for s in stop) + STOP_WINDOW_SLACK
    tail = tokenizer.decode(tokens[-window:], skip_special_tokens=True)
    return any(s in tail for s in stop)
