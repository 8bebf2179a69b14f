"""vLLM's extra endpoints and the playground page, registered on the app by `add_extra_routes`.

POST /tokenize and /detokenize (vLLM's shapes), POST /v1/route (what the router makes of a prompt: the
playground's bars), GET / (the playground: plain HTML + JS from `static/`, no build step), and with
`ServerConfig.allow_runtime_adapters` POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's
runtime adapters; the bank changes on the worker thread, between two decode steps). An adapter loaded under
the name of a router class that the base model serves (the dev gate kept none) is routed from then on.
"""

from __future__ import annotations

import asyncio
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from dlp_lora.config import ServerConfig
from dlp_lora.granularity import routing_text
from dlp_lora.server.errors import InvalidRequest
from dlp_lora.server.responses import ERROR_RESPONSES
from dlp_lora.server.schemas import DetokenizeRequest, LoadLoraRequest, RouteRequest, TokenizeRequest, UnloadLoraRequest
from dlp_lora.server.state import ServerState

__all__ = ["add_extra_routes"]


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    """vLLM's /tokenize: {count, max_model_len, tokens}."""
    state = _state(request)
    _check_model(state, body.model)
    if body.messages is not None:
        ids = state.chat_prompt_ids(body.messages, body.add_generation_prompt)
    else:
        ids = state.tokenizer(body.prompt or "", add_special_tokens=body.add_special_tokens)["input_ids"]
    return JSONResponse(
        {
            "count": len(ids),
            "max_model_len": state.max_prompt_tokens + state.cfg.max_tokens_limit,
            "tokens": ids,
            "token_strs": None,
        }
    )


async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    """vLLM's /detokenize: {prompt}."""
    state = _state(request)
    _check_model(state, body.model)
    bad = next((t for t in body.tokens if t >= state.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(
            f"tokens: token id {bad} is out of range; the vocabulary has {state.vocab_size} tokens", param="tokens"
        )
    return JSONResponse({"prompt": state.tokenizer.decode(body.tokens)})


async def route(body: RouteRequest, request: Request) -> JSONResponse:
    """The router's probabilities over its classes for one prompt (its last segment under `segment` or
    `sentence` routing: the text the answer's first mixture is chosen on), the mixture it selects and that
    text. Run on the worker thread, between two decode steps: the router's tokenizer is not shared across
    threads."""
    state = _state(request)
    if state.pipeline.router is None:
        raise InvalidRequest("this server has no router", param="prompt")
    pipeline = state.pipeline
    text = routing_text(body.prompt, state.routing_config(body, None))

    def run() -> dict:
        try:
            probs = pipeline.router.predict_proba([text])[0].tolist()
        except ValueError as exc:
            raise InvalidRequest(f"the router cannot read this prompt: {exc}", param="prompt") from None
        routing = pipeline.route([text])
        pairs = sorted(routing.row(0), key=lambda p: -p[1])
        return {
            "tasks": list(pipeline.router.task_names),
            "probabilities": [round(p, 6) for p in probs],
            "adapters": [pipeline.adapter_names[i] for i, _ in pairs],
            "weights": [round(w, 6) for _, w in pairs],
            "base_served": list(pipeline.base_served),
            "text": text,
        }

    return JSONResponse(await asyncio.wrap_future(state.scheduler.call(run)))


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.model_ids():
        raise state.not_found(model)


async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> PlainTextResponse:
    """vLLM's runtime adapter loading: checked as at load time (400, the bank untouched, on any problem)."""
    state = _state(request)
    if body.lora_name in state.model_ids():
        raise InvalidRequest(
            f"the name {body.lora_name!r} is already served; unload it first or pick another", param="lora_name"
        )

    def load() -> None:
        state.runner.pause()
        try:
            state.pipeline.add_adapter(body.lora_name, body.lora_path)
        except (ValueError, FileNotFoundError, OSError) as exc:
            raise InvalidRequest(f"lora_path: {exc}", param="lora_path") from None

    await asyncio.wrap_future(state.scheduler.call(load))
    state.metrics.add_adapter(body.lora_name)
    routed = " and routed (the router has a class for it)" if body.lora_name in state.pipeline.task_names else ""
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully{routed}.")


async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> PlainTextResponse:
    """vLLM's runtime adapter unloading; a router class's adapter leaves its class to the base model."""
    state = _state(request)
    if body.lora_name not in state.pipeline.adapter_names:
        raise InvalidRequest(f"no adapter named {body.lora_name!r} is loaded", param="lora_name")

    def unload() -> None:
        if body.lora_name in getattr(state.runner, "active_adapters", ()) or any(
            body.lora_name in (j.mixture or {}) for j in state.scheduler.waiting_jobs()
        ):
            raise InvalidRequest(
                f"adapter {body.lora_name!r} is in use by a running or waiting request; retry when they are answered",
                param="lora_name",
            )
        state.runner.pause()
        try:
            state.pipeline.remove_adapter(body.lora_name)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="lora_name") from None

    await asyncio.wrap_future(state.scheduler.call(unload))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


async def playground(request: Request) -> HTMLResponse:
    page = resources.files("dlp_lora.server").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page)


def add_extra_routes(app: FastAPI, cfg: ServerConfig) -> None:
    bad = {400: ERROR_RESPONSES[400]}
    app.add_api_route("/v1/route", route, methods=["POST"], responses=bad)
    app.add_api_route("/tokenize", tokenize, methods=["POST"], responses={**bad, 404: ERROR_RESPONSES[404]})
    app.add_api_route("/detokenize", detokenize, methods=["POST"], responses={**bad, 404: ERROR_RESPONSES[404]})
    if cfg.allow_runtime_adapters:
        app.add_api_route(
            "/v1/load_lora_adapter",
            load_lora_adapter,
            methods=["POST"],
            responses=bad,
            response_class=PlainTextResponse,
        )
        app.add_api_route(
            "/v1/unload_lora_adapter",
            unload_lora_adapter,
            methods=["POST"],
            responses=bad,
            response_class=PlainTextResponse,
        )
    app.add_api_route("/", playground, methods=["GET"], include_in_schema=False)
