"""Evaluation methods: how each baseline turns router probabilities and the true task into weights.

Every method is a pure function (probs (B, N), truth (B,), selection, no_adapter) -> dense weights (B, N),
so all methods run on the same examples, through the same fused model, in one harness run. `no_adapter`:
the classes without an adapter; the router's methods select as serving does (`DLPLoRA.class_weights`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from dlp_lora.config import SelectionConfig
from dlp_lora.router import select_with

__all__ = ["ARROW", "ARROW_GKS", "DLP_ARROW", "METHODS", "check_method", "method_weights"]

ARROW = "arrow"
"""The method that routes with Arrow (per token, in the layers) instead of weights: the harness runs it under
`DLPLoRA.arrow_routing()` (a pipeline built with `arrow=ArrowConfig(...)`), without general adapters."""
ARROW_GKS = "arrow-gks"
"""Arrow with GenKnowSub: the same setting with its general adapters' mean subtracted from every expert
(`ArrowConfig.general`, `--arrow-general NAME`), so one run reports Arrow with and without it."""
DLP_ARROW = "dlp+arrow"
"""The trained router and Arrow combined: the router's mixture where it picks an adapter; where it leaves a
prompt of a pool class to the base model (a class the gate gave no adapter), Arrow (without general
adapters); a prompt whose top class is `none` (out of the pool) stays with the base model."""

MethodFn = Callable[[torch.Tensor, torch.Tensor, SelectionConfig, Sequence[int]], torch.Tensor]


def _selected(**overrides) -> MethodFn:
    def fn(probs: torch.Tensor, truth: torch.Tensor, sel: SelectionConfig, no_adapter: Sequence[int]) -> torch.Tensor:
        return select_with(probs, replace(sel, **overrides), no_adapter).to_dense(probs.shape[1])

    return fn


METHODS: dict[str, tuple[str, MethodFn]] = {
    "base": ("no adapter", lambda probs, truth, sel, no_adapter: torch.zeros_like(probs)),
    "oracle": (
        "the true task's adapter alone (the paper's single LoRA)",
        lambda probs, truth, sel, no_adapter: torch.nn.functional.one_hot(truth, probs.shape[1]).to(probs.dtype),
    ),
    "dlp": ("router + top-p, renormalised weights (ours)", _selected(strategy="top_p", weighting="renorm")),
    "dlp-paper": (
        "router + top-p, softmax of kept probabilities (the paper's code)",
        _selected(strategy="top_p", weighting="softmax"),
    ),
    "top1": ("the router's best adapter alone", _selected(strategy="top_k", k=1, max_k=None)),
    "topk2": (
        "the router's two best adapters, renormalised",
        _selected(strategy="top_k", k=2, max_k=None, weighting="renorm"),
    ),
    "uniform": (
        "every adapter fused with equal weights (static)",
        lambda probs, truth, sel, no_adapter: torch.full_like(probs, 1.0 / probs.shape[1]),
    ),
}


def check_method(method: str, selection: SelectionConfig) -> tuple[MethodFn, SelectionConfig]:
    """The function of `method` and the selection it runs with; `dlp@P` is `dlp` at top-p mass P.

    ValueError naming the known methods for an unknown one.
    """
    name, _, p = method.partition("@")
    if name not in METHODS or (p and name != "dlp"):
        raise ValueError(
            f"unknown method {method!r}; known methods: {list(METHODS)}, {ARROW!r}, {ARROW_GKS!r}, {DLP_ARROW!r} "
            "and dlp@P for a p sweep"
        )
    if p:
        try:
            selection = replace(selection, p=float(p))
        except ValueError as exc:
            raise ValueError(f"method {method!r}: expected dlp@P with P in (0, 1]") from exc
    return METHODS[name][1], selection


def method_weights(
    method: str, probs: torch.Tensor, truth: torch.Tensor, selection: SelectionConfig, no_adapter: Sequence[int] = ()
) -> torch.Tensor:
    """(B, N) weights for `method` (see `check_method`); no_adapter: class indices without an adapter."""
    fn, selection = check_method(method, selection)
    return fn(probs, truth, selection, no_adapter)
