"""Fusion: the fused LoRA delta (`ops`), the fused layer (`layer`) and the model that swaps them in (`inject`)."""
