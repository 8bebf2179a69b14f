"""DLPLoRA: tokenize -> route -> select -> routed generation. The user-facing API.

The router and the fused model meet only here, through a `Routing` value: the router never sees the
base model and the fusion never sees a prompt.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlp_lora.assets import Manifest
from dlp_lora.chat import UserTurns, prompt_ids
from dlp_lora.compiled import CompiledDecoder
from dlp_lora.config import (
    ArrowConfig,
    DeviceConfig,
    FusionConfig,
    GenerationConfig,
    Quantization,
    RoutingConfig,
    SelectionConfig,
)
from dlp_lora.engine import Engine, Result, Row, StepCallback, listed
from dlp_lora.fusion.inject import FusedLoRAModel
from dlp_lora.granularity import SentencePolicy, completion_route_text, routing_text
from dlp_lora.models import load_base_model
from dlp_lora.router import Router, select_with
from dlp_lora.sampling import eos_ids
from dlp_lora.scoring import continuation_logprobs
from dlp_lora.types import ArrowRouting, Routing

__all__ = ["DLPLoRA", "Result", "SentenceRerouter", "SwitchCallback"]

SwitchCallback = Callable[[int, int, list[str], list[float]], None]
"""on_switch(row, token, adapters, weights): row's answer tokens from index `token` on use this mixture."""


class DLPLoRA:
    """One base model, N task adapters and a router: each prompt gets its own adapter mixture."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        router: Router | None,
        adapters: Mapping[str, str | Path | None],
        selection: SelectionConfig | None = None,
        fusion: FusionConfig | None = None,
        max_prompt_tokens: int | None = None,
        baselines: Mapping[str, str | Path] | None = None,
        routing_config: RoutingConfig | None = None,
        compile: bool = False,
        serve: Mapping[str, Mapping[str, float]] | None = None,
        arrow: ArrowConfig | None = None,
    ) -> None:
        """adapters: the router's classes in its order, each with its adapter, or None where the base model
        serves the class (the dev gate: routing to it puts weight on nothing); baselines: more adapters the
        router never picks by themselves (served when named, e.g. the `multitask` baseline), after them in
        the bank; serve: classes served by another mixture than their own adapter, class -> {adapter: weight}
        over the bank (e.g. a class the gate gave to the `multitask` generalist: routing to it puts its
        weight there; `Manifest.serve`);
        routing_config: the default routing granularity of `generate` (`RoutingConfig()`: the prompt's last segment); compile:
        decode steps run compiled over a static KV cache (`dlp_lora.compiled`: the first call of each batch
        size and path compiles, tens of seconds on a 2-core CPU; later calls decode faster); arrow: route with
        Arrow (per token, among the routed classes' adapters) instead of the router."""
        if router is not None and list(router.task_names) != list(adapters):
            raise ValueError(
                f"router classes {list(router.task_names)} do not match adapters {list(adapters)} "
                "(same names in the same order are required)"
            )
        baselines = dict(baselines or {})
        clash = sorted(set(baselines) & set(adapters))
        if clash:
            raise ValueError(f"baseline adapters {clash} share names with routed adapters")
        deployed = {name: path for name, path in adapters.items() if path is not None}
        if not deployed and not baselines:
            raise ValueError("no adapter to serve: every class maps to the base model and there are no baselines")
        self.model, self.tokenizer, self.router = model, tokenizer, router
        self.user_turns = UserTurns(tokenizer)  # finds a chat-templated raw prompt's user message
        self.selection = selection or SelectionConfig()
        self.routing_config = routing_config or RoutingConfig()
        self.max_prompt_tokens = max_prompt_tokens
        self.baselines = list(baselines)
        self.classes = list(adapters)
        self.serve = {c: dict(m) for c, m in (serve or {}).items()}
        unknown = sorted(set(self.serve) - set(self.classes))
        if unknown:
            raise ValueError(f"serve names {unknown}, which are not router classes: {self.classes}")
        self.fused = FusedLoRAModel(model, {**deployed, **baselines}, fusion)
        self._decoder = CompiledDecoder(model) if compile else None
        self.arrow = arrow
        if arrow is not None:
            self.arrow_routing()  # fail now on a bad setting (top_k, an unknown general adapter)
        self._reindex()

    def arrow_routing(self, arrow: ArrowConfig | None = None) -> ArrowRouting:
        """The `ArrowRouting` of an Arrow setting (default: this pipeline's `arrow`) over the current bank: the
        routed classes' adapters are the experts, the named general adapters (e.g. a baseline) GenKnowSub's."""
        arrow = arrow or self.arrow
        if arrow is None:
            raise ValueError("this pipeline routes with its router; pass arrow=ArrowConfig() to route with Arrow")
        names = self.adapter_names
        experts = tuple(names.index(c) for c in self.classes if c in names)
        unknown = [g for g in arrow.general if g not in names]
        if unknown:
            raise ValueError(f"Arrow's general adapters {unknown} are not loaded; loaded adapters: {names}")
        if not experts or arrow.top_k > len(experts):
            raise ValueError(f"Arrow top_k {arrow.top_k} needs at least that many deployed adapters, found "
                             f"{len(experts)}")  # fmt: skip
        general = tuple(names.index(g) for g in arrow.general)
        return ArrowRouting(experts, arrow.top_k, arrow.temperature, general, arrow.seed)

    def served(self, cls: str) -> dict[str, float]:
        """The mixture over bank adapters that serves router class `cls` ({}: the base model)."""
        if cls in self.serve:
            return dict(self.serve[cls])
        return {cls: 1.0} if cls in self.fused.adapter_names else {}

    def _reindex(self) -> None:
        """The (classes, bank) matrix whose row c is the mixture serving class c (redone when the bank
        changes); a class served by nothing has a zero row: the base model."""
        names = self.fused.adapter_names
        for cls, mix in self.serve.items():
            missing = [n for n in mix if n not in names]
            if missing:
                raise ValueError(f"class {cls!r} is served by {mix}, but {missing} are not loaded adapters: {names}")
        self._serving = torch.zeros(len(self.classes), len(names))
        for c, cls in enumerate(self.classes):
            for name, w in self.served(cls).items():
                self._serving[c, names.index(name)] = w
        self._no_adapter = [c for c in range(len(self.classes)) if not bool(self._serving[c].any())]

    @classmethod
    def from_assets(
        cls,
        root: str | Path,
        base_model: str | None = None,
        selection: SelectionConfig | None = None,
        fusion: FusionConfig | None = None,
        device: DeviceConfig | None = None,
        quantize: Quantization = "none",
        routing_config: RoutingConfig | None = None,
        compile: bool = False,
        arrow: ArrowConfig | None = None,
    ) -> DLPLoRA:
        """Load base model, adapters and router of an assets folder; the embedded model by default.

        `base_model` overrides the manifest's base model (it must be the one the adapters were trained on).
        `device` places the base model, the adapters and the router (default: float32 on cuda when
        available, else on cpu). `quantize="int8"` loads the base in int8 (:mod:`dlp_lora.quantize`, CPU
        only: with it `device="auto"` means cpu); `quantize="auto"` measures int8 against fp32 on this CPU
        and quantizes only where int8 is faster (on a GPU it is `none`); the adapters stay float32 on top.
        `compile`, `arrow`: see `__init__`.
        """
        device = device or DeviceConfig()
        manifest = Manifest.load(root)
        manifest.check(root)
        if manifest.router is None:
            raise ValueError(f"{root}: the manifest names no router; train one with `dlp-lora train-router`")
        # An int8 base runs on CPU kernels only, so device `auto` means cpu with it (an explicit cuda errors);
        # quantize `auto` follows the device instead (fp32 on a GPU).
        where = "cpu" if quantize == "int8" and device.device == "auto" else device.device
        model, tok = load_base_model(base_model or manifest.base_model, device.dtype, where, quantize=quantize)
        router = Router.load(Path(root) / manifest.router, expected_tasks=manifest.tasks).to(model.device)
        selection = selection or SelectionConfig(**manifest.selection)
        return cls(
            model,
            tok,
            router,
            manifest.adapter_paths(root),
            selection,
            fusion,
            baselines=manifest.baseline_paths(root),
            routing_config=routing_config,
            compile=compile,
            serve=manifest.serve,
            arrow=arrow,
        )

    @property
    def device(self) -> torch.device:
        """The base model's device (where prompts are sent); move the whole model with `model.to()`."""
        return next(self.model.parameters()).device

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter in bank order: the router's classes first, then the baselines."""
        return self.fused.adapter_names

    @property
    def task_names(self) -> list[str]:
        """The router's classes in order, with or without a deployed adapter."""
        return list(self.classes)

    @property
    def base_served(self) -> list[str]:
        """Classes the base model serves (no adapter serves them)."""
        return [self.classes[i] for i in self._no_adapter]

    @property
    def no_adapter(self) -> list[int]:
        """Indices of the classes the base model serves: the `no_adapter` of `router.select_with`."""
        return list(self._no_adapter)

    def to_bank(self, class_weights: torch.Tensor) -> torch.Tensor:
        """(B, classes) weights -> (B, bank) weights: each class's weight spread over the mixture serving it
        (a sum of LoRAs is one LoRA, so this is exact); a class served by the base model drops its weight."""
        if class_weights.dim() != 2 or class_weights.shape[1] != len(self.classes):
            raise ValueError(f"expected class weights (B, {len(self.classes)}), got {tuple(class_weights.shape)}")
        return class_weights @ self._serving.to(class_weights.device, class_weights.dtype)

    def add_adapter(self, name: str, path: str | Path) -> None:
        """Serve one more PEFT adapter. Named after a router class the base model serves (the dev gate kept
        no adapter for it), it becomes that class's adapter and is routed; any other name is served by name
        only (the router has no class for it, like a baseline)."""
        if name in self.adapter_names:
            raise ValueError(f"an adapter named {name!r} is already served")
        self.fused.add_adapter(name, path)
        if name not in self.classes:
            self.baselines.append(name)
        self._reindex()

    def remove_adapter(self, name: str) -> None:
        """Stop serving an adapter. A router class's adapter leaves its class to the base model (routing to
        it then puts weight on nothing, as the dev gate does); later adapters move down one bank index."""
        if name not in self.adapter_names:
            raise ValueError(f"no adapter named {name!r} is served; served adapters: {self.adapter_names}")
        self.fused.remove_adapter(name)
        if name in self.baselines:
            self.baselines.remove(name)
        for mix in self.serve.values():  # a class it served in a mixture keeps the rest of that mixture
            mix.pop(name, None)
        self._reindex()

    def route(
        self, prompts: Sequence[str], routing_config: RoutingConfig | Sequence[RoutingConfig] | None = None
    ) -> Routing:
        """Router probabilities -> selected adapters and weights, (B, k) over the bank, on the whole prompt
        (default) or on the text `routing_config` (one, or one per prompt) routes the answer's start on."""
        return Routing.from_dense(self.to_bank(self.class_weights(prompts, routing_config)))

    def class_weights(
        self, prompts: Sequence[str], routing_config: RoutingConfig | Sequence[RoutingConfig] | None = None
    ) -> torch.Tensor:
        """The selected weights per router class, (B, classes). A class without an adapter (`none`, or a task
        the dev gate left to the base model) carries no weight, and a row whose most probable class has no
        adapter is all zero: the base model alone, as that class's prompts are served."""
        if self.router is None:
            raise ValueError("this pipeline has no router; pass an explicit routing")
        cfgs = self._routing_configs(prompts, routing_config) if routing_config is not None else None
        texts = [routing_text(p, c) for p, c in zip(prompts, cfgs)] if cfgs is not None else list(prompts)
        return select_with(self.router.predict_proba(texts), self.selection, self._no_adapter).to_dense(
            len(self.classes)
        )

    def routing_for(self, mixtures: Sequence[Mapping[str, float]]) -> Routing:
        """Explicit routing by adapter name, one {name: weight} per prompt (weights used as given)."""
        dense = torch.zeros(len(mixtures), len(self.adapter_names), device="cpu")  # moved once, by `routed`
        for b, mix in enumerate(mixtures):
            for name, w in mix.items():
                if not (isinstance(w, (int, float)) and 0 <= w <= 1e6):
                    raise ValueError(f"prompt {b}: weight of adapter {name!r} must be a number in [0, 1e6], got {w!r}")
                if name in self.base_served:
                    raise ValueError(
                        f"task {name!r} has no deployed adapter (the dev gate kept the base model for "
                        f"it); deployed adapters: {self.adapter_names}"
                    )
                dense[b, self.fused.bank.index(name)] = float(w)
        return Routing.from_dense(dense)

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        config: GenerationConfig | None = None,
        routing: Routing | ArrowRouting | None = None,
        on_step: StepCallback | None = None,
        routing_config: RoutingConfig | Sequence[RoutingConfig] | None = None,
        on_switch: SwitchCallback | None = None,
    ) -> list[Result]:
        """Answer a batch of prompts, each row with its own mixture, on the engine the server runs.

        With `arrow` set (and no explicit `routing`), or an `ArrowRouting` as `routing`, Arrow routes every
        token and a `Result` names no mixture. routing_config (default: the pipeline's; one, or one per prompt) sets the granularity
        (`dlp_lora.granularity`): the mixture is routed on the prompt or its last segment, and under
        `sentence` changes after generated sentences. An explicit `routing` replaces the first routing
        (a `sentence` row then follows the router from its first sentence end on). on_switch(row, token,
        adapters, weights) is called when a row's mixture changes mid-answer (answer tokens from index
        `token` on are sampled under it).
        """
        config = config or GenerationConfig(max_new_tokens=max_new_tokens)
        ids = prompt_ids(self.tokenizer, list(prompts), self.max_prompt_tokens)
        if isinstance(routing, ArrowRouting) or (self.arrow is not None and routing is None):
            # Arrow routes each token in the layers: rows carry no mixture.
            arrow = routing if isinstance(routing, ArrowRouting) else self.arrow_routing()
            engine = Engine(self.fused, self.tokenizer, self._decoder, arrow=arrow)
            rows = engine.generate([Row(prompt_ids=p, mixture={}, params=config) for p in ids], on_step)
            return [engine.result(row, {}) for row in rows]
        cfgs = self._routing_configs(prompts, routing_config or self.routing_config)
        classes = None
        if routing is None:
            classes = self.class_weights(prompts, cfgs)
            routing = Routing.from_dense(self.to_bank(classes))
        elif routing.batch_size != len(prompts):
            raise ValueError(f"routing has {routing.batch_size} rows for {len(prompts)} prompts")
        names = self.adapter_names
        rows, first = [], []
        for b, prompt in enumerate(prompts):
            mixture = {names[i]: w for i, w in routing.row(b)}
            reroute = None
            if cfgs[b].granularity == "sentence":
                start = classes[b] if classes is not None else None
                reroute = SentenceRerouter(self, prompt, cfgs[b], start, on_switch=on_switch, row=b)
            rows.append(Row(prompt_ids=ids[b], mixture=mixture, params=config, reroute=reroute))
            first.append(mixture)
        # An engine per call: its routing state is this call's (calls from several threads queue at the
        # fused model's routing lock, held from the prefill to the last step).
        engine = Engine(self.fused, self.tokenizer, self._decoder)
        engine.generate(rows, on_step)
        return [engine.result(row, mix) for row, mix in zip(rows, first)]

    @staticmethod
    def _routing_configs(
        prompts: Sequence[str], routing_config: RoutingConfig | Sequence[RoutingConfig]
    ) -> list[RoutingConfig]:
        """One RoutingConfig per prompt."""
        if isinstance(routing_config, RoutingConfig):
            return [routing_config] * len(prompts)
        cfgs = list(routing_config)
        if len(cfgs) != len(prompts) or not all(isinstance(c, RoutingConfig) for c in cfgs):
            raise ValueError(
                f"routing_config must be a RoutingConfig or one per prompt ({len(prompts)}), got {routing_config!r}"
            )
        return cfgs

    def option_logprobs(
        self,
        prompts: Sequence[str],
        options: Sequence[Sequence[str]],
        routing: Routing | ArrowRouting | None = None,
        batch_size: int = 16,
        chat: bool = True,
    ) -> list[list[float]]:
        """Summed log-probability of each option's tokens after its prompt, under each prompt's routing (or
        Arrow's, per token).

        As lm-evaluation-harness scores multiple choice (see `dlp_lora.scoring.continuation_logprobs`):
        `chat` puts each prompt (a user message) in the chat template and the option as the answer; else
        the prompt is raw text and the option follows it as given (e.g. " Paris" after "Q: ...\nA:").
        Without `routing` the router chooses, reading what the server reads of the same scoring request
        (`granularity.completion_route_text`): a chat prompt's user message, a raw prompt's question, so
        library and server score a question under one mixture alike. Returns lists shaped like `options`.
        """
        if routing is None:  # the server's rule, then its default granularity, as the server applies both
            if chat:
                texts = list(prompts)
            else:
                joined = [p + (o[0] if o else "") for p, o in zip(prompts, options)]  # as the server gets it
                texts = [completion_route_text(t, self.user_turns, scoring=True) for t in joined]
            routing = self.route(texts, self.routing_config)
        if isinstance(routing, ArrowRouting):  # every row under Arrow, whichever rows a chunk holds

            def scope(owners: list[int]):
                return self.fused.routed(routing)
        else:
            dense = routing.to_dense(len(self.adapter_names))

            def scope(owners: list[int]):
                return self.fused.routed(dense[owners])

        return continuation_logprobs(self.model, self.tokenizer, prompts, options, batch_size, scope=scope, chat=chat)

    def mixture(self, dense_row: torch.Tensor) -> tuple[list[str], list[float]]:
        """(adapter names, weights rounded to 1e-6), heaviest first, of one row of bank weights (bank width,):
        what a `Result` reports for a row generated under it."""
        return listed({self.adapter_names[i]: w for i, w in Routing.from_dense(dense_row[None]).row(0)})

    def close(self) -> None:
        """Unfuse: the base model is the plain model again."""
        self.fused.remove()


class SentenceRerouter:
    """`Row.reroute` for one `sentence`-routed row, the library's and the server's: its `SentencePolicy`.

    The policy works on weights over the router's classes, not over the adapter bank, which runtime
    adapters may grow or shrink while the row runs; a change becomes the row's {adapter: weight} through
    `DLPLoRA.to_bank`, as the first routing did. `start`: the row's first class weights, or None when
    the row starts under an explicit mixture (then its first sentence end hands it to the router).
    """

    def __init__(
        self,
        pipeline: DLPLoRA,
        window_text: str,
        cfg: RoutingConfig,
        start: torch.Tensor | None,
        on_switch: SwitchCallback | None = None,
        row: int = 0,
    ) -> None:
        self.pipeline, self.on_switch, self.row, self.tokens = pipeline, on_switch, row, 0
        n = len(pipeline.task_names)
        # NaN equals no weights, so the router's first choice always differs from an explicit start.
        initial = start if start is not None else torch.full((n,), float("nan"))
        tokenizer = pipeline.tokenizer
        self.policy = SentencePolicy(
            cfg,
            [window_text],
            initial.detach().float().cpu()[None],  # on the host: the policy reads text, its weights become names
            decode=lambda t: tokenizer.decode(t, skip_special_tokens=True),
            route=lambda texts: self.pipeline.class_weights(texts),
            eos=frozenset(eos_ids(pipeline.model, tokenizer)),
        )

    def __call__(self, token: int) -> dict[str, float] | None:
        self.tokens += 1
        try:
            changes = self.policy.step(
                torch.tensor([token], device="cpu"), torch.zeros(1, dtype=torch.bool, device="cpu")
            )
        except ValueError:  # a window the router cannot read (no tokens): keep the mixture, fail no row
            logging.getLogger(__name__).warning(
                "sentence routing kept a row's mixture: the router refused its window", exc_info=True
            )
            return None
        if not changes:
            return None
        bank = self.pipeline.to_bank(changes[0][None])[0]
        names = self.pipeline.adapter_names
        mixture = {names[i]: w for i, w in enumerate(bank.tolist()) if w > 0}
        if self.on_switch is not None:
            self.on_switch(self.row, self.tokens, *listed(mixture))
        return mixture
