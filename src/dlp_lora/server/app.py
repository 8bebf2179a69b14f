"""The HTTP entry point: an OpenAI-compatible FastAPI app over one `DLPLoRA` pipeline.

Thin by design: validate the request at the boundary (`schemas.py`, `state.py`), queue its jobs on the
`Scheduler`, format the answer (`responses.py`). All state lives on the app (`app.state.server`), none in
this module. Errors map to HTTP codes by type (`errors.py`); anything unexpected is logged and the
client gets a generic 500.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream`), GET /v1/models,
POST /tokenize, POST /detokenize, GET /health, GET /metrics, the playground page at GET /, and with
`allow_runtime_adapters` POST /v1/load_lora_adapter and POST /v1/unload_lora_adapter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dlp_lora.config import ArrowConfig, DeviceConfig, RoutingConfig, ServerConfig
from dlp_lora.engine import Result
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.server.errors import APIError, error_body
from dlp_lora.server.extras import add_extra_routes
from dlp_lora.server.metrics import CONTENT_TYPE
from dlp_lora.server.responses import (
    ERROR_RESPONSES,
    Kind,
    ModelCard,
    ModelList,
    RoutingInfo,
    SwitchInfo,
    chat_choice,
    chunk_for,
    completion_choice,
    response_for,
    routing_of,
    usage_chunk_for,
    usage_of,
)
from dlp_lora.server.scheduler import Job, StepRunner
from dlp_lora.server.schemas import ChatCompletionRequest, CompletionRequest
from dlp_lora.server.state import ROUTER_NAME, ServerState

__all__ = ["create_app", "serve"]


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _error(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
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
    request.state.started = time.perf_counter()
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

    def switched(self, switch: dict) -> None:
        self._put(("switch", SwitchInfo(**switch)))

    def delta(self, text: str) -> None:
        self._put(("delta", text))

    def done(self, future: Future) -> None:
        self._put(("done", future))


async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    prompts = state.completion_prompts(body)
    jobs = state.jobs(body, prompts, state.completion_route_texts(body, prompts), body.wanted_logprobs, body.echo)
    if body.stream:
        return await _start_stream(request, jobs[0], body.include_usage, "completion", body.model)
    done = await _run_all(state, jobs)
    text = state.tokenizer.decode
    token_text = lambda t: text([t])  # noqa: E731
    choices = [
        completion_choice(i, c, prompts[i // body.n][0] if body.echo else None, token_text) for i, c in enumerate(done)
    ]
    return _respond(request, "completion", body.model, choices, [len(ids) for _, ids in prompts], done)


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    jobs = state.chat_jobs(body)
    if body.stream:
        return await _start_stream(request, jobs[0], body.include_usage, "chat", body.model)
    done = await _run_all(state, jobs)
    text = state.tokenizer.decode
    choices = [chat_choice(i, c, lambda t: text([t])) for i, c in enumerate(done)]
    return _respond(request, "chat", body.model, choices, [jobs[0].prompt_tokens], done)


async def _run_all(state: ServerState, jobs: list[Job]) -> list[Result]:
    """Queue every choice at once (all or none); if one fails, the others are abandoned."""
    state.scheduler.submit(jobs)
    try:
        return list(await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs)))
    finally:
        for j in jobs:
            if not j.future.done():
                j.abandon()


def _respond(
    request: Request,
    kind: Kind,
    model: str | None,
    choices: list[dict],
    prompt_tokens: list[int],
    done: list[Result],
) -> JSONResponse:
    state = _state(request)
    usage = usage_of(prompt_tokens, done)
    adapters = {a for c in done for a in _used(c)}
    state.metrics.observe_completion(
        request.scope["route"].path,
        time.perf_counter() - request.state.started,
        usage.prompt_tokens,
        usage.completion_tokens,
        adapters,
    )
    rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
    return JSONResponse(
        response_for(kind, rid, int(time.time()), model or ROUTER_NAME, choices, usage, routing_of(done[0]))
    )


def _used(c: Result) -> list[str]:
    """Every adapter that answered some of the completion's tokens (the first mixture's and any switch's)."""
    return c.adapters + [a for s in c.switches or [] for a in s["adapters"]]


async def _start_stream(request: Request, job: Job, include_usage: bool, kind: Kind, model: str | None) -> Response:
    """Queue the job and wait for its row to start, so a failure before the first token is still a
    proper HTTP error; then stream server-sent events."""
    state = _state(request)
    rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
    head = (rid, int(time.time()), model or ROUTER_NAME)
    sink = _QueueSink(asyncio.get_running_loop())
    job.sink = sink
    state.scheduler.submit(job).add_done_callback(sink.done)
    first = await sink.events.get()
    if first[0] == "done":
        first[1].result()  # raises the job's error, mapped by type (a result without a start streams as usual)
    events = _sse(
        state, job, sink, first, kind, head, include_usage, request.scope["route"].path, request.state.started
    )
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _data(payload: dict | str) -> str:
    return "data: " + (payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)) + "\n\n"


async def _sse(
    state: ServerState,
    job: Job,
    sink: _QueueSink,
    item: tuple,
    kind: Kind,
    head: tuple,
    include_usage: bool,
    endpoint: str,
    started: float,
) -> AsyncIterator[str]:
    routing = RoutingInfo(adapters=[], weights=[])
    sentence = job.mixture is None and job.routing.granularity == "sentence"
    try:
        while True:
            event, payload = item
            if event == "start":
                routing = payload.model_copy(update={"switches": [] if sentence else None})
                yield _data(chunk_for(kind, *head, routing, text="", first=True))
            elif event == "switch":  # `sentence` routing: the chunks from here on list it
                routing = routing.model_copy(update={"switches": [*(routing.switches or []), payload]})
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


async def _closing(
    state: ServerState,
    future: Future,
    kind: Kind,
    head: tuple,
    routing: RoutingInfo,
    include_usage: bool,
    endpoint: str,
    started: float,
) -> AsyncIterator[str]:
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
    usage = usage_of([c.prompt_tokens], [c])
    if include_usage:
        yield _data(usage_chunk_for(kind, *head, c))
    yield _data("[DONE]")
    state.metrics.observe_completion(
        endpoint, time.perf_counter() - started, usage.prompt_tokens, usage.completion_tokens, _used(c)
    )


# ---- other endpoints -----------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    state = _state(request)
    ok = state.scheduler.alive
    return JSONResponse(
        {
            "status": "ok" if ok else "unavailable",
            "queue_depth": state.scheduler.queue_depth,
            "running": state.scheduler.running,
            "adapters": len(state.pipeline.adapter_names),
        },
        status_code=200 if ok else 503,
    )


async def models(request: Request) -> JSONResponse:
    state = _state(request)
    base, created, limit = state.model_name, state.created, state.max_prompt_tokens + state.cfg.max_tokens_limit
    cards = [ModelCard(id=base, created=created, root=base, max_model_len=limit)]
    cards += [
        ModelCard(id=n, created=created, root=base, parent=base, max_model_len=limit) for n in state.model_ids()[1:]
    ]
    return JSONResponse(ModelList(data=cards).model_dump())


async def metrics(request: Request) -> Response:
    state = _state(request)
    running = getattr(state.runner, "active_adapters", ())
    waiting = [a for j in state.scheduler.waiting_jobs() for a in (j.mixture or {})]
    prefixes = getattr(state.runner, "prefixes", None)
    found = (prefixes.queried_tokens, prefixes.reused_tokens) if prefixes is not None else (0, 0)
    body = state.metrics.render(state.scheduler.queue_depth, state.scheduler.running, running, waiting, found)
    return Response(body, media_type=CONTENT_TYPE)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    scheduler = app.state.server.scheduler
    if app.state.own_worker:
        scheduler.start()
    try:
        yield
    finally:
        # Joining waits for the running batch; off the loop, so its last stream events still get delivered.
        await asyncio.to_thread(scheduler.stop)


def create_app(
    pipeline: DLPLoRA, cfg: ServerConfig | None = None, runner: StepRunner | None = None, own_worker: bool = True
) -> FastAPI:
    """The app for one pipeline. The batching worker starts (on a thread of its own) and stops with the
    app's lifespan; own_worker=False leaves running it to the caller (`app.state.server.scheduler.run()`,
    as `serve` does on the main thread), the lifespan still stops it.

    `runner` replaces the default `PipelineRunner` (tests wrap it to hold batches deterministically).
    """
    cfg = cfg or ServerConfig()
    app = FastAPI(title="dlp-lora", description=__doc__.splitlines()[0], lifespan=_lifespan)
    app.state.server = ServerState(pipeline, cfg, runner)
    app.state.own_worker = own_worker
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.middleware("http")(_contain_and_count)
    # With `stream`, the 200 is server-sent events: each one `data: <chunk JSON>` or `data: [DONE]`.
    event = {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"]}
    generation = {
        200: {
            "description": "The answer (JSON), or with `stream` server-sent events.",
            "content": {"text/event-stream": {"schema": event}},
        },
        **ERROR_RESPONSES,
    }
    app.add_api_route("/v1/completions", completions, methods=["POST"], responses=generation)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], responses=generation)
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"], responses={503: ERROR_RESPONSES[503]})
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=PlainTextResponse)
    add_extra_routes(app, cfg)
    app.openapi = lambda: _openapi(app, cfg)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, cfg: ServerConfig) -> dict:
    """FastAPI's document, made true to this server: validation errors are 400 (never 422), and the
    server's own limits (max_tokens) are stated where a generated client reads them."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path in doc.get("paths", {}).values():
        for op in path.values():
            op.get("responses", {}).pop("422", None)
    for schema in ("CompletionRequest", "ChatCompletionRequest"):
        props = doc.get("components", {}).get("schemas", {}).get(schema, {}).get("properties", {})
        for name in ("max_tokens", "max_completion_tokens"):
            for branch in props.get(name, {}).get("anyOf", []):
                if branch.get("type") == "integer":
                    branch["maximum"] = cfg.max_tokens_limit
    for path in doc.get("paths", {}).values():  # errors are JSON, also where success is plain text
        for op in path.values():
            for code, answer in op.get("responses", {}).items():
                content = answer.get("content", {})
                if code != "200" and "text/plain" in content:
                    content["application/json"] = content.pop("text/plain")
    for name in ("HTTPValidationError", "ValidationError"):
        doc.get("components", {}).get("schemas", {}).pop(name, None)
    app.openapi_schema = doc
    return doc


def serve(
    assets: str | Path,
    cfg: ServerConfig,
    base_model: str | None = None,
    device: DeviceConfig | None = None,
    quantize: str = "none",
    routing: RoutingConfig | None = None,
    arrow: ArrowConfig | None = None,
) -> None:
    """Load an assets folder and serve it with uvicorn until interrupted (`dlp-lora serve`).

    device: where the model runs and in which dtype (default: cuda when available, float32);
    quantize: the base weights, none or int8 (`dlp_lora.quantize`); routing: the routing granularity of
    routed requests that do not choose one (default: per prompt); arrow: route every token with Arrow
    instead of the router."""
    import uvicorn

    from dlp_lora.assets import Manifest

    pipeline = DLPLoRA.from_assets(
        assets, base_model, device=device, quantize=quantize, routing_config=routing, arrow=arrow
    )
    name = cfg.model_name or base_model or Manifest.load(assets).base_model
    app = create_app(pipeline, dataclasses.replace(cfg, model_name=name), own_worker=False)
    scheduler = app.state.server.scheduler
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info"))

    def http() -> None:
        try:
            server.run()
        finally:  # whatever ended the HTTP side (a signal, a port in use) ends the worker loop below
            scheduler.stop()

    # The batching worker runs on the main thread: torch's CPU kernels measured 1.4-1.8x slower on a second
    # thread here (docs/performance.md). uvicorn installs signal handlers only on the main thread, so
    # SIGINT/SIGTERM are routed to its shutdown by hand; the lifespan then stops the worker.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, server.handle_exit)
    thread = threading.Thread(target=http, name="dlp-lora-http")
    thread.start()
    try:
        scheduler.run()
    finally:
        server.should_exit = True
        thread.join()
