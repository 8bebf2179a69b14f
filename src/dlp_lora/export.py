"""Export a fixed adapter mixture from an assets folder as one standard PEFT LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from dlp_lora.adapters.io import read_peft_adapter, write_peft_adapter
from dlp_lora.adapters.mix import mix_adapters
from dlp_lora.assets import Manifest

__all__ = ["export_mixture"]


def export_mixture(assets: str | Path, mix: Mapping[str, float], out_dir: str | Path,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Write sum_name mix[name] * adapter_name as a PEFT directory at out_dir (ranks stacked, exact).

    fp32 by default so the export matches the fused model to float tolerance; fp16 halves the size.
    """
    manifest = Manifest.load(assets)
    manifest.check(assets)
    paths = manifest.adapter_paths(assets)
    unknown = [n for n in mix if n not in paths]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the assets hold: {manifest.deployed}")
    gated = [n for n in mix if paths[n] is None]
    if gated:  # the dev gate kept the base model for these tasks: they add nothing to a mixture
        raise ValueError(f"task(s) {gated} have no deployed adapter (the dev gate kept the base model); "
                         f"leave them out of the mixture. Deployed adapters: {manifest.deployed}")
    adapters = {n: read_peft_adapter(paths[n], n) for n in mix}
    base = manifest.base_model
    return write_peft_adapter(out_dir, mix_adapters(adapters, mix), base, dtype=dtype)
