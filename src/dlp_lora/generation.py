"""Batched decoding with a KV cache for a model whose routing is already set.

Rows are left padded; each keeps whatever adapter mixture the caller set for the whole call (sentence
level routing), because the routing lives in the fused layers, not in this loop. A row ends at EOS, at
a stop string, or after `max_new_tokens`; finished rows stop contributing text while the rest go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlp_lora.config import GenerationConfig

__all__ = ["GenerationOutput", "Decoder", "EagerDecoder", "generate_ids", "eos_ids", "sample_next", "cut_at_stop"]

StepCallback = Callable[[torch.Tensor, torch.Tensor], None]


class Decoder(Protocol):
    """Runs the model for `generate_ids`: one prefill, then one step per sampled token (KV cache inside)."""

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                max_new_tokens: int) -> torch.Tensor:
        """input_ids, mask, positions: (B, T) -> next-token logits (B, V); room for max_new_tokens steps."""
        ...

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions: (B,) -> next-token logits (B, V)."""
        ...


class EagerDecoder:
    """transformers' dynamic KV cache, the model run eagerly: the mask grows by one column per step.
    One per `generate_ids` call (it holds that call's cache)."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self._mask: torch.Tensor | None = None
        self._cache = None

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                max_new_tokens: int) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        self._mask, self._cache = mask, out.cache
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._mask = torch.cat([self._mask, self._mask.new_ones(self._mask.shape[0], 1)], dim=1)
        out = self.model(input_ids=tokens[:, None], attention_mask=self._mask, position_ids=positions[:, None],
                         cache=self._cache, use_cache=True)
        self._cache = out.cache
        return out.logits[:, -1]


@dataclass(frozen=True)
class GenerationOutput:
    """One row's result: decoded text (stop string cut), new token ids, why it ended, token counts."""

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int


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


@torch.no_grad()
def generate_ids(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cfg: GenerationConfig,
    on_step: StepCallback | None = None,
    decoder: Decoder | None = None,
) -> list[GenerationOutput]:
    """Decode every row of a left-padded batch. input_ids, attention_mask: (B, T), on the model's device.

    decoder: how the model is run (default: an :class:`EagerDecoder`; `dlp_lora.compiled.CompiledDecoder`
    runs the steps compiled over a static cache).

    Every tensor made here (positions, masks, the finished flags, the sampling generator) is made on the
    inputs' device. The sampled tokens come to the host once per step, to test stop strings and EOS.

    on_step(tokens (B,), finished (B,)) is called after each step (for streaming), with host tensors;
    finished rows repeat the pad id in `tokens`.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids and attention_mask must both be (B, T); got {tuple(input_ids.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    if bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("prompts must be left padded (attention_mask[:, -1] must be 1 for every row)")
    stops = set() if cfg.ignore_eos else eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(stops), 0)
    device = input_ids.device
    if attention_mask.device != device:
        raise ValueError(f"input_ids are on {device} but attention_mask is on {attention_mask.device}")
    # A seeded generator on the device that samples: torch.multinomial refuses one on another device.
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    b = input_ids.shape[0]
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    decoder = decoder if decoder is not None else EagerDecoder(model)
    logits = decoder.prefill(input_ids, mask, positions, cfg.max_new_tokens)
    positions = positions[:, -1]
    new: list[list[int]] = [[] for _ in range(b)]
    finished = torch.zeros(b, dtype=torch.bool, device=device)  # rows that ended before this step
    stopped = [False] * b  # the same on the host, updated during the step
    for _ in range(cfg.max_new_tokens):
        token = sample_next(logits, cfg, generator).masked_fill(finished, pad)
        host = token.tolist()  # the one device-to-host transfer of a step
        for row in range(b):
            if stopped[row]:
                continue
            t = host[row]
            if t in stops:
                stopped[row] = True
            else:
                new[row].append(t)
                if cfg.stop:
                    stopped[row] = cut_at_stop(tokenizer.decode(new[row], skip_special_tokens=True), cfg.stop)[1]
        if on_step is not None:
            on_step(torch.tensor(host, device="cpu"), torch.tensor(stopped, device="cpu"))
        if all(stopped):
            break
        finished = torch.tensor(stopped, device=device)
        positions = positions + 1
        logits = decoder.step(token, positions)
    prompt_lens = attention_mask.sum(-1).tolist()
    results = []
    for row in range(b):
        text, _ = cut_at_stop(tokenizer.decode(new[row], skip_special_tokens=True), cfg.stop)
        results.append(GenerationOutput(text=text, token_ids=new[row], prompt_tokens=int(prompt_lens[row]),
                                        finish_reason="stop" if stopped[row] else "length"))
    return results
