"""dlp-lora: one small language model, many task LoRA adapters, a router that mixes them per prompt.

The exports are resolved lazily (PEP 562): importing ``dlp_lora`` (or ``dlp_lora.cli`` for
``dlp-lora --help``) must not pull in torch and transformers, which take seconds to import. Each name
below is imported from its module the first time it is used, then cached in the package namespace.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # static tools see the real names; nothing here runs at import time
    from dlp_lora.config import RoutingConfig
    from dlp_lora.fusion.inject import FusedLoRAModel
    from dlp_lora.models import load_base_model
    from dlp_lora.pipeline import DLPLoRA, Result
    from dlp_lora.router import Router, select
    from dlp_lora.types import Routing

# Exported name -> module that defines it (read only; the cache is the module's own namespace).
_EXPORTS = {
    "DLPLoRA": "dlp_lora.pipeline",
    "FusedLoRAModel": "dlp_lora.fusion.inject",
    "Result": "dlp_lora.pipeline",
    "Router": "dlp_lora.router",
    "Routing": "dlp_lora.types",
    "RoutingConfig": "dlp_lora.config",
    "load_base_model": "dlp_lora.models",
    "select": "dlp_lora.router",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dlp_lora' has no attribute {name!r}; it exports {__all__}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
