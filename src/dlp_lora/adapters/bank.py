"""The adapter bank: N LoRA adapters stacked per target module, checked against one base model.

For every module that at least one adapter targets, the bank keeps
  A:  (N, r_max, d_in)   lora_A of each adapter, zero-padded to the largest rank (zero rows add nothing)
  Bt: (N, r_max, d_out)  lora_B transposed, with its scale alpha/r folded in, padded the same way
Adapters that do not target a module have all-zero rows there, so every adapter has an entry everywhere
and the sum stays exact. The dense path reads the same rows without the padding:
  A_dense: (R, d_in), Bt_dense: (R, d_out), owner: (R,)  every adapter's real rank rows in bank order, R the
  sum of ranks, and the adapter each row belongs to (padding to r_max would multiply the dense path's work
  by N*r_max / R: 3.7x on the bundled bank, whose rank-64 generalist sits beside rank-8 specialists).
The base model's weights are only read for their shapes, device and dtype: the bank never copies them.
Stacks live on the base weight's device; over a half-precision base they are kept in float32 (as peft
keeps adapter weights by default), so the LoRA math runs in float32 and only its sum is rounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dlp_lora.adapters.io import LoraAdapter, read_peft_adapter
from dlp_lora.quantize import is_quantized_linear, linear_features

__all__ = ["ModuleStack", "AdapterBank", "stack_dtype"]


class ModuleStack(nn.Module):
    """Stacked LoRA weights of all N adapters for one target module (shapes in the module docstring).

    A module holding non-persistent buffers: the fused layer that uses it owns it as a child, so the
    stacks follow `model.to(device / dtype)` in place (the bank sees the moved tensors too) and never
    enter `state_dict` (a fused model saves and loads as the plain base model).
    """

    A: torch.Tensor
    Bt: torch.Tensor
    A_dense: torch.Tensor
    Bt_dense: torch.Tensor
    owner: torch.Tensor

    def __init__(self, A: torch.Tensor, Bt: torch.Tensor, ranks: list[int]) -> None:
        super().__init__()
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("Bt", Bt, persistent=False)
        rows = [(i, j) for i, r in enumerate(ranks) for j in range(r)] or [(0, 0)]  # one zero row when none
        self.owners = [i for i, _ in rows]  # `owner` on the host: what a routing selects is chosen there
        owner, slot = (torch.tensor(c, dtype=torch.long, device=A.device) for c in zip(*rows))
        self.register_buffer("A_dense", A[owner, slot], persistent=False)
        self.register_buffer("Bt_dense", Bt[owner, slot], persistent=False)
        self.register_buffer("owner", owner, persistent=False)

    @property
    def rank(self) -> int:
        """r_max: rank slots per adapter."""
        return self.A.shape[1]


def _expected_shapes(base: nn.Module, adapter: LoraAdapter, module: str, w) -> None:
    try:
        layer = base.get_submodule(module)
    except AttributeError:
        raise ValueError(
            f"adapter {adapter.name!r}: module {module!r} does not exist in the base model ({type(base).__name__})"
        ) from None
    features = linear_features(layer)
    if features is None:
        raise ValueError(f"adapter {adapter.name!r}: module {module!r} is a {type(layer).__name__}, expected nn.Linear")
    want_a, want_b = (w.rank, features[0]), (features[1], w.rank)
    if tuple(w.A.shape) != want_a or tuple(w.B.shape) != want_b:
        raise ValueError(
            f"adapter {adapter.name!r}, module {module!r}: expected lora_A {want_a} and lora_B {want_b}, "
            f"found {tuple(w.A.shape)} and {tuple(w.B.shape)}"
        )


def stack_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the stacks over a base of `base_dtype`: float32 for half precision, else the base dtype."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def _stack(module: str, adapters: list[LoraAdapter], layer: nn.Linear) -> ModuleStack:
    ranks = [a.modules[module].rank if module in a.modules else 0 for a in adapters]
    n, r_max = len(adapters), max(1, *ranks)  # one zero slot when no adapter is left on the module
    # An int8 layer (dlp_lora.quantize) computes in float32 on the CPU and has no float weight.
    quantized = is_quantized_linear(layer)
    dtype = torch.float32 if quantized else stack_dtype(layer.weight.dtype)
    # Built on the host, moved once: per-adapter slice writes on an accelerator would be one copy each.
    A = torch.zeros(n, r_max, layer.in_features, dtype=dtype, device="cpu")
    Bt = torch.zeros(n, r_max, layer.out_features, dtype=dtype, device="cpu")
    for i, a in enumerate(adapters):
        w = a.modules.get(module)
        if w is not None:
            A[i, : w.rank] = w.A.to(dtype)
            # Scale in float32 first so fp16 adapters lose nothing before the cast to the stack dtype.
            Bt[i, : w.rank] = (w.B.float() * w.scale).T.to(dtype)
    device = layer.weight_t.device if quantized else layer.weight.device
    return ModuleStack(A=A.to(device), Bt=Bt.to(device), ranks=ranks)


class AdapterBank:
    """N adapters over one base model, in a fixed order (index i <-> names[i])."""

    def __init__(self, base: nn.Module, adapters: Mapping[str, str | Path | LoraAdapter]) -> None:
        # `add`/`remove` change the set later (runtime adapters); they rebuild the stacks the same way.
        if not adapters:
            raise ValueError("expected at least one adapter, got none")
        loaded = [a if isinstance(a, LoraAdapter) else read_peft_adapter(a, name) for name, a in adapters.items()]
        for a in loaded:
            for module, w in a.modules.items():
                _expected_shapes(base, a, module, w)
        self.names: list[str] = list(adapters)
        self.adapters = loaded
        self.modules: dict[str, ModuleStack] = {}
        for module in sorted({m for a in loaded for m in a.modules}):
            self.modules[module] = _stack(module, loaded, base.get_submodule(module))

    def __len__(self) -> int:
        return len(self.names)

    def add(self, base: nn.Module, name: str, adapter: str | Path | LoraAdapter) -> None:
        """Append one adapter at index len(self), checked as at load time; on any error the bank is untouched."""
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        loaded = adapter if isinstance(adapter, LoraAdapter) else read_peft_adapter(adapter, name)
        for module, w in loaded.modules.items():
            _expected_shapes(base, loaded, module, w)
        self._restack(base, self.names + [name], self.adapters + [loaded])

    def remove(self, base: nn.Module, name: str) -> None:
        """Drop one adapter; later adapters move down one index. Modules keep their (now zero) stacks."""
        i = self.index(name)
        if len(self) == 1:
            raise ValueError(f"cannot remove {name!r}: it is the only adapter")
        self._restack(
            base,
            self.names[:i] + self.names[i + 1 :],
            self.adapters[:i] + self.adapters[i + 1 :],
            keep=set(self.modules),
        )

    def _restack(
        self, base: nn.Module, names: list[str], adapters: list[LoraAdapter], keep: set[str] = frozenset()
    ) -> None:
        modules = {}
        for module in sorted({m for a in adapters for m in a.modules} | set(keep)):
            modules[module] = _stack(module, adapters, base.get_submodule(module))
        self.names, self.adapters, self.modules = names, adapters, modules

    def index(self, name: str) -> int:
        """Bank index of an adapter name (ValueError listing the known names)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"unknown adapter {name!r}; known adapters: {self.names}") from None

    @property
    def ranks(self) -> list[int]:
        """(N,) each adapter's rank: its largest over the modules it adapts."""
        return [max((w.rank for w in a.modules.values()), default=0) for a in self.adapters]

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.modules.values() for t in (s.A, s.Bt))
