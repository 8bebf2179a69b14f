"""The int8 base: exact LoRA mixtures relative to the quantized base, on every path; rows independent."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import generate_ids, needs_exact_int8, padded_ids, tiny_llama
from torch import nn

from dlp_lora import FusedLoRAModel
from dlp_lora import quantize as quantize_module
from dlp_lora.adapters.bank import AdapterBank
from dlp_lora.config import FusionConfig, GenerationConfig
from dlp_lora.fusion import ops
from dlp_lora.fusion.layer import FusedLoRALinear
from dlp_lora.quantize import (
    Int8Linear,
    KernelChoice,
    check_quantization,
    choose_kernels,
    quantization_of,
    quantize_model,
    resolve_quantization,
)

ATOL = 1e-5
PATHS = ["gathered", "dense", "merged"]


def _qmodel() -> nn.Module:
    return quantize_model(tiny_llama(), "int8")


class _RefLinear(nn.Module):
    """Reference for one targeted layer: the quantized base plus the per-row loop delta."""

    def __init__(self, base: nn.Module, terms, weights: torch.Tensor) -> None:
        super().__init__()
        self.base, self.terms, self.weights = base, terms, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + ops.lora_delta_loop(x, self.terms, self.weights, self.base.out_features)


def _reference_logits(adapter_dirs, weights, ids, mask) -> torch.Tensor:
    """A fresh quantized model whose targeted layers are _RefLinear: what every path must equal."""
    model = _qmodel()
    bank = AdapterBank(model, adapter_dirs)
    for name in bank.modules:
        terms = [(w.A, w.B, w.scale) if (w := a.modules.get(name)) else None for a in bank.adapters]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _RefLinear(model.get_submodule(name), terms, weights))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@needs_exact_int8
def test_every_linear_is_int8_and_close_to_fp32():
    fp32, q = tiny_llama(), _qmodel()
    assert quantization_of(q) == "int8" and quantization_of(fp32) == "none"
    assert not any(type(m) is nn.Linear for m in q.modules())
    assert isinstance(q.lm_head, Int8Linear)
    assert q.model.embed_tokens.weight.dtype == torch.float32  # the tied embedding stays a float lookup
    ids, mask = padded_ids()
    with torch.no_grad():
        a, b = fp32(input_ids=ids, attention_mask=mask).logits, q(input_ids=ids, attention_mask=mask).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # quantized, so close but not equal


@needs_exact_int8
def test_int8_linear_matches_its_definition():
    lin = nn.Linear(32, 48)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(2, 5, 32)
    s = x.abs().amax(-1, keepdim=True) / 127
    want = (torch.round(x / s) * s) @ q.dequantized_weight().T + lin.bias
    torch.testing.assert_close(q(x), want, atol=ATOL, rtol=1e-5)
    assert (q.dequantized_weight() - lin.weight).abs().max() <= q.weight_scale.max() / 2 + 1e-7


@needs_exact_int8
@pytest.mark.parametrize("path", PATHS)
def test_fused_equals_quantized_base_plus_reference_delta(adapter_dirs, path):
    ids, mask = padded_ids()
    weights = (
        torch.tensor([[0.7, 0.2, 0.5]]).repeat(3, 1)
        if path == "merged"
        else torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.0, 0.4, 0.6]])
    )
    want = _reference_logits(adapter_dirs, weights, ids, mask)
    model = _qmodel()
    fused = FusedLoRAModel(model, adapter_dirs, FusionConfig(path=path))
    assert all(isinstance(m.base, Int8Linear) for m in model.modules() if isinstance(m, FusedLoRALinear))
    with torch.no_grad(), fused.routed(weights) as active:
        got = model(input_ids=ids, attention_mask=mask).logits
    assert active.path == path
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@needs_exact_int8
@pytest.mark.parametrize("path", ["gathered", "dense"])
def test_mixed_batch_equals_rows_alone(adapter_dirs, path):
    ids, mask = padded_ids()
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 0.0]])
    model = _qmodel()
    fused = FusedLoRAModel(model, adapter_dirs, FusionConfig(path=path))
    with torch.no_grad(), fused.routed(weights):
        batch = model(input_ids=ids, attention_mask=mask).logits
    for b in range(3):
        keep = mask[b].bool()  # alone: no padding at all, so per-token activation scales must not see it
        with torch.no_grad(), fused.routed(weights[b : b + 1]):  # one row: the merged path
            alone = model(input_ids=ids[b : b + 1, keep]).logits
        torch.testing.assert_close(batch[b, keep], alone[0], atol=ATOL, rtol=0)


@needs_exact_int8
def test_mixed_batch_greedy_tokens_equal_rows_alone(adapter_dirs):
    class Tok:
        eos_token_id, pad_token_id = None, 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    ids, mask = padded_ids()
    weights = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 0.0]])
    model = _qmodel()
    fused = FusedLoRAModel(model, adapter_dirs)
    cfg = GenerationConfig(max_new_tokens=6)
    with fused.routed(weights):
        batch = generate_ids(model, Tok(), ids, mask, cfg)
    for b in range(3):
        keep = mask[b].bool()
        with fused.routed(weights[b : b + 1]):
            alone = generate_ids(model, Tok(), ids[b : b + 1, keep], mask[b : b + 1, keep], cfg)
        assert batch[b].token_ids == alone[0].token_ids


@needs_exact_int8
def test_remove_restores_the_quantized_base(adapter_dirs):
    model = _qmodel()
    ids, mask = padded_ids()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        fused = FusedLoRAModel(model, adapter_dirs)
        fused.remove()
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


@needs_exact_int8
def test_unsupported_combinations_raise():
    with pytest.raises(ValueError, match="quantize must be one of"):
        check_quantization("int4", torch.float32)
    with pytest.raises(ValueError, match="needs the base model in torch.float32"):
        quantize_model(tiny_llama().to(torch.bfloat16), "int8")
    with pytest.raises(ValueError, match="runs on CPU only"):
        check_quantization("int8", torch.float32, "cuda")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(_qmodel(), "int8")


def test_choose_kernels_times_each_distinct_shape_once():
    model = tiny_llama()
    shapes = {}
    for m in model.modules():
        if type(m) is nn.Linear:
            shapes[(m.in_features, m.out_features)] = shapes.get((m.in_features, m.out_features), 0) + 1
    choices = choose_kernels(model)
    assert {(c.d_in, c.d_out): c.layers for c in choices} == shapes
    assert all(c.fp32_ms > 0 and c.int8_ms > 0 for c in choices)


def test_sweep_timing_keeps_each_calls_fastest_round():
    """A stall that hits one round of a call (a busy neighbour) does not count; a call slow every round does,
    and every sweep is timed in every round, so a stall spell cannot cover one sweep's rounds alone."""
    order = []

    def call(name: str, slow_on: set[int] | None, seconds: float = 0.003):
        calls = 0

        def run() -> None:
            nonlocal calls
            order.append(name)
            if slow_on is None or calls in slow_on:
                time.sleep(seconds)
            calls += 1

        return run

    spiky = [call("spiky", {1}, 0.05) for _ in range(3)]  # slow in the first timed round only
    slow = [call("slow", None) for _ in range(3)]
    spiky_ms, slow_ms = quantize_module._sweep_ms([spiky, slow], rounds=4)
    assert slow_ms >= 3 * 3.0  # every call sleeps 3 ms every round
    assert spiky_ms < 3 * 3.0  # its 50 ms stall is one round of four
    assert order == (["spiky"] * 3 + ["slow"] * 3) * 5  # the warm-up, then each round runs both sweeps


def test_kernel_choice_needs_int8_clearly_faster():
    assert KernelChoice(8, 8, 1, fp32_ms=1.0, int8_ms=0.5).int8
    assert not KernelChoice(8, 8, 1, fp32_ms=1.0, int8_ms=0.95).int8  # within the margin: fp32, which is exact
    assert not KernelChoice(8, 8, 1, fp32_ms=1.0, int8_ms=3.0).int8


def _fixed_choice(monkeypatch, int8_shapes: set[tuple[int, int]]) -> None:
    """Make the timing deterministic: int8 10x faster on `int8_shapes`, 3x slower elsewhere (and the int8
    GEMM exact, so the choice runs on any CPU)."""
    monkeypatch.setattr(quantize_module, "int8_gemm_exact", lambda: True)

    def fake(linears, quantized, rows=None):
        seen = {(m.in_features, m.out_features) for m in linears}
        return [KernelChoice(i, o, 1, 1.0, 0.1 if (i, o) in int8_shapes else 3.0) for i, o in sorted(seen)]

    monkeypatch.setattr(quantize_module, "_time_shapes", fake)


def test_auto_quantizes_exactly_the_shapes_measured_faster(monkeypatch):
    model = tiny_llama()
    mlp_up = (model.config.hidden_size, model.config.intermediate_size)
    _fixed_choice(monkeypatch, {mlp_up})
    quantize_model(model, "auto")
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if type(m) in (nn.Linear, Int8Linear)}
    for name, kind in kinds.items():
        want = "Int8Linear" if name.endswith(("gate_proj", "up_proj")) else "Linear"
        assert kind == want, (name, kind)
    _fixed_choice(monkeypatch, set())
    assert quantization_of(quantize_model(tiny_llama(), "auto")) == "none"  # int8 slower everywhere: fp32


def test_explicit_int8_warns_when_slower_here(monkeypatch, caplog):
    _fixed_choice(monkeypatch, set())
    with caplog.at_level("WARNING", logger="dlp_lora.quantize"):
        model = quantize_model(tiny_llama(), "int8")
    assert quantization_of(model) == "int8"  # what was asked for, but not silently
    assert "slower than fp32" in caplog.text


def test_auto_is_none_where_int8_cannot_run():
    assert resolve_quantization("auto", torch.bfloat16, "cpu") == "none"
    assert resolve_quantization("auto", torch.float32, "cuda") == "none"
    assert resolve_quantization("auto", torch.float32, "cpu") == "auto"
    model = tiny_llama().to(torch.bfloat16)
    assert quantize_model(model, "auto") is model and quantization_of(model) == "none"
    check_quantization("auto", torch.float32, "cuda")  # never an error


def test_an_inexact_int8_gemm_refuses_int8_and_auto_keeps_fp32(monkeypatch):
    monkeypatch.setattr(quantize_module, "int8_gemm_exact", lambda: False)
    with pytest.raises(ValueError, match="returns wrong products on this CPU"):
        quantize_model(tiny_llama(), "int8")
    assert quantization_of(quantize_model(tiny_llama(), "auto")) == "none"


def test_int8_gemm_probe_agrees_with_int64_arithmetic():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 48), generator=g, dtype=torch.int8)
    assert quantize_module.int8_gemm_exact() == torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())


def test_quantizing_a_fused_model_is_refused(adapter_dirs):
    model = tiny_llama()
    FusedLoRAModel(model, adapter_dirs)
    with pytest.raises(TypeError, match="quantize the base model before fusing"):
        quantize_model(model, "int8")


@needs_exact_int8
def test_bench_times_fp32_and_int8_side_by_side():
    from dlp_lora.bench.fusion import markdown_table, run_fusion_benchmark
    from dlp_lora.config import BenchConfig

    cfg = BenchConfig(
        num_adapters=(2,),
        batch_sizes=(1, 2),
        ks=(1,),
        prompt_tokens=4,
        new_tokens=2,
        repeats=1,
        quantize=("none", "int8"),
    )
    result = run_fusion_benchmark(tiny_llama(), cfg, progress=False)
    kinds = {(r["method"], r["quantize"]) for r in result["rows"]}
    assert kinds == {("base", "none"), ("peft", "none"), ("fused", "none"), ("base", "int8"), ("fused", "int8")}
    assert {"int8_N2_k1_b2_vs_fp32", "int8_N2_k1_b2_tok_s_vs_fp32_base", "N2_k1_b2_vs_peft"} <= set(result["ratios"])
    assert "| int8 | fused | eager | 2 | 1 | 2 |" in markdown_table(result, "dlp-lora bench")
    with pytest.raises(ValueError, match="quantize must be distinct values"):
        BenchConfig(quantize=("int4",))
