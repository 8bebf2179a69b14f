"""FusedLoRAModel: swap a base model's targeted linears for fused layers, route them, swap them back."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path as FsPath
from typing import get_args

import torch
from torch import nn

from dlp_lora.adapters.bank import AdapterBank
from dlp_lora.adapters.io import LoraAdapter
from dlp_lora.config import FusionConfig
from dlp_lora.fusion import ops
from dlp_lora.fusion.layer import ActiveRouting, FusedLoRALinear, Path, PinnedPath, RoutingSlot
from dlp_lora.types import ArrowRouting, Routing

__all__ = ["FusedLoRAModel", "choose_path"]


def choose_path(dense: torch.Tensor, ranks: Sequence[int], cfg: FusionConfig) -> Path:
    """Execution path for a (B, N) weight matrix over adapters of these ranks (N,): base if all zero, merged
    if all rows equal, else `dense` while the rank rows it reads (those of the adapters some row uses) are
    at most `cfg.dense_max_rank` or at most what `gathered` reads per row (k of the bank's padded rank), as
    one plain matmul beats a batch of k*r-wide ones; `gathered` beyond."""
    uniform = bool((dense == dense[0]).all())
    if cfg.path == "merged" and not uniform:
        raise ValueError("path='merged' needs every row to share one mixture; got rows with different weights")
    if not bool(dense.any()):
        return "base"
    if cfg.path != "auto":
        return cfg.path
    if uniform:
        return "merged"
    used = sum(r for r, on in zip(ranks, dense.any(0).tolist()) if on)
    k = int((dense != 0).sum(1).max())
    return "dense" if used <= max(cfg.dense_max_rank, k * max(ranks)) else "gathered"


class _Unfused(nn.Module):
    """The base model as the adapter bank must see it: wrapped modules resolve to the original linears."""

    def __init__(self, model: nn.Module, originals: dict[str, nn.Linear]) -> None:
        super().__init__()
        object.__setattr__(self, "_model", model)  # not registered as a submodule: a view, not an owner
        object.__setattr__(self, "_originals", originals)

    def get_submodule(self, target: str) -> nn.Module:
        return self._originals.get(target) or self._model.get_submodule(target)

    def parameters(self, recurse: bool = True):
        return self._model.parameters(recurse)


class FusedLoRAModel:
    """N LoRA adapters served from one base model, each batch row with its own weighted mixture.

    The base model is modified in place (its targeted nn.Linear modules are wrapped, never copied) and
    restored bit for bit by `remove()`. Use `with fused.routed(weights): model(...)` to run.
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: Mapping[str, str | FsPath | LoraAdapter],
        config: FusionConfig | None = None,
    ) -> None:
        if any(isinstance(m, FusedLoRALinear) for m in model.modules()):
            raise ValueError("this model is already fused; call remove() on the other FusedLoRAModel first")
        self.model = model
        self.config = config or FusionConfig()
        self.bank = AdapterBank(model, adapters)
        self._names = list(self.bank.names)
        self._slot = RoutingSlot()
        # One routing at a time per model: `routed` holds this lock for its whole block, so threads sharing
        # the model (e.g. two callers of DLPLoRA.generate) run one after the other instead of swapping
        # each other's routings. _owner is the holding thread, to refuse nesting instead of deadlocking.
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._originals: dict[str, nn.Linear] = {}
        self._layers: list[FusedLoRALinear] = []
        self._arrow_stacks: dict[ArrowRouting, dict[str, tuple[torch.Tensor, ...]]] = {}
        self._sync_layers()

    def _sync_layers(self) -> None:
        """Point every fused layer at the bank's current stack; wrap modules the bank newly targets."""
        for name, stack in self.bank.modules.items():
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            if name in self._originals:
                getattr(parent, child).stack = stack
                continue
            original = getattr(parent, child)
            setattr(parent, child, FusedLoRALinear(original, stack, self._slot, name))
            self._originals[name] = original
        self._layers = [m for m in self.model.modules() if isinstance(m, FusedLoRALinear)]
        self._names = list(self.bank.names)
        self._arrow_stacks = {}  # the bank changed: Arrow's prototypes are made again

    def add_adapter(self, name: str, adapter: str | FsPath | LoraAdapter) -> None:
        """Serve one more adapter (index len(adapter_names)), checked as at load time: a bad directory,
        a pickle file or wrong shapes raise and leave the bank as it was. Not inside `routed`."""
        self._idle("add an adapter")
        self.bank.add(_Unfused(self.model, self._originals), name, adapter)
        self._sync_layers()

    def remove_adapter(self, name: str) -> None:
        """Stop serving an adapter; later adapters move down one index. Not inside `routed`."""
        self._idle("remove an adapter")
        self.bank.remove(_Unfused(self.model, self._originals), name)
        self._sync_layers()

    def _idle(self, what: str) -> None:
        if self.bank is None:
            raise RuntimeError("this FusedLoRAModel was removed; build a new one")
        if self._slot.active is not None:
            raise RuntimeError(f"cannot {what} inside a `routed` block (routing weights index the bank)")

    @property
    def adapter_names(self) -> list[str]:
        """Adapter names in bank order: column i of the routing weights is adapter_names[i]."""
        return list(self._names)

    @property
    def active_path(self) -> Path | None:
        """The path chosen for the current routing, or None outside `routed`."""
        return None if self._slot.active is None else self._slot.active.path

    def _dense(self, weights: torch.Tensor | Routing) -> torch.Tensor:
        n = len(self.bank)
        if isinstance(weights, Routing):
            return weights.to_dense(n)
        if not isinstance(weights, torch.Tensor) or not torch.is_floating_point(weights):
            raise TypeError(
                f"routing weights must be a float tensor (B, {n}) or a Routing, got {type(weights).__name__}"
                + (f" of {weights.dtype}" if isinstance(weights, torch.Tensor) else "")
            )
        if weights.dim() != 2 or weights.shape[1] != n or weights.shape[0] == 0:
            raise ValueError(f"routing weights must have shape (B, {n}) with B >= 1, got {tuple(weights.shape)}")
        if not torch.isfinite(weights).all():
            raise ValueError("routing weights must be finite, got NaN or inf")
        if (weights < 0).any():
            raise ValueError(f"routing weights must be >= 0, got a minimum of {weights.min().item():.4g}")
        return weights.detach().float()

    @contextmanager
    def routed(
        self, weights: torch.Tensor | Routing | ArrowRouting, path: PinnedPath | None = None
    ) -> Iterator[ActiveRouting]:
        """Within the block, row b of every batch uses sum_i weights[b, i] * adapter_i.

        weights: (B, N) float >= 0 (rows need not sum to one; a zero row is the base model) or a Routing;
        or an `ArrowRouting`: every token of every row picks its own experts in every layer (any batch).
        The mixture is fixed for every forward pass inside the block: prefill and all decode steps.
        path: run this path whatever the weights (`dense`: (B, N*r) masks, the same shapes for every
        mixture, all-zero rows included; `gathered`: k at least 2), its per-layer tensors made at once: what
        a compiled forward needs, so that a new mixture changes tensor values and not the graph
        (`dlp_lora.slots`).
        Thread-safe: a second thread entering `routed` waits until the first one's block has ended.
        """
        if self.bank is None:
            raise RuntimeError("this FusedLoRAModel was removed; build a new one")
        if self._owner == threading.get_ident():
            raise RuntimeError("routing is already set; nested `routed` blocks are not supported")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                if self.bank is None:  # removed while this thread waited for the lock
                    raise RuntimeError("this FusedLoRAModel was removed; build a new one")
                yield self._activate(weights, path)
            finally:
                self._slot.active = None
                self._owner = None

    def reroute(self, weights: torch.Tensor | Routing | ArrowRouting, path: PinnedPath | None = None) -> ActiveRouting:
        """Inside `routed`: every forward pass from now on uses these weights (B', N); B' may differ from
        the block's B (rows joined or left the running batch).

        What was computed before (the KV cache of earlier tokens) stays as it was computed: a row that
        switches at step t equals a run of its first t steps under the old mixture and the rest under the
        new one. The path is chosen anew; on the merged path a new mixture re-merges.
        """
        if self._slot.active is None or self._owner != threading.get_ident():
            raise RuntimeError(
                "reroute needs an active routing: call it inside a `with fused.routed(...)` block "
                "(in the thread that opened it)"
            )
        return self._activate(weights, path)

    @property
    def device(self) -> torch.device:
        """Where the adapter stacks are now (they follow `model.to()`); routings are moved there."""
        return next(iter(self.bank.modules.values())).A.device

    def _activate(
        self, weights: torch.Tensor | Routing | ArrowRouting, pinned: PinnedPath | None = None
    ) -> ActiveRouting:
        if isinstance(weights, ArrowRouting):
            if pinned is not None:
                raise ValueError("Arrow routing picks per token; it takes no pinned path")
            return self._activate_arrow(weights)
        if pinned is not None and pinned not in get_args(PinnedPath):
            raise ValueError(f"a pinned path must be one of {list(get_args(PinnedPath))}, got {pinned!r}")
        given = self._dense(weights)
        path = pinned or choose_path(given, self.bank.ranks, self.config)
        # The choices that read values (path, k) are made on the caller's tensors; what the layers read
        # moves to the stacks' device here, once per routing: nothing crosses devices in a forward pass.
        # A pinned gathered path keeps k at least 2 (a mixture of two: the router's usual most), so a base row
        # and a one- or two-adapter mixture share a compiled graph's shapes.
        routing, device = Routing.from_dense(given, min_k=2 if pinned == "gathered" else 1), self.device
        dense = given.to(device)
        active = ActiveRouting(
            path=path,
            dense=dense,
            routing=routing,
            indices=routing.indices.to(device),
            weights=routing.weights.to(device),
            mix=dense[0] if path == "merged" else None,
            pinned=pinned is not None,
        )
        if pinned is None and path in ("dense", "gathered"):
            routed, active.used = given.any(1), tuple(given.any(0).tolist())
            if not bool(routed.all()):
                active.rows = routed.nonzero()[:, 0].to(device)
        self._slot.active = active
        if pinned is not None:
            for layer in self._layers:
                layer.prepare(active)
        return active

    def _activate_arrow(self, arrow: ArrowRouting) -> ActiveRouting:
        n = len(self.bank)
        bad = [i for i in (*arrow.experts, *arrow.general) if not 0 <= i < n]
        if bad:
            raise ValueError(f"Arrow adapter indices {bad} are out of range for {n} adapters")
        if arrow not in self._arrow_stacks:  # prototypes are made once per setting (the bank is fixed here)
            self._arrow_stacks[arrow] = arrow_stacks(self.bank, arrow, self.device)
        empty = torch.zeros(0, n, device=self.device)
        routing = Routing.from_dense(empty)
        active = ActiveRouting(path="arrow", dense=empty, routing=routing, indices=routing.indices,
                               weights=routing.weights, prepared=self._arrow_stacks[arrow], arrow=arrow)  # fmt: skip
        self._slot.active = active
        return active

    def remove(self) -> nn.Module:
        """Put the original linear modules back; the model is then the plain base model again."""
        for name, original in self._originals.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, original)
        self._originals.clear()
        self.bank = None  # type: ignore[assignment]
        return self.model


def arrow_stacks(bank: AdapterBank, arrow: ArrowRouting, device: torch.device) -> dict[str, tuple[torch.Tensor, ...]]:
    """module -> (prototypes (E, d_in), A (E, r, d_in), Bt (E, r, d_out), scale folded) for Arrow, from the
    experts' own weights (GenKnowSub applied first: the general adapters' mean A and mean B subtracted from
    each expert's, as PEFT does). Every expert must adapt the same modules; GenKnowSub needs equal ranks."""
    names = [bank.names[i] for i in arrow.experts]
    out = {}
    for module in bank.modules:
        experts = [bank.adapters[i].modules.get(module) for i in arrow.experts]
        if all(w is None for w in experts):
            continue
        if any(w is None for w in experts):
            missing = [n for n, w in zip(names, experts) if w is None]
            raise ValueError(f"Arrow needs every expert on the same modules: {missing} do not adapt {module}")
        As, Bs = [w.A.float() for w in experts], [w.B.float() for w in experts]
        if arrow.general:
            general = [bank.adapters[i].modules.get(module) for i in arrow.general]
            ranks = {w.rank for w in experts} | {w.rank for w in general if w is not None}
            if any(w is None for w in general) or len(ranks) != 1:
                raise ValueError(f"GenKnowSub subtracts the general adapters' mean A and B: every general adapter "
                                 f"must adapt {module} at the experts' rank; found ranks {sorted(ranks)}")  # fmt: skip
            A_bar = torch.stack([w.A.float() for w in general]).mean(0)
            B_bar = torch.stack([w.B.float() for w in general]).mean(0)
            As, Bs = [a - A_bar for a in As], [b - B_bar for b in Bs]
        r = max(a.shape[0] for a in As)
        A = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, r - a.shape[0])) for a in As])  # (E, r, d_in)
        B = torch.stack([torch.nn.functional.pad(b, (0, r - b.shape[1])) for b in Bs])  # (E, d_out, r)
        # The scale folded in float64, then rounded once to the bank's dtype (PEFT scales in the model's dtype).
        scales = torch.tensor([w.scale for w in experts], dtype=torch.float64)
        P = ops.arrow_prototypes(A, B, arrow.seed, arrow.iters)
        dtype = bank.modules[module].A.dtype
        Bt = (B.double() * scales[:, None, None]).transpose(1, 2)
        out[module] = (P.to(device, dtype), A.to(device, dtype), Bt.contiguous().to(device, dtype))
    return out
