"""Shared fixtures: a tiny Llama-style model built from a config and random PEFT adapters made with peft."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def pytest_report_header(config) -> list[str]:
    """The versions and the CPU every run was made with: numerics and kernel speed depend on both."""
    import peft
    import transformers

    from dlp_lora.hardware import cpu_info

    return [
        f"dlp-lora: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
        f"cpu: {cpu_info()}",
    ]


# Numerical tests run in float32 and bfloat16 (the `dtype` fixture). The tolerance, stated once here and in
# the README ("Devices and precision"): logits equal the reference in the same dtype (peft, or the plain
# per-row run) to max |diff| <= ATOL[dtype], rtol 0. The tiny model's logits are below 1 in magnitude, so
# 1e-2 in bfloat16 and 2e-3 in float16 are a few units in the last place; measured here, one adapter alone
# is bit-identical to peft in bfloat16 and within 1 ulp in float16.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = (torch.float32, torch.bfloat16)


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def assert_close(got: torch.Tensor, want: torch.Tensor, msg: str | None = None) -> None:
    """got equals want to the tolerance of their dtype (both must have it: a result in another dtype than
    the reference's is itself a failure)."""
    assert got.dtype == want.dtype, f"got {got.dtype}, the reference is {want.dtype}"
    torch.testing.assert_close(got, want, atol=ATOL[want.dtype], rtol=0, msg=msg)


@pytest.fixture(params=DTYPES, ids=dtype_id)
def dtype(request) -> torch.dtype:
    """The base model's dtype for a numerical test: each runs in float32 and in bfloat16."""
    return request.param


def _int8_exact() -> bool:
    from dlp_lora.quantize import int8_gemm_exact

    return int8_gemm_exact()


needs_exact_int8 = pytest.mark.skipif(
    not _int8_exact(),
    reason="torch's int8 GEMM returns wrong products on this "
    "CPU (oneDNN without VNNI): int8 is refused here, `auto` keeps fp32",
)
"""For tests that run the int8 base: it is refused where the int8 GEMM is inexact (test_quantize checks that)."""


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    model.requires_grad_(False)
    return model.to(dtype)


def make_peft_adapter(
    out: Path,
    seed: int,
    r: int = 4,
    alpha: int = 8,
    targets=("q_proj", "v_proj"),
    base: LlamaForCausalLM | None = None,
    **extra,
) -> Path:
    """A PEFT LoRA directory with random (nonzero) A and B, saved as safetensors by peft itself."""
    from peft import LoraConfig, get_peft_model

    base = base if base is not None else tiny_llama()
    torch.manual_seed(seed)
    extra.setdefault("init_lora_weights", False)  # random B, so every adapter changes the output
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, **extra)
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(out, safe_serialization=True)
    peft_model.unload()  # leave the base model as it was
    return out


def tiny_vocab_model(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose vocabulary matches a real tokenizer (for tests that tokenize real text)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def padded_ids(b: int = 3, t: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, t) random token ids and their mask, row r left-padded by r tokens (rows of different lengths)."""
    ids = torch.randint(3, 128, (b, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(1, b):
        ids[row, :row] = 0
        mask[row, :row] = 0
    return ids, mask


@pytest.fixture
def fresh_dynamo():
    """Each test compiles from scratch: graphs left by other tests count against dynamo's recompile limit
    (8 per function), past which it silently runs eagerly."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: a second OpenMP thread only spins against other jobs on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tiny_assets(root: Path, vocab: int, names=("maths", "science"), selection=None, tokenizer=None) -> Path:
    """A complete assets folder over `tiny_vocab_model(vocab)`: random adapters, an untrained router, manifest.

    With `tokenizer`, the tiny model and the tokenizer are saved under root/base and the manifest names that
    folder, so a process given only the path (a server, a Ray replica) can load the assets on its own."""
    from dlp_lora.assets import Manifest
    from dlp_lora.config import RouterConfig
    from dlp_lora.router import Router

    model = tiny_vocab_model(vocab)
    base = "tiny"
    if tokenizer is not None:
        model.save_pretrained(root / "base")
        tokenizer.save_pretrained(root / "base")
        base = str(root / "base")
    for i, name in enumerate(names):
        make_peft_adapter(root / "adapters" / name, seed=i + 1, base=model)
    torch.manual_seed(0)
    Router(RouterConfig(task_names=tuple(names), embed_dim=8, hidden_dim=16)).save(root / "router")
    Manifest(
        base_model=base,
        tasks=list(names),
        adapters={n: f"adapters/{n}" for n in names},
        router="router",
        selection=selection if selection is not None else {"p": 0.9},
    ).save(root)
    return root


def tiny_pipeline(root: Path, tok, **kw):
    """DLPLoRA over a `make_tiny_assets` folder (the tiny model stands in for the manifest's base model)."""
    from dlp_lora.assets import Manifest
    from dlp_lora.pipeline import DLPLoRA
    from dlp_lora.router import Router

    manifest = Manifest.load(root)
    router = Router.load(root / "router", expected_tasks=manifest.tasks)
    return DLPLoRA(tiny_vocab_model(len(tok)), tok, router, manifest.adapter_paths(root), **kw)


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="session")
def _made_adapter_dirs(tmp_path_factory) -> dict[str, Path]:
    specs = {
        "a": dict(r=4, alpha=8, targets=("q_proj", "v_proj")),
        "b": dict(r=2, alpha=4, targets=("q_proj", "k_proj", "o_proj")),
        "c": dict(r=8, alpha=4, targets=("v_proj", "up_proj", "down_proj")),
    }
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_peft_adapter(root / name, seed=i + 1, **spec) for i, (name, spec) in enumerate(specs.items())}


@pytest.fixture
def adapter_dirs(_made_adapter_dirs, tmp_path: Path) -> dict[str, Path]:
    """Three adapters with different ranks, alphas and target modules: made by peft once per session, copied
    into each test's own folder (a test may edit its copy)."""
    return {name: Path(shutil.copytree(src, tmp_path / name)) for name, src in _made_adapter_dirs.items()}


def pytest_configure(config) -> None:
    # Test tensors are tiny: one thread avoids oversubscribing this 2-core machine (15x faster here).
    torch.set_num_threads(1)


def generate_ids(model, tokenizer, input_ids, attention_mask, cfg, decoder=None, on_step=None):
    """Decode a left-padded batch (B, T) on `Engine.generate` (the library's loop) with a plain model (routing,
    if any, set by the caller) and return each row's `Result` (text, token_ids, finish_reason)."""
    from dlp_lora.engine import Engine, Row

    engine = Engine(model, tokenizer, decoder)
    rows = [
        Row(prompt_ids=ids[mask.bool()].tolist(), mixture={}, params=cfg)
        for ids, mask in zip(input_ids.cpu(), attention_mask.cpu())
    ]
    return [engine.result(row, {}) for row in engine.generate(rows, on_step)]
