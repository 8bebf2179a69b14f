"""Export a fixed adapter mixture from an assets folder as one standard PEFT LoRA adapter."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from dlp_lora.adapters.io import read_peft_adapter, write_peft_adapter
from dlp_lora.adapters.mix import mix_adapters
from dlp_lora.assets import Manifest

__all__ = ["export_mixture"]


def export_mixture(
    assets: str | Path, mix: Mapping[str, float], out_dir: str | Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Write sum_name mix[name] * adapter_name as a PEFT directory at out_dir (ranks stacked, exact).

    A name is an adapter of the assets (a task's or a baseline's) or a router class served by another
    mixture (`Manifest.serve`), which stands for that mixture.

    fp32 by default so the export matches the fused model to float tolerance; fp16 halves the size.
    """
    manifest = Manifest.load(assets)
    manifest.check(assets)
    paths = {
        **{t: p for t, p in manifest.adapter_paths(assets).items() if p is not None},
        **manifest.baseline_paths(assets),
    }
    expanded: dict[str, float] = {}
    for name, w in mix.items():
        # An adapter by its own name; a router class served by another mixture (the gate's choice) by its class.
        parts = {name: 1.0} if name in paths else manifest.served(name) if name in manifest.tasks else None
        if parts is None:
            raise ValueError(
                f"unknown adapter(s) {[name]}; the assets hold: {list(paths)} and the router's classes {manifest.tasks}"
            )
        if not parts:  # the gate kept the base model for this task: it adds nothing to a mixture
            raise ValueError(
                f"task(s) {[name]} have no deployed adapter (the dev gate kept the base model); "
                f"leave them out of the mixture. Deployed adapters: {list(paths)}"
            )
        for part, pw in parts.items():
            expanded[part] = expanded.get(part, 0.0) + w * pw
    adapters = {n: read_peft_adapter(paths[n], n) for n in expanded}
    base = manifest.base_model
    return write_peft_adapter(out_dir, mix_adapters(adapters, expanded), base, dtype=dtype)
