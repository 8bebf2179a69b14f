"""Read and write standard PEFT LoRA adapter directories.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys like
``base_model.model.<module path>.lora_A.weight`` (r, d_in) and ``...lora_B.weight`` (d_out, r).
Only plain LoRA on linear layers is accepted; anything we could not reproduce exactly is refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["LoraModuleWeights", "LoraAdapter", "read_peft_adapter", "write_peft_adapter"]

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraModuleWeights:
    """One adapted linear layer: delta(x) = scale * B (A x).

    A: (r, d_in); B: (d_out, r); scale: alpha / r (alpha / sqrt(r) with rsLoRA).
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter as read from disk: module path (relative to the base model) -> weights."""

    name: str
    path: str
    modules: dict[str, LoraModuleWeights]
    config: dict

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    # Same rule as peft's get_pattern_key: a key matches the end of the module path at a dot boundary.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(name: str, cfg: dict) -> None:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {name!r}: expected peft_type LORA, found {cfg.get('peft_type')!r}")
    if cfg.get("use_dora"):
        raise ValueError(f"adapter {name!r}: DoRA adapters are not supported (use_dora=true)")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"adapter {name!r}: expected bias 'none', found {cfg.get('bias')!r}")
    if cfg.get("fan_in_fan_out"):
        raise ValueError(f"adapter {name!r}: fan_in_fan_out=true (Conv1D layers) is not supported")


def read_peft_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Load a PEFT LoRA directory into CPU tensors (dtype as stored)."""
    path = Path(path)
    name = name or path.name
    cfg_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not path.is_dir():
        raise FileNotFoundError(f"adapter {name!r}: expected a PEFT adapter directory, found no directory at {path}")
    if not cfg_file.exists():
        raise FileNotFoundError(f"adapter {name!r}: expected {cfg_file} (a PEFT adapter directory)")
    if not weights_file.exists():
        if (path / "adapter_model.bin").exists():
            raise ValueError(
                f"adapter {name!r}: found adapter_model.bin; only safetensors is loaded (pickle files can run "
                "code). Convert it once with peft: PeftModel.from_pretrained(base, dir).save_pretrained(dir, "
                "safe_serialization=True)"
            )
        raise FileNotFoundError(f"adapter {name!r}: expected {weights_file}")
    cfg = json.loads(cfg_file.read_text())
    _check_config(name, cfg)
    return LoraAdapter(name=name, path=str(path), modules=_group(name, cfg, load_file(str(weights_file))), config=cfg)


def _group(name: str, cfg: dict, tensors: dict[str, torch.Tensor]) -> dict[str, LoraModuleWeights]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"adapter {name!r}: unexpected tensor {key!r} (only lora_A/lora_B of linear layers)")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    out = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {name!r}, module {module!r}: expected lora_A and lora_B, found {sorted(ab)}")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"adapter {name!r}, module {module!r}: expected lora_A (r, d_in) and lora_B (d_out, r), "
                f"found {tuple(A.shape)} and {tuple(B.shape)}"
            )
        r = _pattern_value(cfg.get("rank_pattern") or {}, module, r0)
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0)
        if A.shape[0] != r:
            raise ValueError(f"adapter {name!r}, module {module!r}: config says r={r}, lora_A has {A.shape[0]} rows")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[module] = LoraModuleWeights(A=A, B=B, scale=float(scale))
    if not out:
        raise ValueError(f"adapter {name!r}: no LoRA tensors found")
    return out


def write_peft_adapter(
    out_dir: str | Path,
    modules: dict[str, LoraModuleWeights],
    base_model_name: str,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write a standard PEFT LoRA directory that peft, vLLM and LoRAX can load.

    Ranks may differ per module (written as ``rank_pattern``); each module's scale is folded into B so
    that ``lora_alpha == r`` (scale 1) everywhere, which keeps the file exact for any mixture.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    ranks = {m: w.rank for m, w in modules.items()}
    for module, w in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = w.A.to(dtype).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = (w.B.float() * w.scale).to(dtype).contiguous()
    r = max(ranks.values())
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: k for m, k in ranks.items() if k != r},
        "target_modules": suffixes,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    return out_dir
