"""FusedLoRALinear: a frozen linear layer plus the routed sum of N LoRA deltas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dlp_lora.adapters.bank import ModuleStack
from dlp_lora.fusion import ops
from dlp_lora.quantize import is_quantized_linear
from dlp_lora.types import ArrowRouting, Routing

__all__ = ["Path", "PinnedPath", "ActiveRouting", "RoutingSlot", "FusedLoRALinear"]

Path = Literal["base", "gathered", "dense", "merged", "arrow"]
PinnedPath = Literal["dense", "gathered"]
"""Paths a routing may be held to whatever its weights (`FusedLoRAModel.routed(..., path=)`)."""


@dataclass
class ActiveRouting:
    """One request's routing, fixed for all its forward passes (prefill and every decode step).

    routing: the (B, k) indices/weights on the caller's device. On the adapter stacks' device: dense (B, N)
    weights, indices and weights (B, k) (routing's, moved once), and mix (N,) when all rows share one
    mixture. `prepared` caches what each layer derives from it (gathered stacks, a merged weight or a
    merged low-rank pair) so the work is done once per request, not once per token.
    """

    path: Path
    dense: torch.Tensor
    routing: Routing
    indices: torch.Tensor
    weights: torch.Tensor
    mix: torch.Tensor | None = None
    prepared: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    arrow: ArrowRouting | None = None
    """Path `arrow`: per-token routing computed in each layer; `prepared` then holds every expert-bearing
    layer's (prototypes (E, d_in), A (E, r, d_in), Bt (E, r, d_out)), made by `FusedLoRAModel`."""
    pinned: bool = False
    """Held to its path's full shapes (a compiled forward): every row and, on `dense`, every adapter's rank
    rows enter the delta. Unpinned, the delta is computed for `rows` only, and `dense` reads only the rank
    rows of the adapters some row uses: the same sum without its zero terms."""
    rows: torch.Tensor | None = None
    """(B',) the rows with any weight, when some row has none and the path is unpinned (None: every row).
    A server's batch mixes routed rows with rows the base model serves; those skip the delta."""
    used: tuple[bool, ...] = ()
    """(N,) whether some row uses adapter i (unpinned dense and gathered; read on the host)."""


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
        # A child module of non-persistent buffers (shared with the bank): it moves with model.to() and
        # stays out of state_dict.
        self.stack = stack
        self.slot = slot
        self._quantized = is_quantized_linear(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d_in) -> (B, T, d_out).

        The LoRA branch runs in `compute` = at least float32 (as peft's does over a half-precision base):
        the base output is added to it in that dtype and the sum is rounded once to x's dtype.
        """
        active = self.slot.active
        if active is None or active.path == "base":
            return self.base(x)
        if active.path == "arrow":
            return self._arrow(x, active)
        prepared = self.prepare(active)
        if active.path == "merged" and len(prepared) == 1:
            return F.linear(x, prepared[0], self.base.bias)
        if active.path != "merged" and x.shape[0] != active.dense.shape[0]:
            raise ValueError(
                f"routing was set for a batch of {active.dense.shape[0]} rows, but layer {self.name} got "
                f"{x.shape[0]} rows (beam search and num_return_sequences > 1 are not supported)"
            )
        y = self.base(x).to(self._compute_dtype(x))
        xc = x.to(y.dtype) if active.rows is None else x[active.rows].to(y.dtype)
        if active.path == "merged":  # half precision: the shared mixture as one low-rank pair, unmerged
            A_mix, Bt_mix = prepared
            delta = torch.matmul(torch.matmul(xc, A_mix.T), Bt_mix)
        elif active.path == "dense":
            delta = ops.lora_delta_dense(xc, *prepared)
        else:
            A_sel, Bt_sel = prepared
            delta = ops.lora_delta_gathered(xc, A_sel, Bt_sel)
        out = y + delta if active.rows is None else y.index_add(0, active.rows, delta)
        return out.to(x.dtype)

    def _arrow(self, x: torch.Tensor, active: ActiveRouting) -> torch.Tensor:
        """Arrow: each token's own mixture of the experts, from this layer's prototypes (any batch size)."""
        stacks = active.prepared.get(self.name)
        if stacks is None:  # no expert adapts this layer
            return self.base(x)
        compute = self._compute_dtype(x)
        P, A, Bt = stacks
        delta = ops.lora_delta_arrow(x.to(compute), P, A, Bt, active.arrow.top_k, active.arrow.temperature)
        return (self.base(x).to(compute) + delta).to(x.dtype)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(torch.promote_types(x.dtype, self.stack.A.dtype), torch.float32)

    def prepare(self, active: ActiveRouting) -> tuple[torch.Tensor, ...]:
        """What this layer derives from a routing, once per routing: on the stacks' device, in the
        compute dtype (a merged weight is in the base weight's dtype)."""
        cached = active.prepared.get(self.name)
        if cached is None:
            A, Bt = self.stack.A, self.stack.Bt
            # An int8 base (dlp_lora.quantize) takes and returns float32 and has no float weight.
            compute = self._compute_dtype(A if self._quantized else self.base.weight)
            if active.path == "merged":  # every row shares row 0's adapters (k,) and weights (k,)
                factors = ops.merged_factors(A.to(compute), Bt.to(compute), active.indices[0], active.weights[0])
                if self._quantized or self.base.weight.dtype in (torch.float16, torch.bfloat16):
                    # Added into a half-precision copy of W, much of the delta would fall below W's
                    # resolution; an int8 W has no float copy to add to (a dequantized one would no longer
                    # be the int8 base, and would read fp32 bytes again). Either way the mixture is kept as
                    # one float32 rank-k*r pair, applied like the other paths.
                    cached = factors
                else:
                    cached = (ops.merge_into(self.base.weight, *factors),)
            elif active.path == "dense" and active.pinned:  # full width: the compiled graph's shapes
                stack = self.stack
                mask = ops.dense_mask(active.dense.to(compute), stack.owner)
                cached = (stack.A_dense.to(compute), stack.Bt_dense.to(compute), mask)
            elif active.path == "dense":  # only the rank rows of adapters some row uses, only the routed rows
                dense = active.dense if active.rows is None else active.dense[active.rows]
                keep = [j for j, i in enumerate(self.stack.owners) if active.used[i]]
                keep = torch.tensor(keep, dtype=torch.long, device=dense.device)
                cached = (
                    self.stack.A_dense[keep].to(compute),
                    self.stack.Bt_dense[keep].to(compute),
                    ops.dense_mask(dense.to(compute), self.stack.owner[keep]),
                )
            else:
                rows = slice(None) if active.rows is None else active.rows
                cached = ops.gather_stacks(A.to(compute), Bt.to(compute), active.indices[rows], active.weights[rows])
            active.prepared[self.name] = cached
        return cached

    def extra_repr(self) -> str:
        return f"name={self.name}, adapters={self.stack.A.shape[0]}, rank={self.stack.rank}"
