"""The OpenAI wire format, responses side: bodies, stream chunks and log-probabilities.

Every response and stream chunk carries, beyond OpenAI's fields, a top-level `routing` object: the
adapters that answered, heaviest first, with their weights: {"adapters": ["maths"], "weights": [1.0]}
(for several choices: the first choice's; each choice also carries its own `routing`). Under
`routing_granularity="sentence"` it also lists `switches`, the mid-answer mixture changes as
`DLPLoRA.generate` reports them (`Result.switches`): [{"token": 7, "adapters": [...], "weights": [...]}],
answer tokens 7, 8, ... were sampled under that mixture; `adapters`/`weights` are the first one. A stream
chunk's `routing` lists the switches made up to it (the closing chunk: all of them).
Log-probabilities are laid out as OpenAI (and vLLM) lay them out: for completions
`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` (with `echo`, the prompt's tokens first,
the very first with a null log-probability); for chat `{"content": [{"token", "logprob", "bytes",
"top_logprobs"}]}`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel

from dlp_lora.engine import Result, TokenLogprob

__all__ = [
    "ERROR_RESPONSES",
    "ErrorResponse",
    "Kind",
    "ModelCard",
    "ModelList",
    "RoutingInfo",
    "SwitchInfo",
    "Usage",
    "chat_choice",
    "chunk_for",
    "completion_choice",
    "response_for",
    "routing_of",
    "usage_chunk_for",
    "usage_of",
]

Kind = Literal["completion", "chat"]
TokenText = Callable[[int], str]
"""A token id's text (one token decoded on its own)."""


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every refusal and failure: OpenAI's error shape."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict] = {
    400: {
        "model": ErrorResponse,
        "description": "Invalid request: `error.param` names the field, "
        "`error.message` what was expected and what was found.",
    },
    404: {"model": ErrorResponse, "description": "`model` names no served model."},
    429: {
        "model": ErrorResponse,
        "description": "The queue is full (`max_queue` requests waiting); retry after the `Retry-After` seconds.",
    },
    503: {"model": ErrorResponse, "description": "The batching worker is not running (starting or shutting down)."},
}
"""The error answers of the generation endpoints, for the OpenAPI document."""


class SwitchInfo(BaseModel):
    """A mid-answer mixture change: answer tokens from index `token` on were sampled under it."""

    token: int
    adapters: list[str]
    weights: list[float]


class RoutingInfo(BaseModel):
    adapters: list[str]
    weights: list[float]
    switches: list[SwitchInfo] | None = None
    """`sentence` routing only (absent otherwise)."""

    def wire(self) -> dict:
        """The JSON object sent: `switches` only where the row was sentence-routed."""
        return self.model_dump(exclude_none=True)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dlp-lora"
    root: str | None = None
    parent: str | None = None
    """For adapters and the router: the base model they run on."""
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def routing_of(c: Result) -> dict:
    """A completion's `routing` object."""
    return RoutingInfo(adapters=c.adapters, weights=c.weights, switches=c.switches if c.sentence else None).wire()


def usage_of(prompt_tokens: Sequence[int], choices: Sequence[Result]) -> Usage:
    """Usage of one request: every distinct prompt counted once, every choice's tokens."""
    p, c = sum(prompt_tokens), sum(x.completion_tokens for x in choices)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _completion_logprobs(c: Result, echo: bool, offset: int, text: TokenText) -> dict:
    """OpenAI's legacy completions layout; `offset`: characters before the first listed token."""
    entries: list[tuple[int, TokenLogprob | None]] = []
    if echo:
        entries += list(zip(c.prompt_ids, c.prompt_logprobs or [None] * len(c.prompt_ids)))
    entries += [(t.token, t) for t in c.token_logprobs or []]
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token, lp in entries:
        s = text(token)
        tokens.append(s)
        text_offset.append(offset)
        offset += len(s)
        token_logprobs.append(None if lp is None else lp.logprob)
        if lp is None:
            top_logprobs.append(None)
            continue
        top: dict[str, float] = {}
        for alt, value in lp.top:  # most likely first: a text shared by two tokens keeps the likelier
            top.setdefault(text(alt), value)
        top.setdefault(s, lp.logprob)  # the chosen token is always listed, as vLLM does
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def completion_choice(index: int, c: Result, prompt_text: str | None, text: TokenText) -> dict:
    """One `choices` entry of /v1/completions; `prompt_text` is given when the request asked for echo."""
    echo = prompt_text is not None
    logprobs = None
    if c.token_logprobs is not None:
        logprobs = _completion_logprobs(c, echo, 0 if echo else len(prompt_text or ""), text)
    return {
        "index": index,
        "text": (prompt_text or "") + c.text,
        "logprobs": logprobs,
        "finish_reason": c.finish_reason,
        "routing": routing_of(c),
    }


def _chat_logprobs(c: Result, text: TokenText) -> dict | None:
    if c.token_logprobs is None:
        return None

    def entry(token: int, logprob: float) -> dict:
        s = text(token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(a, v) for a, v in t.top]} for t in c.token_logprobs
        ]
    }


def chat_choice(index: int, c: Result, text: TokenText) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": c.text},
        "logprobs": _chat_logprobs(c, text),
        "finish_reason": c.finish_reason,
        "routing": routing_of(c),
    }


def _envelope(kind: Kind, rid: str, created: int, model: str, stream: bool) -> dict:
    obj = "text_completion" if kind == "completion" else ("chat.completion.chunk" if stream else "chat.completion")
    return {"id": rid, "object": obj, "created": created, "model": model}


def response_for(
    kind: Kind, rid: str, created: int, model: str, choices: list[dict], usage: Usage, routing: dict
) -> dict:
    """The non-streaming response body."""
    return {
        **_envelope(kind, rid, created, model, False),
        "choices": choices,
        "usage": usage.model_dump(),
        "routing": routing,
    }


def _stream_choice(kind: Kind, text: str | None, finish_reason: str | None, first: bool) -> dict:
    if kind == "completion":
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    delta = {"role": "assistant", "content": text or ""} if first else ({} if text is None else {"content": text})
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def chunk_for(
    kind: Kind,
    rid: str,
    created: int,
    model: str,
    routing: RoutingInfo,
    text: str | None = None,
    first: bool = False,
    finish_reason: str | None = None,
) -> dict:
    """One stream chunk: the opening one (`first`), a text delta, or the closing one (`finish_reason`)."""
    return {
        **_envelope(kind, rid, created, model, True),
        "choices": [_stream_choice(kind, text, finish_reason, first)],
        "routing": routing.wire(),
    }


def usage_chunk_for(kind: Kind, rid: str, created: int, model: str, c: Result) -> dict:
    """The extra chunk sent when `stream_options.include_usage` is set: no choices, only usage."""
    return {
        **_envelope(kind, rid, created, model, True),
        "choices": [],
        "usage": usage_of([c.prompt_tokens], [c]).model_dump(),
        "routing": routing_of(c),
    }
