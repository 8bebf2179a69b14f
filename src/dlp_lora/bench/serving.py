"""A tiny assets folder for load tests and fuzzing: the serving machinery without the real model's cost."""

from __future__ import annotations

from pathlib import Path

__all__ = ["build_tiny_assets"]


def build_tiny_assets(root: Path) -> Path:
    """A complete assets folder on a tiny random Llama with the real tokenizer: 4 random adapters and an
    untrained router. Answers are gibberish; only the serving machinery is exercised."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlp_lora.assets import Manifest
    from dlp_lora.config import RouterConfig
    from dlp_lora.models import load_tokenizer
    from dlp_lora.router import Router

    tasks = ("arithmetic", "translation", "sentiment", "trivia")
    tok = load_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
            bos_token_id=1,
            eos_token_id=tok.eos_token_id,
        )
    ).eval()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, task in enumerate(tasks):
        torch.manual_seed(i + 1)
        peft_model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        peft_model.save_pretrained(root / "adapters" / task, safe_serialization=True)
        model = peft_model.unload()
    Router(RouterConfig(task_names=tasks, embed_dim=8, hidden_dim=16)).save(root / "router")
    Manifest(
        base_model=str(root / "base"),
        tasks=list(tasks),
        adapters={t: f"adapters/{t}" for t in tasks},
        router="router",
        selection={"p": 0.6},
    ).save(root)
    return root
