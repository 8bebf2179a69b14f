"""DeviceCheck: fail on any tensor an op reads or makes away from the model's device (tests only)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Explicit moves: their input is on the other device by design (a routing or prompt moved once).
_MOVES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class DeviceCheck(TorchDispatchMode):
    """Within the block every aten op must read and write tensors on `device` only (0-dim host scalars
    aside, which torch moves itself). With `torch.set_default_device("meta")` around a CPU model, a
    tensor made without `device=` lands on meta and is reported here by the op that made or used it."""

    def __init__(self, device: str | torch.device) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        checked = (out,) if func in _MOVES else (args, kwargs, out)
        for t in tree_leaves(checked):
            if (
                isinstance(t, torch.Tensor)
                and t.device != self.device
                and not (t.dim() == 0 and t.device.type == "cpu")
            ):
                raise AssertionError(f"{func}: a {tuple(t.shape)} tensor on {t.device}; the model is on {self.device}")
        return out


@contextmanager
def device_checked(device: str | torch.device = "cpu") -> Iterator[DeviceCheck]:
    """DeviceCheck around engine calls on a model on `device`, with the default device set to `meta`: a
    tensor the engine makes without `device=` lands on meta and the op that makes or uses it fails. Make the
    test's own inputs before entering (inside, a bare `torch.tensor(...)` is on meta too)."""
    with torch.device("meta"), DeviceCheck(device) as check:
        yield check
    assert check.ops > 0, "no op ran under the device check: it checked nothing"
