"""Typed settings for every user-facing knob, validated on construction, by layer:

- `runtime`: a running model (device, fusion path, decoding, adapter selection, routing, router shape);
- `training`: data splits, adapter recipes, router data and training;
- `serving`: the HTTP server and its Ray Serve scale-out;
- `measurement`: the fusion benchmark and the evaluation.

One dataclass per concern; CLI flags, config files and HTTP defaults are built from the same classes.
Every name is importable from `dlp_lora.config` itself.
"""

from dlp_lora.config.measurement import BenchConfig, EvalConfig
from dlp_lora.config.runtime import (
    GREEDY_BELOW,
    ArrowConfig,
    DeviceConfig,
    FusionConfig,
    GenerationConfig,
    Granularity,
    Quantization,
    RouterConfig,
    RoutingConfig,
    SelectionConfig,
)
from dlp_lora.config.serving import RayServeConfig, ServerConfig
from dlp_lora.config.training import AdapterTrainConfig, RouterDataConfig, RouterTrainConfig, SplitConfig

__all__ = [
    "AdapterTrainConfig",
    "ArrowConfig",
    "BenchConfig",
    "DeviceConfig",
    "EvalConfig",
    "FusionConfig",
    "GREEDY_BELOW",
    "GenerationConfig",
    "Granularity",
    "Quantization",
    "RayServeConfig",
    "RouterConfig",
    "RouterDataConfig",
    "RouterTrainConfig",
    "RoutingConfig",
    "SelectionConfig",
    "ServerConfig",
    "SplitConfig",
]
