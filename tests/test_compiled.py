"""The compiled decoder (static KV cache + torch.compile) decodes what the eager one does.

Logic tests compile with dynamo's "eager" backend (graph capture, guards and recompiles, no C++ build); one
test per path builds real inductor kernels when a C++ compiler is on PATH."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
from conftest import generate_ids, needs_exact_int8, padded_ids, tiny_llama
from torch._dynamo.testing import CompileCounter

from dlp_lora.compiled import CompiledDecoder, check_compile
from dlp_lora.config import FusionConfig, GenerationConfig
from dlp_lora.engine import EagerDecoder
from dlp_lora.fusion.inject import FusedLoRAModel
from dlp_lora.quantize import quantize_model

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


HAS_CXX = any(shutil.which(c) for c in ("g++", "clang++", "c++"))


class _Tok:
    pad_token_id, eos_token_id = 0, None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def _logits(decoder, model, ids, mask, steps: int) -> torch.Tensor:
    """(steps + 1, B, V): the prefill's logits and each greedy step's, through one decoder."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = [decoder.prefill(ids, mask, positions, steps + 1)]
        pos = positions[:, -1]
        for _ in range(steps):
            pos = pos + 1
            out.append(decoder.step(out[-1].argmax(-1), pos))
    return torch.stack(out)


def _mixtures(b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(b, n, generator=g)
    return w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("path", ["base", "merged", "gathered", "dense"])
def test_compiled_steps_equal_eager_steps_on_every_path(adapter_dirs, path):
    model = tiny_llama()
    fused = FusedLoRAModel(model, adapter_dirs, FusionConfig(path="auto" if path == "base" else path))
    ids, mask = padded_ids(3, 6)
    if path == "merged":  # one mixture shared by every row
        ids, mask = ids[:1], mask[:1]
    counter = CompileCounter()
    compiled = CompiledDecoder(model, length_step=16, backend=counter)
    routing = fused.routed(_mixtures(ids.shape[0], len(adapter_dirs), 0))
    with routing if path != "base" else contextlib.nullcontext() as active:
        assert path == "base" or active.path == path
        want = _logits(EagerDecoder(model), model, ids, mask, 5)
        got = _logits(compiled, model, ids, mask, 5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1  # one graph for every step


def test_a_new_routing_with_the_same_shapes_reuses_the_graph(adapter_dirs):
    model = tiny_llama()
    fused = FusedLoRAModel(model, adapter_dirs, FusionConfig(path="gathered"))
    ids, mask = padded_ids(2, 5)
    counter = CompileCounter()
    compiled = CompiledDecoder(model, length_step=16, backend=counter)
    for seed in range(3):  # three requests, three mixtures, the same path and shapes
        with fused.routed(_mixtures(2, len(adapter_dirs), seed)):
            want = _logits(EagerDecoder(model), model, ids, mask, 3)
            got = _logits(compiled, model, ids, mask, 3)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1
    # A batch of another size compiles once more.
    with fused.routed(_mixtures(3, len(adapter_dirs), 0)):
        _logits(compiled, model, *padded_ids(3, 5), 3)
    assert counter.frame_count == 2


def test_generate_ids_with_the_compiled_decoder_gives_the_eager_answers():
    model = tiny_llama()
    ids, mask = padded_ids(3, 6)
    cfg = GenerationConfig(max_new_tokens=7)
    eager = generate_ids(model, _Tok(), ids, mask, cfg)
    compiled = generate_ids(model, _Tok(), ids, mask, cfg, decoder=CompiledDecoder(model, backend="eager"))
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]


@pytest.mark.skipif(not HAS_CXX, reason="inductor needs a C++ compiler on PATH")
@pytest.mark.parametrize("quantize", ["none", pytest.param("int8", marks=needs_exact_int8)])
def test_inductor_kernels_equal_eager_to_float_tolerance(adapter_dirs, quantize):
    # The real backend: fused C++ kernels reorder float sums, so close, not bit-identical (measured: 1e-7 on
    # logits the adapters move by 0.5; int8 gets room for one activation rounding flipped by the reorder).
    model = quantize_model(tiny_llama(), quantize)
    fused = FusedLoRAModel(model, adapter_dirs)
    ids, mask = padded_ids(2, 6)
    with fused.routed(_mixtures(2, len(adapter_dirs), 0)):
        want = _logits(EagerDecoder(model), model, ids, mask, 4)
        got = _logits(CompiledDecoder(model, length_step=16), model, ids, mask, 4)
    tol = 1e-5 if quantize == "none" else 1e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_clear_errors(monkeypatch):
    model = tiny_llama()
    with pytest.raises(ValueError, match="length_step must be >= 1, got 0"):
        CompiledDecoder(model, length_step=0)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        check_compile("cpu")
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        CompiledDecoder(model)
    monkeypatch.undo()
    compiled = CompiledDecoder(model, length_step=4, backend="eager")
    ids, mask = padded_ids(1, 3)
    with torch.no_grad():
        compiled.prefill(ids, mask, mask.cumsum(-1) - 1, 1)  # 3 + 1 tokens: a cache of 4 slots
        compiled.step(torch.tensor([5]), torch.tensor([3]))
        with pytest.raises(RuntimeError, match="the static cache holds 4 tokens"):
            compiled.step(torch.tensor([5]), torch.tensor([4]))


@pytest.mark.skipif(not HAS_CXX, reason="inductor needs a C++ compiler on PATH")
def test_pipeline_with_compile_answers_as_without(tmp_path):
    from conftest import make_tiny_assets, tiny_pipeline

    from dlp_lora.models import load_tokenizer

    tok = load_tokenizer()
    root = make_tiny_assets(tmp_path / "assets", len(tok))
    prompts = ["What is 3 + 4?", "Name a noble gas.", "Sort: pear apple"]
    cfg = GenerationConfig(max_new_tokens=6)
    eager = tiny_pipeline(root, tok).generate(prompts, config=cfg)
    compiled = tiny_pipeline(root, tok, compile=True)
    for _ in range(2):  # the second call reuses the graph and resets the static cache
        got = compiled.generate(prompts, config=cfg)
        assert [(r.text, r.adapters) for r in got] == [(r.text, r.adapters) for r in eager]
