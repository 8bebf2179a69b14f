"""The OpenAI wire format: request models (validated by pydantic) and the responses and stream chunks.

Beyond OpenAI's fields, requests may carry `adapters` (names) and `weights` to override the router,
or `routing_granularity` ("prompt", "segment" or "sentence", see `dlp_lora.routing`) and
`segment_marker` to choose how the router routes; every response and stream chunk carries a top-level
`routing` object: the adapters that answered the request, heaviest first, with their weights:
{"adapters": ["maths", "science"], "weights": [0.7, 0.3]}. Under `sentence` routing the final response
adds `switches`: [{"token": i, "adapters": [...], "weights": [...]}], the mixture from answer token i on.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dlp_lora.config import Granularity
from dlp_lora.server.errors import InvalidRequest
from dlp_lora.server.scheduler import Completion

__all__ = [
    "ChatCompletionRequest", "CompletionRequest", "GenerationParams", "ModelCard", "ModelList", "RoutingInfo",
    "Usage", "response_for", "chunk_for", "usage_chunk_for",
]

Kind = Literal["completion", "chat"]
Weight = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
"""Bounded so that a fused delta cannot overflow float32 (a weight of 100 is already far outside any useful mix)."""
MAX_STOP = 16


class StreamOptions(BaseModel):
    include_usage: bool = False
    """Send one more chunk, with empty `choices` and the `usage`, before `[DONE]` (as OpenAI does)."""


class GenerationParams(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored: OpenAI clients send some we do not use."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    """An adapter's name serves that adapter alone; any other name lets the router choose."""
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    """0 or absent: greedy decoding."""
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    """Any value torch.Generator.manual_seed accepts."""
    n: int = 1
    logprobs: int | bool | None = None
    adapters: list[str] | None = None
    """Explicit routing: adapter names, overriding the router and `model`."""
    weights: list[Weight] | None = None
    """One weight >= 0 per adapter, used as given (default: equal weights summing to 1)."""
    routing_granularity: Granularity | None = None
    """How the router routes this request (default: the server's, `prompt`): once on the whole prompt,
    on its last segment, or re-routing after each generated sentence. Not with `adapters`."""
    segment_marker: str | None = Field(default=None, min_length=1, max_length=64)
    """Separator of the prompt's segments for `segment` / `sentence` (default: a blank line)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: object) -> object:
        """Refuse lone UTF-16 surrogates anywhere (JSON allows "\\ud800"): they cannot be tokenized or echoed."""
        def walk(x: object, where: str) -> None:
            if isinstance(x, str):
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"{where or 'a string'} is not valid Unicode text (it holds a lone surrogate)"
                                     ) from None
            elif isinstance(x, dict):
                for k, v in x.items():
                    walk(k, where)
                    walk(v, f"{where}.{k}" if where else str(k))
            elif isinstance(x, list):
                for i, v in enumerate(x):
                    walk(v, f"{where}.{i}")
        walk(data, "")
        return data

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n={n} is not supported; this server returns exactly one choice (n=1)")
        return n

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | bool | None) -> None:
        if value not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        return None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop is not None and not all(stop if isinstance(stop, list) else [stop]):
            raise ValueError("stop strings must be non-empty")
        if isinstance(stop, list) and len(stop) > MAX_STOP:
            raise ValueError(f"stop holds {len(stop)} strings; the limit is {MAX_STOP}")
        return stop

    @model_validator(mode="after")
    def _routing_override(self) -> "GenerationParams":
        if self.adapters is not None:
            if not self.adapters:
                raise ValueError("adapters must name at least one adapter (omit it to let the router choose)")
            if len(set(self.adapters)) != len(self.adapters):
                raise ValueError(f"adapters has duplicate names: {self.adapters}")
        if self.weights is not None:
            if self.adapters is None:
                raise ValueError("weights needs adapters: one weight per adapter name")
            if len(self.weights) != len(self.adapters):
                raise ValueError(f"weights has {len(self.weights)} values for {len(self.adapters)} adapters; "
                                 "expected one weight per adapter")
        if self.adapters is not None and self.routing_granularity not in (None, "prompt"):
            raise ValueError(f"routing_granularity={self.routing_granularity!r} needs the router; it cannot be "
                             "combined with explicit adapters")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def mixture(self) -> dict[str, float] | None:
        """{adapter: weight} of the explicit override, or None."""
        if self.adapters is None:
            return None
        weights = self.weights if self.weights is not None else [1.0 / len(self.adapters)] * len(self.adapters)
        return dict(zip(self.adapters, weights))

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationParams):
    """POST /v1/completions."""

    prompt: str | list[str]
    """One prompt: a string or a list holding one string."""
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError(f"prompt must be one string (or a list of one string), got a list of {len(prompt)}; "
                                 "send several requests concurrently instead, they are batched together")
            prompt = prompt[0]
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported by this server")
        return echo

    def user_text(self) -> str:
        return str(self.prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if not isinstance(self.content, list):
            return self.content or ""
        if any(p.type != "text" for p in self.content):
            raise InvalidRequest("only text content parts are supported", param="messages")
        return "".join(p.text or "" for p in self.content)


class ChatCompletionRequest(GenerationParams):
    """POST /v1/chat/completions. The last user message is the prompt (the chat template is applied by the
    pipeline, the way the adapters were trained); system and earlier turns are not used."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    """Newer OpenAI name for max_tokens; wins when both are given."""

    @model_validator(mode="after")
    def _max_tokens_alias(self) -> "ChatCompletionRequest":
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def user_text(self) -> str:
        users = [m for m in self.messages if m.role == "user"]
        if not users:
            raise InvalidRequest("messages holds no user message; expected at least one with role 'user'",
                                 param="messages")
        return users[-1].text()


# ---- responses ------------------------------------------------------------------------------------

class RoutingInfo(BaseModel):
    adapters: list[str]
    weights: list[float]
    switches: list[dict] | None = None
    """`sentence` routing: the mixture changes along the answer (final responses only)."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dlp-lora"
    parent: str | None = None
    """For adapters: the base model they run on."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _usage(c: Completion) -> Usage:
    return Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                 total_tokens=c.prompt_tokens + c.completion_tokens)


def _choice(kind: Kind, text: str | None, finish_reason: str | None, first: bool = False, final: bool = False) -> dict:
    if kind == "completion":
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if final:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    delta = {"role": "assistant", "content": text or ""} if first else ({} if text is None else {"content": text})
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def _envelope(kind: Kind, rid: str, created: int, model: str, stream: bool) -> dict:
    obj = "text_completion" if kind == "completion" else ("chat.completion.chunk" if stream else "chat.completion")
    return {"id": rid, "object": obj, "created": created, "model": model}


def response_for(kind: Kind, rid: str, created: int, model: str, c: Completion) -> dict:
    """The non-streaming response body."""
    return {**_envelope(kind, rid, created, model, False),
            "choices": [_choice(kind, c.text, c.finish_reason, final=True)],
            "usage": _usage(c).model_dump(),
            "routing": _routing(c)}


def _routing(c: Completion) -> dict:
    return RoutingInfo(adapters=c.adapters, weights=c.weights,
                       switches=c.switches or None).model_dump(exclude_none=True)


def chunk_for(kind: Kind, rid: str, created: int, model: str, routing: RoutingInfo, text: str | None = None,
              first: bool = False, finish_reason: str | None = None) -> dict:
    """One stream chunk: the opening one (`first`), a text delta, or the closing one (`finish_reason`)."""
    return {**_envelope(kind, rid, created, model, True),
            "choices": [_choice(kind, text, finish_reason, first=first)], "routing": routing.model_dump(exclude_none=True)}


def usage_chunk_for(kind: Kind, rid: str, created: int, model: str, c: Completion) -> dict:
    """The extra chunk sent when `stream_options.include_usage` is set: no choices, only usage."""
    return {**_envelope(kind, rid, created, model, True), "choices": [], "usage": _usage(c).model_dump(),
            "routing": _routing(c)}
