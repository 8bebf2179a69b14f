"""FusedLoRALinear: a frozen linear layer plus the routed sum of N LoRA deltas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dlp_lora.adapters.bank import ModuleStack
from dlp_lora.fusion import ops
from dlp_lora.types import Routing

__all__ = ["Path", "ActiveRouting", "RoutingSlot", "FusedLoRALinear"]

Path = Literal["base", "gathered", "dense", "merged"]


@dataclass
class ActiveRouting:
    """One request's routing, fixed for all its forward passes (prefill and every decode step).

    dense: (B, N) weights; routing: the same as (B, k) indices/weights; mix: (N,) when all rows share one
    mixture. `prepared` caches what each layer derives from it (gathered stacks or a merged weight) so the
    work is done once per request, not once per token.
    """

    path: Path
    dense: torch.Tensor
    routing: Routing
    mix: torch.Tensor | None = None
    prepared: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)


@dataclass
class RoutingSlot:
    """Shared by the fused layers of one model; set and cleared only by `FusedLoRAModel.routed`."""

    active: ActiveRouting | None = None


class FusedLoRALinear(nn.Module):
    """y = base(x) + sum_i w[b, i] * scale_i * B_i A_i x, with w taken from the slot's active routing.

    Wraps (does not copy) the original nn.Linear, which `FusedLoRAModel.remove` puts back unchanged.
    With no active routing it is exactly the base layer.
    """

    def __init__(self, base: nn.Linear, stack: ModuleStack, slot: RoutingSlot, name: str) -> None:
        super().__init__()
        self.base = base
        self.name = name
        # Plain attributes, not buffers: the bank owns these tensors and they must not enter state_dict.
        self.stack = stack
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d_in) -> (B, T, d_out)."""
        active = self.slot.active
        if active is None or active.path == "base":
            return self.base(x)
        if active.path == "merged":
            (weight,) = self._prepare(active)
            return F.linear(x, weight, self.base.bias)
        if x.shape[0] != active.dense.shape[0]:
            raise ValueError(
                f"routing was set for a batch of {active.dense.shape[0]} rows, but layer {self.name} got "
                f"{x.shape[0]} rows (beam search and num_return_sequences > 1 are not supported)"
            )
        y = self.base(x)
        if active.path == "dense":
            (mask,) = self._prepare(active)
            return y + ops.lora_delta_dense(x, self.stack.A, self.stack.Bt, mask)
        A_sel, Bt_sel = self._prepare(active)
        return y + ops.lora_delta_gathered(x, A_sel, Bt_sel)

    def _prepare(self, active: ActiveRouting) -> tuple[torch.Tensor, ...]:
        cached = active.prepared.get(self.name)
        if cached is None:
            if active.path == "merged":
                assert active.mix is not None
                cached = (ops.merged_weight(self.base.weight, self.stack.A, self.stack.Bt, active.mix),)
            elif active.path == "dense":
                cached = (ops.dense_mask(active.dense, self.stack.rank),)
            else:
                cached = ops.gather_stacks(self.stack.A, self.stack.Bt, active.routing.indices, active.routing.weights)
            active.prepared[self.name] = cached
        return cached

    def extra_repr(self) -> str:
        return f"name={self.name}, adapters={self.stack.A.shape[0]}, rank={self.stack.rank}"
