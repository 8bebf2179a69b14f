"""dlp-lora: one small language model, many task LoRA adapters, a router that mixes them per prompt."""

from dlp_lora.fusion.inject import FusedLoRAModel
from dlp_lora.models import load_base_model
from dlp_lora.pipeline import DLPLoRA, Result
from dlp_lora.router import Router, select
from dlp_lora.types import Routing

__all__ = ["DLPLoRA", "FusedLoRAModel", "Result", "Router", "Routing", "load_base_model", "select"]
