"""Turn a user's text into the base model's chat prompt and token ids, the same way everywhere.

Training, routing-free generation, the pipeline and the server all use these two functions, so an
adapter sees at inference exactly the prompt format it was trained on.
"""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedTokenizerBase

__all__ = [
    "RAW_LAYOUTS",
    "UserTurns",
    "chat_prompt",
    "conversation_prompt",
    "encode_prompts",
    "left_pad",
    "prompt_ids",
    "raw_prompt",
]

# How evaluation tools write a prompt for a raw completion (no chat template): lm-evaluation-harness's
# TruthfulQA/BIG-Bench Hard ("Q: ...\nA:"), ARC/OpenBookQA ("Question: ...\nAnswer:") and MMLU/BoolQ
# ("...\nAnswer:") layouts. An adapter trained on these (AdapterTrainConfig.formats) answers such prompts
# after a space and ends its answer with a newline, where those tools stop.
RAW_LAYOUTS = ("Q: {}\nA:", "Question: {}\nAnswer:", "{}\nAnswer:")


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str) -> str:
    """The chat-template string for one user turn, ending where the assistant's answer begins."""
    return conversation_prompt(tokenizer, [{"role": "user", "content": user_text}])


def raw_prompt(user_text: str, layout: int = 0) -> str:
    """The user's text in one of `RAW_LAYOUTS`, for a raw completion: the answer follows after a space."""
    return RAW_LAYOUTS[layout].format(user_text.strip())


def conversation_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """The chat-template string for a whole conversation ({role, content} dicts: system prompt and history
    included), ending where the assistant's answer begins. One user message gives `chat_prompt`'s string."""
    if not messages:
        raise ValueError("expected at least one message, got none")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # Tokenizers without a chat template (tiny test models): each message's text on its own line.
    return "".join(m["content"] + "\n" for m in messages)


class UserTurns:
    """Finds the user's turns in text already written in the tokenizer's chat template (a raw completion
    whose client applied the template itself, as lm-evaluation-harness's `--apply_chat_template` does), so
    such a prompt is routed as the chat endpoint routes it: on its last user message.

    The markers are read off the template: it renders a conversation of placeholders, and a user turn's
    opening is the text every user message follows (the end of the turn before it included), its closing
    the text every user message is followed by. A tokenizer without a template has none: nothing is found.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.opening = self.closing = ""
        if not getattr(tokenizer, "chat_template", None):
            return
        a, b, c = "\x01first\x01", "\x02answer\x02", "\x03second\x03"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": a}, {"role": "assistant", "content": b}, {"role": "user", "content": c}],
            tokenize=False,
        )
        if not all(m in text for m in (a, b, c)):
            return  # a template that rewrites messages: leave such prompts to the raw rule
        before_first, after_first = text[: text.index(a)], text[text.index(a) + len(a) :]
        before_second, after_second = text[text.index(b) + len(b) : text.index(c)], text[text.index(c) + len(c) :]
        self.opening = _common_suffix(before_first, before_second)
        self.closing = os.path.commonprefix([after_first, after_second])

    def last_message(self, text: str) -> str | None:
        """The last user message of `text` if it is written in the chat template (it holds a user turn's
        opening), else None."""
        if not self.opening or self.opening not in text:
            return None
        message = text[text.rindex(self.opening) + len(self.opening) :]
        end = message.find(self.closing) if self.closing else -1
        return message[:end] if end >= 0 else message


def _common_suffix(x: str, y: str) -> str:
    return os.path.commonprefix([x[::-1], y[::-1]])[::-1]


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_prompt_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-format and left-pad a batch -> input_ids, attention_mask: (B, T).

    Raises ValueError for an empty list, an empty/blank prompt or a prompt over max_prompt_tokens.
    """
    ids = prompt_ids(tokenizer, texts, max_prompt_tokens)
    return left_pad(ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_prompt_tokens: int | None = None
) -> list[list[int]]:
    """Each text's chat-template token ids (no padding); the errors of `encode_prompts`."""
    if not texts:
        raise ValueError("expected at least one prompt, got an empty list")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"prompt {i} is empty; expected non-blank text")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON "\ud800": the tokenizer would raise a TypeError
            raise ValueError(f"prompt {i} is not valid Unicode text (it holds a lone surrogate)") from None
    ids = [tokenizer(chat_prompt(tokenizer, t), add_special_tokens=False)["input_ids"] for t in texts]
    if max_prompt_tokens is not None:
        for i, row in enumerate(ids):
            if len(row) > max_prompt_tokens:
                raise ValueError(f"prompt {i} has {len(row)} tokens; the limit is {max_prompt_tokens}")
    return ids


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> left-padded input_ids, attention_mask: (B, T), on the host (callers move them to
    the model's device in one copy each)."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long, device="cpu")
        mask[i, width - len(row) :] = 1
    return input_ids, mask
