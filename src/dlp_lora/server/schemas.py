"""The OpenAI wire format, requests side: pydantic models validated at the boundary (limits stated in the
schema, so the OpenAPI document and a generated client know them).

Beyond OpenAI's fields, generation requests may carry `adapters` (names) and `weights` to override the
router, or `routing_granularity` ("prompt", "segment" or "sentence", see `dlp_lora.granularity`) and
`segment_marker` to choose which text the router reads and whether the answer is re-routed after each
generated sentence; responses carry a top-level `routing` object (`responses.py`), with the mid-answer
`switches` under "sentence".
vLLM's extra endpoints are here too: /tokenize, /detokenize and the runtime adapter calls.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dlp_lora.config import Granularity
from dlp_lora.engine import MAX_TOP_LOGPROBS
from dlp_lora.server.errors import InvalidRequest

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DetokenizeRequest",
    "GenerationParams",
    "LoadLoraRequest",
    "RouteRequest",
    "TokenizeRequest",
    "UnloadLoraRequest",
    "MAX_N",
    "MAX_PROMPTS",
]

Weight = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
"""Bounded so that a fused delta cannot overflow float32 (a weight of 100 is already far outside any useful mix)."""
MAX_STOP = 16
MAX_N = 16
"""Most choices per prompt."""
MAX_PROMPTS = 64
"""Most prompts in one completion request (each is its own batch row)."""
MAX_TEXT = 100_000
"""Longest string field, in characters (the token limit, checked after tokenizing, is lower in practice)."""
MAX_NAME = 256

Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_TEXT)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Prompt = (
    Text
    | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False
    """Send one more chunk, with empty `choices` and the `usage`, before `[DONE]` (as OpenAI does)."""


def _no_lone_surrogates(data: object) -> object:
    """Refuse lone UTF-16 surrogates anywhere (JSON allows "\\ud800"): they cannot be tokenized or echoed."""

    def walk(x: object, where: str) -> None:
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"{where or 'a string'} is not valid Unicode text (it holds a lone surrogate)"
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


class _Request(BaseModel):
    """Unknown fields are ignored: OpenAI clients send some we do not use."""

    # Strict: JSON types as the schema states them (no "5" for 5, no false for 0), so a value the
    # schema refuses is refused here too.
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: object) -> object:
        return _no_lone_surrogates(data)


class GenerationParams(_Request):
    """Fields shared by both generation endpoints."""

    model: Name | None = None
    """`dlp-lora` (or absent): the router chooses the mixture; the base model's id: the base model alone;
    an adapter's name: that adapter alone (see GET /v1/models)."""
    max_tokens: int | None = Field(default=None, ge=0)
    """New tokens at most (0 with `echo` scores the prompt only); the server's limit is in the
    `x-max-tokens-limit` of this field in /openapi.json. Default: the server's `default_max_tokens`."""
    temperature: float | None = Field(default=None, ge=0, le=2, allow_inf_nan=False)
    """OpenAI's default 1.0 when absent; 0 is greedy decoding."""
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    """Any 64-bit value, signed or not; each choice samples from its own generator (choice i of a request
    uses seed + i), so a seeded answer does not depend on the requests batched beside it."""
    ignore_eos: bool = False
    """vLLM's extra: keep decoding past the end-of-sequence token up to `max_tokens` (load tests)."""
    n: int = Field(default=1, ge=1, le=MAX_N)
    """Choices per prompt."""
    adapters: Annotated[list[Name], Field(min_length=1, max_length=64)] | None = None
    """Explicit routing: adapter names, overriding the router and `model`."""
    weights: Annotated[list[Weight], Field(min_length=1, max_length=64)] | None = None
    """One weight >= 0 per adapter, used as given (default: equal weights summing to 1)."""
    routing_granularity: Granularity | None = None
    """Which text the router reads (default: the server's, `prompt`): the whole prompt, or its last
    segment; `sentence` starts as `segment` and re-routes the answer after each generated sentence (the
    response's `routing.switches` lists the changes). Not with `adapters`."""
    segment_marker: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    """Separator of the prompt's segments for `segment` (default: a blank line)."""

    @model_validator(mode="after")
    def _routing_override(self) -> GenerationParams:
        if self.adapters is not None and len(set(self.adapters)) != len(self.adapters):
            raise ValueError(f"adapters has duplicate names: {self.adapters}")
        if self.weights is not None:
            if self.adapters is None:
                raise ValueError("weights needs adapters: one weight per adapter name")
            if len(self.weights) != len(self.adapters):
                raise ValueError(
                    f"weights has {len(self.weights)} values for {len(self.adapters)} adapters; "
                    "expected one weight per adapter"
                )
        if self.adapters is not None and self.routing_granularity not in (None, "prompt"):
            raise ValueError(
                f"routing_granularity={self.routing_granularity!r} needs the router; it cannot be "
                "combined with explicit adapters"
            )
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
    """POST /v1/completions. The prompt is used as given (no chat template), as vLLM and OpenAI do: a
    string, a list of strings, a list of token ids, or a list of token-id lists (one choice each)."""

    prompt: Prompt
    echo: bool = False
    """Return the prompt before the completion (with `logprobs`: the prompt tokens' log-probabilities,
    the first one null)."""
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """Log-probability of each token and of the `logprobs` most likely alternatives at its position."""
    route_on: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)] | None = None
    """The text the router reads for every prompt of the request, instead of the prompt. By default a
    scoring request (`echo` with `max_tokens` 0 or 1, as lm-evaluation-harness scores each option) is
    routed on its question (`dlp_lora.granularity.scoring_text`), any other on its prompt."""

    @model_validator(mode="after")
    def _streams_one_choice(self) -> CompletionRequest:
        if self.stream and (self.n > 1 or len(self.prompts) > 1):
            raise InvalidRequest(
                "stream=true serves one choice; send n=1 and one prompt (or do not stream)",
                param="n" if self.n > 1 else "prompt",
            )
        if self.stream and (self.echo or self.logprobs is not None):
            raise InvalidRequest(
                "stream=true does not return echo or logprobs; send them without stream",
                param="echo" if self.echo else "logprobs",
            )
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        return list(p) if isinstance(p[0], (str, list)) else [list(p)]  # type: ignore[arg-type]

    @property
    def wanted_logprobs(self) -> int | None:
        """None, or how many alternatives to report per token."""
        return self.logprobs


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Annotated[str, Field(max_length=64)]
    text: Annotated[str, Field(max_length=MAX_TEXT)] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Annotated[str, Field(max_length=MAX_TEXT)] | Annotated[list[ContentPart], Field(max_length=64)] | None = (
        None
    )

    def text(self) -> str:
        if not isinstance(self.content, list):
            return self.content or ""
        if any(p.type != "text" for p in self.content):
            raise InvalidRequest("only text content parts are supported", param="messages")
        return "".join(p.text or "" for p in self.content)

    def as_template_message(self) -> dict[str, str]:
        """{role, content} for the tokenizer's chat template (`developer` is OpenAI's newer `system`)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatCompletionRequest(GenerationParams):
    """POST /v1/chat/completions. The whole message list (system prompt and history) goes through the
    tokenizer's chat template; the router reads the last user message (what it was trained on)."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    max_completion_tokens: int | None = Field(default=None, ge=0)
    """Newer OpenAI name for max_tokens; wins when both are given."""
    logprobs: bool = False
    """Return each generated token's log-probability."""
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """With `logprobs`: also the most likely alternatives at each position."""

    @model_validator(mode="after")
    def _checks(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.stream and self.n > 1:
            raise InvalidRequest("stream=true serves one choice; send n=1 (or do not stream)", param="n")
        if self.stream and self.logprobs:
            raise InvalidRequest("stream=true does not return logprobs; send them without stream", param="logprobs")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs=true", param="top_logprobs")
        return self

    @property
    def wanted_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def route_text(self) -> str:
        """The last user message (the last message of any role when there is none)."""
        users = [m for m in self.messages if m.role == "user"] or self.messages
        return users[-1].text()


class TokenizeRequest(_Request):
    """POST /tokenize (vLLM's shape): a `prompt`, or chat `messages` put through the chat template."""

    model: Name | None = None
    prompt: Annotated[str, Field(max_length=MAX_TEXT)] | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class RouteRequest(_Request):
    """POST /v1/route: what the router makes of a prompt (the playground's bar chart), read at the answer's
    start under a routing granularity (`segment` and `sentence` read the prompt's last segment)."""

    prompt: Text
    routing_granularity: Granularity | None = None
    segment_marker: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class DetokenizeRequest(_Request):
    """POST /detokenize (vLLM's shape)."""

    model: Name | None = None
    tokens: Annotated[list[TokenId], Field(max_length=MAX_TEXT)]


class LoadLoraRequest(_Request):
    """POST /v1/load_lora_adapter (vLLM's shape): a PEFT LoRA directory (safetensors) served as `lora_name`."""

    lora_name: Annotated[str, Field(min_length=1, max_length=MAX_NAME, pattern=r"^[A-Za-z0-9_.:\-/]+$")]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]


class UnloadLoraRequest(_Request):
    """POST /v1/unload_lora_adapter (vLLM's shape)."""

    lora_name: Name
    lora_int_id: int | None = None
    """Accepted for vLLM compatibility and ignored."""
