"""Training examples as token ids, explicitly truncated, in length-bucketed batches (little padding).

An example is the chat prompt followed by the answer and EOS; the loss reads the answer tokens only. Written
as a raw completion instead, it is the prompt in one of `chat.RAW_LAYOUTS` followed by " answer\n" and EOS.
Over-long examples keep the whole answer (up to half the budget) and lose the head of the prompt: the
question and the answer instruction sit at its end, the head is context (a SQuAD passage, a story).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from dlp_lora.chat import RAW_LAYOUTS, chat_prompt, raw_prompt
from dlp_lora.tasks import Example

__all__ = ["Encoded", "encode_examples", "bucketed_batches", "collate"]


@dataclass(frozen=True)
class Encoded:
    """One training row: ids = prompt ids + answer ids; the first `n_prompt` are not scored."""

    ids: tuple[int, ...]
    n_prompt: int
    truncated: bool


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int,
    formats: Sequence[str] = ("chat",),
    seed: int = 0,
) -> list[Encoded]:
    """Token ids of each example once per format, at most max_length tokens each: "chat" is the chat prompt +
    answer + EOS; "raw" is the prompt in a raw layout (drawn per example with `seed`) + " answer\n" + EOS.
    Rows come format by format, each in the order of `examples`."""
    out = []
    eos = tokenizer.eos_token or ""
    rng = random.Random(seed)
    for fmt in formats:
        for ex in examples:
            if fmt == "chat":
                prompt_text, answer_text = chat_prompt(tokenizer, ex.prompt), ex.answer + eos
            elif fmt == "raw":
                prompt_text = raw_prompt(ex.prompt, rng.randrange(len(RAW_LAYOUTS)))
                answer_text = " " + ex.answer.strip() + "\n" + eos
            else:
                raise ValueError(f"unknown training format {fmt!r}; expected 'chat' or 'raw'")
            prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            answer = tokenizer(answer_text, add_special_tokens=False)["input_ids"][: max_length // 2]
            keep = max_length - len(answer)
            out.append(Encoded(tuple(prompt[-keep:] + answer), min(len(prompt), keep), len(prompt) > keep))
    return out


def bucketed_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epochs: int, bucket_batches: int = 16
) -> list[list[int]]:
    """Row indices per optimiser step, `epochs` passes over the data.

    Each pass shuffles the rows, sorts each window of `bucket_batches * batch_size` rows by length and cuts
    it into batches (so a batch holds rows of similar length), then shuffles the batch order: the
    randomness of plain shuffling, most of the padding gone.
    """
    if batch_size < 1 or epochs < 1:
        raise ValueError(f"batch_size and epochs must be >= 1, got {batch_size} and {epochs}")
    rng = random.Random(seed)
    batches: list[list[int]] = []
    window = batch_size * bucket_batches
    for _ in range(epochs):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        epoch: list[list[int]] = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: lengths[i])
            epoch += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        rng.shuffle(epoch)
        batches += epoch
    return batches


def collate(rows: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask, labels: (B, T); labels are -100 except on answer tokens."""
    width = max(len(r.ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, r in enumerate(rows):
        ids = torch.tensor(r.ids, dtype=torch.long)
        input_ids[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
        labels[i, r.n_prompt : len(ids)] = ids[r.n_prompt :]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
