"""What the handlers share (`app.state.server`): the pipeline, its scheduler and metrics, and the
validation that turns a request into jobs (one per choice) or a 400 naming the field.

Models by name: the router's name (`dlp-lora`, also when `model` is absent) lets the router choose each
prompt's mixture; the base model's id serves the base model alone; an adapter's name (runtime adapters
included) serves that adapter alone; `adapters` (+ `weights`) in the body overrides all of these.
"""

from __future__ import annotations

import copy
import dataclasses
import time

from dlp_lora.chat import UserTurns, conversation_prompt
from dlp_lora.config import GenerationConfig, RoutingConfig, ServerConfig
from dlp_lora.granularity import completion_route_text, routing_text
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.server.errors import APIError, InvalidRequest
from dlp_lora.server.metrics import Metrics
from dlp_lora.server.runner import PipelineRunner
from dlp_lora.server.scheduler import Job, Scheduler, StepRunner
from dlp_lora.server.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationParams,
    RouteRequest,
)

__all__ = ["ModelNotFound", "ROUTER_NAME", "ServerState"]

ROUTER_NAME = "dlp-lora"
"""The model id that routes (the router chooses each prompt's adapter mixture)."""


class ModelNotFound(APIError):
    """`model` names no model this server serves (404, as OpenAI and vLLM answer)."""

    status, type, code = 404, "invalid_request_error", "model_not_found"


class ServerState:
    """The pipeline, its scheduler and metrics, and request validation."""

    def __init__(self, pipeline: DLPLoRA, cfg: ServerConfig, runner: StepRunner | None = None) -> None:
        self.pipeline, self.cfg = pipeline, cfg
        self.model_name = cfg.model_name or getattr(pipeline.model, "name_or_path", "") or "base"
        # The worker thread uses the pipeline's tokenizer; the event loop tokenizes with a private copy so
        # the two threads never share tokenizer state.
        self.tokenizer = copy.deepcopy(pipeline.tokenizer)
        self.user_turns = UserTurns(self.tokenizer)
        self.vocab_size = pipeline.model.get_input_embeddings().num_embeddings
        self.metrics = Metrics(pipeline.adapter_names, cfg.max_batch_size)
        self.runner = (
            runner
            if runner is not None
            else PipelineRunner(
                pipeline, cfg.prefix_cache_tokens, cfg.slot_sizes if cfg.compile else (), cfg.compile_context
            )
        )
        self.scheduler = Scheduler(
            cfg, self.runner, on_batch=self.metrics.observe_batch, on_step=self.metrics.observe_step
        )
        self.created = int(time.time())
        # A pipeline with its own, lower prompt limit would fail in the worker: refuse here.
        self.max_prompt_tokens = min(cfg.max_prompt_tokens, pipeline.max_prompt_tokens or cfg.max_prompt_tokens)

    # ---- models -----------------------------------------------------------------------------------
    def model_ids(self) -> list[str]:
        """Served model ids: the base model, the router (when there is one), every adapter, and every router
        class served by a mixture under another name (e.g. a task the gate gave to the generalist)."""
        names = list(self.pipeline.adapter_names)
        by_class = [c for c in self.pipeline.task_names if c not in names and self.pipeline.served(c)]
        return [self.model_name] + ([ROUTER_NAME] if self.pipeline.router is not None else []) + names + by_class

    def mixture(self, req: GenerationParams) -> dict[str, float] | None:
        """The request's explicit {adapter: weight} ({} for the base model), or None for the router."""
        names = self.pipeline.adapter_names
        if req.mixture is not None:
            for name in req.mixture:
                if name not in names:
                    raise InvalidRequest(
                        f"unknown adapter {name!r}; known adapters: {', '.join(names)}", param="adapters"
                    )
            return req.mixture
        model = req.model
        if model is None or model == ROUTER_NAME:
            if self.pipeline.router is None:
                raise InvalidRequest(
                    "this server has no router; name an adapter or the base model as `model`, "
                    f"or adapters in `adapters`; known adapters: {', '.join(names)}",
                    param="model",
                )
            return None
        if model == self.model_name:
            return {}
        if model in names:
            return {model: 1.0}
        if model in self.pipeline.task_names and self.pipeline.served(model):
            return self.pipeline.served(model)  # the class's prompts as the router would serve them
        raise self.not_found(model)

    def not_found(self, model: str) -> ModelNotFound:
        """The error for a `model` this server does not serve, saying why when it is a gated task."""
        why = (
            f"task {model!r} has no deployed adapter (the dev gate left it to the base model: ask for "
            f"{self.model_name!r}, or {ROUTER_NAME!r} to let the router choose); "
            if model in self.pipeline.base_served
            else ""
        )
        return ModelNotFound(
            f"the model {model!r} does not exist; {why}served models: {', '.join(self.model_ids())}", param="model"
        )

    # ---- requests -> jobs -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def completion_prompts(self, req: CompletionRequest) -> list[tuple[str, list[int]]]:
        """(prompt text, prompt token ids) per prompt; the text of a token prompt is its decoding."""
        out = []
        for i, p in enumerate(req.prompts):
            where = "prompt" if len(req.prompts) == 1 else f"prompt.{i}"
            if isinstance(p, str):
                out.append((p, self.encode(p)))
                continue
            bad = next((t for t in p if t >= self.vocab_size), None)
            if bad is not None:
                raise InvalidRequest(
                    f"{where}: token id {bad} is out of range; the vocabulary has {self.vocab_size} tokens",
                    param="prompt",
                )
            out.append((self.tokenizer.decode(p), list(p)))
        return out

    def max_tokens(self, req: GenerationParams) -> int:
        """The request's new-token limit, or the server's default."""
        return req.max_tokens if req.max_tokens is not None else self.cfg.default_max_tokens

    def completion_route_texts(self, req: CompletionRequest, prompts: list[tuple[str, list[int]]]) -> list[str]:
        """What the router reads of each prompt (`dlp_lora.granularity.completion_route_text`): the request's
        `route_on`; a prompt written in the chat template: its last user message, as the chat endpoint
        routes; a scoring request (`echo` with at most one new token: a context with an option appended):
        its question, so every option of one question gets one mixture; else the prompt."""
        if req.route_on is not None:
            return [req.route_on] * len(prompts)
        scoring = req.echo and self.max_tokens(req) <= 1
        return [completion_route_text(text, self.user_turns, scoring) for text, _ in prompts]

    def chat_prompt_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        text = conversation_prompt(self.tokenizer, [m.as_template_message() for m in messages], add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def jobs(
        self,
        req: GenerationParams,
        prompts: list[tuple[str, list[int]]],
        route_texts: list[str],
        logprobs: int | None,
        echo: bool,
    ) -> list[Job]:
        """One job per (prompt, choice), prompt-major as OpenAI numbers choices: validated limits."""
        max_tokens = self.max_tokens(req)
        if max_tokens > self.cfg.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens={max_tokens} is over this server's limit max_tokens_limit={self.cfg.max_tokens_limit}",
                param="max_tokens",
            )
        if max_tokens == 0 and not echo:
            raise InvalidRequest(
                "max_tokens=0 asks for nothing; send max_tokens >= 1 (0 only with echo)", param="max_tokens"
            )
        if len(prompts) * req.n > self.cfg.max_queue:
            raise InvalidRequest(
                f"{len(prompts)} prompts x n={req.n} choices is more than this server queues "
                f"(max_queue={self.cfg.max_queue}); split the request",
                param="n",
            )
        for i, (_, ids) in enumerate(prompts):
            if not ids:
                raise InvalidRequest(
                    "the prompt is empty after tokenizing; expected at least one token", param="prompt"
                )
            if len(ids) > self.max_prompt_tokens:
                where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
                raise InvalidRequest(
                    f"{where} has {len(ids)} tokens (chat template included); the limit is "
                    f"max_prompt_tokens={self.max_prompt_tokens}",
                    param="prompt",
                )
        mixture = self.mixture(req)
        if mixture is None and not all(route_texts):
            raise InvalidRequest(
                "the router reads the prompt's text (a chat's last user message) and it is empty; "
                "send text, or name an adapter or the base model as `model`",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            )
        routing = self.routing_config(req, mixture)
        jobs = []
        for (_, ids), text in zip(prompts, route_texts):
            route = routing_text(text, routing) if mixture is None else text
            for c in range(req.n):
                seed = None if req.seed is None else (req.seed + c) % 2**64
                jobs.append(
                    Job(
                        prompt_ids=ids,
                        route_text=route,
                        params=GenerationConfig.openai(
                            max_tokens, req.temperature, req.top_p, seed, req.stop_strings, req.ignore_eos
                        ),
                        mixture=mixture,
                        logprobs=logprobs,
                        echo=echo,
                        routing=routing,
                        window_text=text,
                    )
                )
        return jobs

    def routing_config(self, req: GenerationParams | RouteRequest, mixture: dict[str, float] | None) -> RoutingConfig:
        """The pipeline's routing granularity with the request's overrides, or a 400 naming the field
        (`/v1/route` passes no mixture: it never names a model).

        `segment` routes on the prompt's last segment: it only changes the text the router reads before
        the prefill. `sentence` starts the same way, then re-routes the row after each sentence it
        generates (`PipelineRunner` gives the row a policy; its neighbours in the continuous batch keep
        their mixtures). Both need the router: a request that names one model or adapter and asks for one is
        refused; one that names a model and asks for none is served under `prompt` (nothing is routed)."""
        given = {"granularity": req.routing_granularity, "segment_marker": req.segment_marker}
        cfg = dataclasses.replace(self.pipeline.routing_config, **{k: v for k, v in given.items() if v is not None})
        if cfg.granularity == "prompt":
            return cfg
        if mixture is not None:
            if req.routing_granularity is None:  # the server's default, not the request's wish
                return dataclasses.replace(cfg, granularity="prompt")
            raise InvalidRequest(
                f"routing_granularity={cfg.granularity!r} needs the router; model={req.model!r} "
                "names one model or adapter (send model=dlp-lora or none)",
                param="routing_granularity",
            )
        return cfg

    def chat_jobs(self, req: ChatCompletionRequest) -> list[Job]:
        ids = self.chat_prompt_ids(req.messages)
        return self.jobs(req, [("", ids)], [req.route_text()], req.wanted_logprobs, echo=False)
