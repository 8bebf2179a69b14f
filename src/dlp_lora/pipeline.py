"""DLPLoRA: tokenize -> route -> select -> routed generation. The user-facing API.

The router and the fused model meet only here, through a `Routing` value: the router never sees the
base model and the fusion never sees a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dlp_lora.assets import Manifest
from dlp_lora.chat import chat_prompt, encode_prompts, left_pad
from dlp_lora.config import FusionConfig, GenerationConfig, SelectionConfig
from dlp_lora.fusion.inject import FusedLoRAModel
from dlp_lora.generation import GenerationOutput, StepCallback, generate_ids
from dlp_lora.models import load_base_model
from dlp_lora.router import Router, select_with
from dlp_lora.types import Routing

__all__ = ["DLPLoRA", "Result"]


@dataclass(frozen=True)
class Result:
    """One prompt's answer and the adapter mixture that produced it (heaviest first)."""

    text: str
    adapters: list[str]
    weights: list[float]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class DLPLoRA:
    """One base model, N task adapters and a router: each prompt gets its own adapter mixture."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        router: Router | None,
        adapters: Mapping[str, str | Path],
        selection: SelectionConfig | None = None,
        fusion: FusionConfig | None = None,
        max_prompt_tokens: int | None = None,
        baselines: Mapping[str, str | Path] | None = None,
    ) -> None:
        """adapters: the router's classes in its order; baselines: more adapters the router never picks
        (served only when named, e.g. the `multitask` baseline), placed after them in the bank."""
        if router is not None and list(router.task_names) != list(adapters):
            raise ValueError(f"router classes {list(router.task_names)} do not match adapters {list(adapters)} "
                             "(same names in the same order are required)")
        baselines = dict(baselines or {})
        clash = sorted(set(baselines) & set(adapters))
        if clash:
            raise ValueError(f"baseline adapters {clash} share names with routed adapters")
        self.model, self.tokenizer, self.router = model, tokenizer, router
        self.selection = selection or SelectionConfig()
        self.max_prompt_tokens = max_prompt_tokens
        self.baselines = list(baselines)
        self.fused = FusedLoRAModel(model, {**adapters, **baselines}, fusion)

    @classmethod
    def from_assets(
        cls, root: str | Path, base_model: str | None = None, selection: SelectionConfig | None = None,
        fusion: FusionConfig | None = None,
    ) -> "DLPLoRA":
        """Load base model, adapters and router of an assets folder; the embedded model by default.

        `base_model` overrides the manifest's base model (it must be the one the adapters were trained on).
        """
        manifest = Manifest.load(root)
        manifest.check(root)
        if manifest.router is None:
            raise ValueError(f"{root}: the manifest names no router; train one with `dlp-lora train-router`")
        router = Router.load(Path(root) / manifest.router, expected_tasks=manifest.tasks)
        model, tok = load_base_model(base_model or manifest.base_model)
        selection = selection or SelectionConfig(**manifest.selection)
        return cls(model, tok, router, manifest.adapter_paths(root), selection, fusion,
                   baselines=manifest.baseline_paths(root))

    @property
    def adapter_names(self) -> list[str]:
        """Every adapter in bank order: the router's classes first, then the baselines."""
        return self.fused.adapter_names

    @property
    def task_names(self) -> list[str]:
        """The routed adapters (the router's classes), without the baselines."""
        return self.adapter_names[: len(self.adapter_names) - len(self.baselines)]

    def route(self, prompts: Sequence[str]) -> Routing:
        """Router probabilities -> selected adapters and weights, (B, k)."""
        if self.router is None:
            raise ValueError("this pipeline has no router; pass an explicit routing")
        return select_with(self.router.predict_proba(list(prompts)), self.selection)

    def routing_for(self, mixtures: Sequence[Mapping[str, float]]) -> Routing:
        """Explicit routing by adapter name, one {name: weight} per prompt (weights used as given)."""
        dense = torch.zeros(len(mixtures), len(self.adapter_names))
        for b, mix in enumerate(mixtures):
            for name, w in mix.items():
                if not (isinstance(w, (int, float)) and 0 <= w <= 1e6):
                    raise ValueError(f"prompt {b}: weight of adapter {name!r} must be a number in [0, 1e6], got {w!r}")
                dense[b, self.fused.bank.index(name)] = float(w)
        return Routing.from_dense(dense)

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        config: GenerationConfig | None = None,
        routing: Routing | None = None,
        on_step: StepCallback | None = None,
    ) -> list[Result]:
        """Answer a batch of prompts, each with its routed mixture fixed for every generated token."""
        config = config or GenerationConfig(max_new_tokens=max_new_tokens)
        ids, mask = encode_prompts(self.tokenizer, list(prompts), self.max_prompt_tokens)
        routing = routing if routing is not None else self.route(prompts)
        if routing.batch_size != len(prompts):
            raise ValueError(f"routing has {routing.batch_size} rows for {len(prompts)} prompts")
        with self.fused.routed(routing):
            outs = generate_ids(self.model, self.tokenizer, ids, mask, config, on_step)
        return [self._result(o, routing, b) for b, o in enumerate(outs)]

    @torch.no_grad()
    def option_logprobs(self, prompts: Sequence[str], options: Sequence[Sequence[str]], routing: Routing,
                        batch_size: int = 16) -> list[list[float]]:
        """Summed log-probability of each option's tokens after its prompt, under each prompt's routing.

        As lm-evaluation-harness scores multiple choice: an option is the continuation of the chat prompt
        (the assistant's answer), tokenised as in training. When every option is one token (letters),
        one forward pass per prompt gives them all; otherwise each (prompt, option) is its own row.
        Returns lists shaped like `options`.
        """
        ctx = [self.tokenizer(chat_prompt(self.tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
        conts = [[self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in opts] for opts in options]
        dense = routing.to_dense(len(self.adapter_names))
        if all(len(c) == 1 for cs in conts for c in cs):
            last = self._row_logprobs(ctx, dense, batch_size, keep_last=1)
            return [[float(lp[0, c[0]]) for c in cs] for lp, cs in zip(last, conts)]
        rows, owners, opts = [], [], []
        for b, cs in enumerate(conts):
            for c in cs:
                rows.append(ctx[b] + c)
                owners.append(b)
                opts.append(c)
        logps = self._row_logprobs(rows, dense[owners], batch_size, keep_last=max(map(len, opts)) + 1)
        # lp holds the row's last positions; the n option tokens are predicted by lp[-n-1], ..., lp[-2].
        scores = [float(sum(lp[j - len(c) - 1, t] for j, t in enumerate(c))) for lp, c in zip(logps, opts)]
        out, k = [], 0
        for cs in conts:
            out.append(scores[k: k + len(cs)])
            k += len(cs)
        return out

    def _row_logprobs(self, rows: list[list[int]], dense: torch.Tensor, batch_size: int,
                      keep_last: int) -> list[torch.Tensor]:
        """Log-softmax over the vocabulary at each row's last `keep_last` positions: list of (keep_last, V)."""
        out = []
        for i in range(0, len(rows), batch_size):
            ids, mask = left_pad(rows[i: i + batch_size], self.tokenizer.pad_token_id or 0)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens only
            with self.fused.routed(dense[i: i + batch_size]):
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                    logits_to_keep=keep_last).logits
            out += list(torch.log_softmax(logits.float(), -1))
        return out

    def _result(self, out: GenerationOutput, routing: Routing, b: int) -> Result:
        pairs = routing.row(b)
        return Result(text=out.text, adapters=[self.adapter_names[i] for i, _ in pairs],
                      weights=[round(w, 6) for _, w in pairs], finish_reason=out.finish_reason,
                      prompt_tokens=out.prompt_tokens, completion_tokens=len(out.token_ids))

    def close(self) -> None:
        """Unfuse: the base model is the plain model again."""
        self.fused.remove()
