"""Device and dtype: stacks that follow model.to(), the device check itself, loading on a device and dtype.

The numerical tests (fusion against peft and the per-row reference, generation, the engine) run in float32
and bfloat16 with the device check on in tests/test_fusion.py, test_generation.py and test_engine.py; the
tolerance is stated once, in conftest.ATOL.
"""

from __future__ import annotations

import pytest
import torch
from conftest import dtype_id, make_tiny_assets, tiny_llama, tiny_pipeline, tiny_vocab_model
from devcheck import DeviceCheck, device_checked

from dlp_lora import FusedLoRAModel
from dlp_lora.config import DeviceConfig, FusionConfig, GenerationConfig
from dlp_lora.models import load_base_model, load_tokenizer, resolve_device, resolve_dtype

PATHS = ["gathered", "dense", "merged"]
MIXED = torch.tensor([[1.0, 0.0, 0.0], [0.3, 0.7, 0.0], [0.0, 0.0, 0.0]])  # a, a+b, base


def test_stacks_are_non_persistent_buffers_that_follow_model_to(tiny_model, adapter_dirs):
    keys = set(tiny_model.state_dict())
    fused = FusedLoRAModel(tiny_model, adapter_dirs)
    # only the base weights, under their wrapper's name: no adapter tensor enters state_dict
    assert {k.replace(".base.", ".") for k in tiny_model.state_dict()} == keys
    stacks = {n for n, _ in tiny_model.named_buffers() if ".stack." in n}
    # A and Bt (rank-padded, per adapter), A_dense and Bt_dense (unpadded, the dense path) and owner
    assert len(stacks) == 5 * len(fused.bank.modules)
    tiny_model.to(torch.float64)
    assert all(s.A.dtype == s.Bt.dtype == s.A_dense.dtype == torch.float64 for s in fused.bank.modules.values())
    assert all(s.owner.dtype == torch.long for s in fused.bank.modules.values())  # indices keep their dtype
    tiny_model.to("meta")
    assert fused.device == torch.device("meta")
    assert all(s.A.is_meta and s.Bt_dense.is_meta for s in fused.bank.modules.values())  # the bank sees the move


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_half_base_keeps_float32_stacks(adapter_dirs, dtype):
    fused = FusedLoRAModel(tiny_llama(dtype=dtype), adapter_dirs)
    assert all(s.A.dtype == s.Bt.dtype == torch.float32 for s in fused.bank.modules.values())


@pytest.mark.parametrize("path", ["base", *PATHS])
def test_fused_prefill_and_decode_on_meta_device(tiny_model, adapter_dirs, path):
    """On `meta`, any tensor the engine makes on the host would meet meta tensors: DeviceCheck fails it."""
    fused = FusedLoRAModel(tiny_model.to("meta"), adapter_dirs, FusionConfig(path="auto" if path == "base" else path))
    weights = (
        torch.zeros(3, 3) if path == "base" else (torch.tensor([[0.2, 0.0, 0.8]] * 3) if path == "merged" else MIXED)
    )
    ids = torch.zeros(3, 6, dtype=torch.long, device="meta")
    # No attention mask: transformers reads a mask's values to pick its attention kernel, meta has none.
    with fused.routed(weights) as active, DeviceCheck("meta") as check, torch.no_grad():
        out = tiny_model(input_ids=ids, use_cache=True)
        step = tiny_model(input_ids=ids[:, -1:], cache=out.cache, use_cache=True)
    assert active.path == path
    assert step.logits.is_meta and step.logits.shape == (3, 1, 128) and check.ops > 0


def test_device_check_catches_a_host_tensor():
    with pytest.raises(AssertionError, match="on cpu"), DeviceCheck("meta"):
        torch.ones(2, 2, device="meta") @ torch.ones(2, 2)  # matmul alone would not complain
    with pytest.raises(AssertionError, match="aten.ones.* on meta"), device_checked("cpu"):
        torch.ones(2) + torch.ones(2, device="cpu")  # made without `device=` on a CPU model's watch
    with pytest.raises(AssertionError, match="checked nothing"), device_checked("cpu"):
        pass


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_pipeline_makes_every_tensor_on_the_model_device(tmp_path, tok):
    """A tensor made without `device=` lands on the default device: meta here, while the model is on
    CPU, so DeviceCheck reports the op that made it (routing, prompts, masks, sampling, scoring)."""
    dlp = tiny_pipeline(make_tiny_assets(tmp_path / "assets", len(tok)), tok)
    prompts = ["What is 3 + 4?", "Which planet is largest?"]
    with device_checked("cpu") as check:
        greedy = dlp.generate(prompts, config=GenerationConfig(max_new_tokens=4))
        sampled = dlp.generate(
            prompts, config=GenerationConfig(max_new_tokens=4, do_sample=True, seed=3, top_p=0.9, stop=("x",))
        )
        explicit = dlp.generate(
            prompts[:1],
            config=GenerationConfig(max_new_tokens=3),
            routing=dlp.routing_for([{"maths": 0.5, "science": 0.5}]),
        )
        scores = dlp.option_logprobs(prompts, [["7", "8"], ["Jupiter", "Mars"]], dlp.route(prompts))
    assert check.ops > 100 and len(greedy) == len(sampled) == 2 and explicit[0].adapters
    assert all(isinstance(s, float) for row in scores for s in row)


def test_load_base_model_device_and_dtype(tmp_path, tok):
    tiny_vocab_model(len(tok)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, _ = load_base_model(tmp_path / "m", dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}


def test_device_and_dtype_errors():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8")
    with pytest.raises(ValueError, match="floating dtype"):
        resolve_dtype(torch.int8)
    with pytest.raises(ValueError, match="device must be auto"):
        DeviceConfig(device="gpu")
    with pytest.raises(ValueError, match="dtype must be"):
        DeviceConfig(dtype="fp16")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is missing")
def test_cli_device_cuda_without_cuda_is_a_clear_error(tmp_path, tok, capsys):
    from dlp_lora.cli import main

    assets = make_tiny_assets(tmp_path / "assets", len(tok))
    assert main(["generate", "--assets", str(assets), "--prompt", "hi", "--device", "cuda"]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err


def test_from_assets_in_bfloat16_serves_the_same_answers(tmp_path, tok):
    """`DLPLoRA.from_assets(device=...)` (what `--device/--dtype` build) loads base, adapters and router
    there; the server answers greedy requests in bfloat16 exactly as the pipeline does."""
    from fastapi.testclient import TestClient

    from dlp_lora.assets import Manifest
    from dlp_lora.config import ServerConfig
    from dlp_lora.pipeline import DLPLoRA
    from dlp_lora.server import create_app

    root = make_tiny_assets(tmp_path / "assets", len(tok))
    tiny_vocab_model(len(tok)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    manifest = Manifest.load(root)
    manifest.base_model = str(root / "base")
    manifest.save(root)
    dlp = DLPLoRA.from_assets(root, device=DeviceConfig(device="cpu", dtype="bfloat16"))
    assert {p.dtype for p in dlp.model.parameters()} == {torch.bfloat16} and dlp.device == torch.device("cpu")
    assert all(s.A.dtype == torch.float32 for s in dlp.fused.bank.modules.values())
    prompt = "What is 3 + 4?"
    want = dlp.generate([prompt], config=GenerationConfig(max_new_tokens=5))[0]
    with TestClient(create_app(dlp, ServerConfig(model_name="tiny"))) as client:
        # Routed (no `model`), greedy, through the chat template: what `generate` does for the prompt.
        r = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": prompt}], "max_tokens": 5, "temperature": 0},
        )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want.text


def test_gpu_benchmark_script_runs_on_cpu_as_a_smoke_run(tmp_path, tok):
    """benchmarks/gpu.py's code path (no timing claims): a tiny model on CPU, every method and N."""
    import importlib.util
    import json
    from pathlib import Path

    tiny_vocab_model(len(tok)).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "gpu.json"
    bench.main(
        [
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--base-model",
            str(tmp_path / "base"),
            "--num-adapters",
            "2",
            "3",
            "--batch-sizes",
            "1",
            "2",
            "--new-tokens",
            "3",
            "--prompt-tokens",
            "8",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["rows"]
    assert {(r["method"], r["N"]) for r in rows} == {("base", 0), ("peft", 1), ("fused", 2), ("fused", 3)}
    assert all(r["prefill_ms"] > 0 and r["path"] for r in rows)  # no speed claim: tiny noisy timings
    with pytest.raises(SystemExit, match="no CUDA device") if not torch.cuda.is_available() else _nothing():
        bench.main(["--device", "cuda", "--base-model", str(tmp_path / "base")])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
