"""The HTTP entry point: an OpenAI-compatible FastAPI app over one `DLPLoRA` pipeline.

Thin by design: validate the request at the boundary, queue it on the `Scheduler`, format the answer.
All state lives on the app (`app.state.server`), none in this module. Errors map to HTTP codes by type
(`errors.py`); anything unexpected is logged and the client gets a generic 500.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET /v1/models,
GET /health, GET /metrics.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import time
import uuid
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dlp_lora.chat import chat_prompt
from dlp_lora.config import DeviceConfig, RoutingConfig, ServerConfig
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.server.errors import APIError, InvalidRequest, error_body
from dlp_lora.server.metrics import CONTENT_TYPE, Metrics
from dlp_lora.server.runner import PipelineRunner
from dlp_lora.server.scheduler import BatchRunner, Job, Sampling, Scheduler
from dlp_lora.server.schemas import (ChatCompletionRequest, CompletionRequest, GenerationParams, Kind, ModelCard,
                                     ModelList, RoutingInfo, chunk_for, response_for, usage_chunk_for)

__all__ = ["create_app", "serve"]


class ServerState:
    """Everything the handlers share: the pipeline, its scheduler, metrics and the request validator."""

    def __init__(self, pipeline: DLPLoRA, cfg: ServerConfig, runner: BatchRunner | None = None) -> None:
        self.pipeline, self.cfg = pipeline, cfg
        self.model_name = cfg.model_name or getattr(pipeline.model, "name_or_path", "") or "dlp-lora"
        # The worker thread uses the pipeline's tokenizer; validation counts tokens on the event loop with
        # a private copy so the two threads never share tokenizer state.
        self.tokenizer = copy.deepcopy(pipeline.tokenizer)
        self.metrics = Metrics(pipeline.adapter_names, cfg.max_batch_size)
        self.scheduler = Scheduler(cfg, runner or PipelineRunner(pipeline), on_batch=self.metrics.observe_batch)
        self.created = int(time.time())
        # A pipeline with its own, lower prompt limit would fail a whole batch in the worker: refuse here.
        self.max_prompt_tokens = min(cfg.max_prompt_tokens, pipeline.max_prompt_tokens or cfg.max_prompt_tokens)

    def job(self, text: str, req: GenerationParams, param: str) -> Job:
        """A validated Job, or InvalidRequest naming the field, the limit and the value."""
        if not text.strip():
            raise InvalidRequest(f"{param}: the prompt is empty; expected non-blank text", param=param)
        max_tokens = req.max_tokens if req.max_tokens is not None else self.cfg.default_max_tokens
        if max_tokens > self.cfg.max_tokens_limit:
            raise InvalidRequest(f"max_tokens={max_tokens} is over this server's limit "
                                 f"max_tokens_limit={self.cfg.max_tokens_limit}", param="max_tokens")
        n = len(self.tokenizer(chat_prompt(self.tokenizer, text), add_special_tokens=False)["input_ids"])
        if n > self.max_prompt_tokens:
            raise InvalidRequest(f"{param}: the prompt has {n} tokens (chat template included); the limit is "
                                 f"max_prompt_tokens={self.max_prompt_tokens}", param=param)
        return Job(text=text, prompt_tokens=n, max_tokens=max_tokens, stop=req.stop_strings,
                   sampling=Sampling.of(req.temperature, req.top_p, req.seed), mixture=self._mixture(req),
                   routing=self._routing_config(req))

    def _routing_config(self, req: GenerationParams) -> RoutingConfig:
        """The pipeline's routing granularity with the request's overrides."""
        given = {"granularity": req.routing_granularity, "segment_marker": req.segment_marker}
        cfg = dataclasses.replace(self.pipeline.routing_config, **{k: v for k, v in given.items() if v is not None})
        if req.model in self.pipeline.adapter_names and cfg.granularity != "prompt":
            raise InvalidRequest(f"routing_granularity={cfg.granularity!r} needs the router; model={req.model!r} "
                                 "names one adapter", param="routing_granularity")
        return cfg

    def _mixture(self, req: GenerationParams) -> dict[str, float] | None:
        names = self.pipeline.adapter_names
        mixture = req.mixture
        if mixture is None and req.model in names:
            mixture = {req.model: 1.0}
        for name in mixture or {}:
            if name not in names:
                raise InvalidRequest(f"unknown adapter {name!r}; known adapters: {', '.join(names)}",
                                     param="adapters")
        if mixture is None and self.pipeline.router is None:
            raise InvalidRequest("this server has no router; name adapters in `adapters` (or an adapter as "
                                 f"`model`); known adapters: {', '.join(names)}", param="adapters")
        return mixture


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code, param), status_code=status, headers=headers)


def _generic_500() -> JSONResponse:
    return _error(500, "internal server error", "server_error", "internal_error")


# ---- exception mapping (by type) ------------------------------------------------------------------

async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return _error(exc.status, exc.message, exc.type, exc.code, exc.param, headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's errors as one 400 message naming each bad field (OpenAI answers 400, not 422)."""
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            continue
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        field = ".".join(loc) or "request body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{field}: {msg}")
    return _error(400, "; ".join(parts) or "invalid request", "invalid_request_error", "invalid_request", param)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return _error(exc.status_code, str(exc.detail), "invalid_request_error", code, headers=exc.headers)


async def _contain_and_count(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Outermost: count every response by route and status; turn any escaped exception into a generic 500."""
    try:
        response = await call_next(request)
    except Exception:
        logging.getLogger(__name__).exception("unhandled error on %s %s", request.method, request.url.path)
        response = _generic_500()
    route = request.scope.get("route")
    _state(request).metrics.observe_request(getattr(route, "path", "unmatched"), response.status_code)
    return response


# ---- generation endpoints ------------------------------------------------------------------------

class _QueueSink:
    """A StreamSink handing the worker thread's events to the event loop, in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.events: asyncio.Queue = asyncio.Queue()

    def _put(self, item: tuple) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def started(self, adapters: list[str], weights: list[float]) -> None:
        self._put(("start", RoutingInfo(adapters=adapters, weights=weights)))

    def delta(self, text: str) -> None:
        self._put(("delta", text))

    def done(self, future: Future) -> None:
        self._put(("done", future))


async def completions(body: CompletionRequest, request: Request) -> Response:
    return await _answer(request, body, body.user_text(), "prompt", "completion")


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await _answer(request, body, body.user_text(), "messages", "chat")


async def _answer(request: Request, body: GenerationParams, text: str, param: str, kind: Kind) -> Response:
    state = _state(request)
    job = state.job(text, body, param)
    started = time.perf_counter()
    rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
    model, endpoint = body.model or state.model_name, request.scope["route"].path
    if body.stream:
        return await _start_stream(state, job, body, kind, (rid, int(time.time()), model), endpoint, started)
    c = await asyncio.wrap_future(state.scheduler.submit(job))
    state.metrics.observe_completion(endpoint, time.perf_counter() - started, c.prompt_tokens,
                                     c.completion_tokens, c.adapters)
    return JSONResponse(response_for(kind, rid, int(time.time()), model, c))


async def _start_stream(state: ServerState, job: Job, body: GenerationParams, kind: Kind, head: tuple,
                        endpoint: str, started: float) -> Response:
    """Queue the job and wait for its batch to start, so a failure before the first token is still a
    proper HTTP error; then stream server-sent events."""
    sink = _QueueSink(asyncio.get_running_loop())
    job.sink = sink
    state.scheduler.submit(job).add_done_callback(sink.done)
    first = await sink.events.get()
    if first[0] == "done":
        first[1].result()  # raises the job's error, mapped by type (a result without a start streams as usual)
    events = _sse(state, job, sink, first, kind, head, body.include_usage, endpoint, started)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _data(payload: dict | str) -> str:
    return "data: " + (payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)) + "\n\n"


async def _sse(state: ServerState, job: Job, sink: _QueueSink, item: tuple, kind: Kind, head: tuple,
               include_usage: bool, endpoint: str, started: float) -> AsyncIterator[str]:
    routing = RoutingInfo(adapters=[], weights=[])
    try:
        while True:
            event, payload = item
            if event == "start":
                routing = payload
                yield _data(chunk_for(kind, *head, routing, text="", first=True))
            elif event == "delta":
                yield _data(chunk_for(kind, *head, routing, text=payload))
            else:
                async for line in _closing(state, payload, kind, head, routing, include_usage, endpoint, started):
                    yield line
                return
            item = await sink.events.get()
    finally:
        if not job.future.done():  # the client disconnected mid-stream: free its batch row
            job.abandon()


async def _closing(state: ServerState, future: Future, kind: Kind, head: tuple, routing: RoutingInfo,
                   include_usage: bool, endpoint: str, started: float) -> AsyncIterator[str]:
    """The last chunks: finish_reason (and usage), or an in-band error since the 200 is already sent."""
    try:
        c = future.result()
    except Exception as exc:
        if not isinstance(exc, APIError):
            logging.getLogger(__name__).error("streamed request failed", exc_info=exc)
        msg = exc.message if isinstance(exc, APIError) else "internal server error"
        yield _data(error_body(msg, getattr(exc, "type", "server_error"), getattr(exc, "code", "internal_error")))
        yield _data("[DONE]")
        return
    yield _data(chunk_for(kind, *head, routing, finish_reason=c.finish_reason))
    if include_usage:
        yield _data(usage_chunk_for(kind, *head, c))
    yield _data("[DONE]")
    state.metrics.observe_completion(endpoint, time.perf_counter() - started, c.prompt_tokens,
                                     c.completion_tokens, c.adapters)


# ---- other endpoints -----------------------------------------------------------------------------

async def health(request: Request) -> JSONResponse:
    state = _state(request)
    ok = state.scheduler.alive
    return JSONResponse({"status": "ok" if ok else "unavailable", "queue_depth": state.scheduler.queue_depth,
                         "adapters": len(state.pipeline.adapter_names)}, status_code=200 if ok else 503)


async def models(request: Request) -> JSONResponse:
    state = _state(request)
    cards = [ModelCard(id=state.model_name, created=state.created)]
    cards += [ModelCard(id=n, created=state.created, parent=state.model_name) for n in state.pipeline.adapter_names]
    return JSONResponse(ModelList(data=cards).model_dump())


async def metrics(request: Request) -> PlainTextResponse:
    state = _state(request)
    return PlainTextResponse(state.metrics.render(state.scheduler.queue_depth), media_type=CONTENT_TYPE)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    scheduler = app.state.server.scheduler
    scheduler.start()
    try:
        yield
    finally:
        # Joining waits for the running batch; off the loop, so its last stream events still get delivered.
        await asyncio.to_thread(scheduler.stop)


def create_app(pipeline: DLPLoRA, cfg: ServerConfig | None = None, runner: BatchRunner | None = None) -> FastAPI:
    """The app for one pipeline. The batching worker starts and stops with the app's lifespan.

    `runner` replaces the default `PipelineRunner` (tests wrap it to hold batches deterministically).
    """
    cfg = cfg or ServerConfig()
    app = FastAPI(title="dlp-lora", description=__doc__.splitlines()[0], lifespan=_lifespan)
    app.state.server = ServerState(pipeline, cfg, runner)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.middleware("http")(_contain_and_count)
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    return app


def serve(assets: str | Path, cfg: ServerConfig, base_model: str | None = None,
          device: DeviceConfig | None = None, quantize: str = "none") -> None:
    """Load an assets folder and serve it with uvicorn until interrupted (`dlp-lora serve`).

    device: where the model runs and in which dtype (default: cuda when available, float32);
    quantize: the base weights, none or int8 (`dlp_lora.quantize`)."""
    import uvicorn

    from dlp_lora.assets import Manifest

    pipeline = DLPLoRA.from_assets(assets, base_model, device=device, quantize=quantize)
    name = cfg.model_name or base_model or Manifest.load(assets).base_model
    app = create_app(pipeline, dataclasses.replace(cfg, model_name=name))
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
