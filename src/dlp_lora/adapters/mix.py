"""A weighted sum of LoRA adapters as one LoRA adapter (exact): ranks stacked, weights folded into B.

sum_i w_i * s_i * B_i A_i == [w_1 s_1 B_1 | ... | w_k s_k B_k] @ [A_1; ...; A_k]
so the mixture is itself a LoRA of rank sum(r_i) with scale 1, loadable by any engine that reads PEFT.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dlp_lora.adapters.io import LoraAdapter, LoraModuleWeights

__all__ = ["parse_mix", "mix_adapters"]


def parse_mix(spec: str) -> dict[str, float]:
    """'task_a=0.7,task_b=0.3' -> {'task_a': 0.7, 'task_b': 0.3} (ValueError naming the bad part)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name.strip() or not weight >= 0:
            raise ValueError(f"expected NAME=WEIGHT with WEIGHT >= 0 (e.g. 'task_a=0.7,task_b=0.3'), got {part!r}")
        if name.strip() in out:
            raise ValueError(f"adapter {name.strip()!r} appears twice in the mixture")
        out[name.strip()] = weight
    if not out or not any(out.values()):
        raise ValueError(f"expected at least one adapter with a positive weight, got {spec!r}")
    return out


def mix_adapters(adapters: Mapping[str, LoraAdapter], mix: Mapping[str, float]) -> dict[str, LoraModuleWeights]:
    """One LoRA per module equal to sum_name mix[name] * adapters[name] (zero-weight adapters dropped)."""
    unknown = [n for n in mix if n not in adapters]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; known adapters: {list(adapters)}")
    used = [(adapters[n], float(w)) for n, w in mix.items() if w > 0]
    out: dict[str, LoraModuleWeights] = {}
    for module in sorted({m for a, _ in used for m in a.modules}):
        terms = [(a.modules[module], w) for a, w in used if module in a.modules]
        A = torch.cat([t.A.float() for t, _ in terms], dim=0)
        B = torch.cat([t.B.float() * (w * t.scale) for t, w in terms], dim=1)
        out[module] = LoraModuleWeights(A=A, B=B, scale=1.0)
    return out
