"""Adapters: PEFT LoRA directories in and out (`io`), the stacked bank (`bank`), exact mixtures as one LoRA (`mix`)."""
