"""End to end on the real embedded SmolLM2-135M-Instruct (slow: loads 134.5M parameters)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import make_peft_adapter
from dlp_lora import FusedLoRAModel, load_base_model
from dlp_lora.chat import encode_prompts
from dlp_lora.config import FusionConfig, GenerationConfig
from dlp_lora.generation import generate_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    return load_base_model()


def test_embedded_model_shape(real):
    model, tok = real
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert abs(sum(p.numel() for p in model.parameters()) - 134.5e6) < 0.1e6
    assert tok.padding_side == "left"


def test_fused_mixed_batch_on_real_model(real, tmp_path):
    from peft import PeftModel

    model, tok = real
    dirs = {n: make_peft_adapter(tmp_path / n, seed=s, r=4, base=model, init_lora_weights=False)
            for n, s in (("x", 1), ("y", 2))}
    # peft's own output for adapter x alone, then the model is unwrapped again
    ids, mask = encode_prompts(tok, ["Name a primary colour.", "What is 12 plus 30? Answer with the number."])
    peft_model = PeftModel.from_pretrained(model, dirs["x"])
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
    peft_model.unload()

    fused = FusedLoRAModel(model, dirs)
    try:
        with torch.no_grad(), fused.routed(torch.tensor([[1.0, 0.0], [1.0, 0.0]])):
            got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=1e-4)

        weights = torch.tensor([[1.0, 0.0], [0.4, 0.6]])
        cfg = GenerationConfig(max_new_tokens=12)
        with fused.routed(weights) as active:
            assert active.path in ("gathered", "dense")
            batch = generate_ids(model, tok, ids, mask, cfg)
        for b in range(2):
            keep = mask[b].bool()
            with fused.routed(weights[b: b + 1]) as active:
                assert active.path == "merged"
                alone = generate_ids(model, tok, ids[b: b + 1, keep], mask[b: b + 1, keep], cfg)
            assert batch[b].token_ids == alone[0].token_ids
    finally:
        fused.remove()


ASSETS = Path(__file__).resolve().parents[1] / "assets" / "smollm2-135m-26tasks"


@pytest.mark.skipif(not (ASSETS / "manifest.json").exists(), reason="bundled assets not built (make assets)")
def test_bundled_assets_answer_a_mixed_batch():
    from dlp_lora import DLPLoRA
    from dlp_lora.assets import Manifest

    manifest = Manifest.load(ASSETS)
    tasks = [t for t in manifest.tasks if t != "none"]
    assert len(tasks) == 26 and manifest.router == "router" and manifest.deployed
    assert all(t in manifest.records for t in tasks + ["router"])
    dlp = DLPLoRA.from_assets(ASSETS)
    try:
        prompts = ["Sort the following words alphabetically: List: pear apple fig",
                   "((2 + 3) * 4 - 1) =\nAnswer with a number.",
                   # A SQuAD-sized passage: the router reads a two-line context as small talk (`none`).
                   "Context: The Nile is a major north-flowing river in northeastern Africa. It flows into the "
                   "Mediterranean Sea. The Nile is among the longest rivers in the world, and its drainage basin "
                   "covers eleven countries, including Tanzania, Uganda, Rwanda, Ethiopia, Sudan and Egypt.\n"
                   "Question: Into which sea does the Nile flow?\nAnswer with a short span from the context."]
        probs = dlp.router.predict_proba(prompts)
        top = [dlp.task_names[i] for i in probs.argmax(1).tolist()]
        assert top[0] == "bbh_word_sorting" and top[2] == "squad"
        classes = dlp.class_weights(prompts)
        routing = dlp.route(prompts)
        results = dlp.generate(prompts, max_new_tokens=12)
        for b, r in enumerate(results):
            # A class the dev gate gave to the base model keeps no weight, and a prompt whose top class is one
            # of them gets the base model alone; the others keep the router's weights.
            want = {c: float(w) for c, w in zip(dlp.task_names, classes[b]) if w > 0}
            assert set(want) <= set(manifest.deployed)
            assert dict(zip(r.adapters, r.weights)) == pytest.approx(want, abs=1e-6)
            assert r.weights == sorted(r.weights, reverse=True)
            assert [dlp.adapter_names[i] for i, _ in routing.row(b)] == r.adapters
            assert r.text.strip()
        assert results[0].adapters == [] and results[2].adapters[0] == "squad"  # word_sorting is base-served
    finally:
        dlp.close()


def test_server_on_the_bundled_assets_scores_and_batches_like_the_pipeline():
    """The real model behind the server: echo + logprobs equal `option_logprobs` within 1e-4 (what
    lm-evaluation-harness's log-likelihood tasks read), and greedy answers of requests decoded together
    (continuous batching) equal the pipeline's answers alone."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from dlp_lora import DLPLoRA
    from dlp_lora.assets import Manifest
    from dlp_lora.chat import chat_prompt
    from dlp_lora.config import ServerConfig
    from dlp_lora.server import create_app

    dlp = DLPLoRA.from_assets(ASSETS)
    adapter = Manifest.load(ASSETS).deployed[0]  # whichever adapter the dev gate deployed first
    question = "Which gas do plants take in for photosynthesis?"
    options = [" carbon dioxide", " oxygen", " nitrogen", " helium"]
    want = dlp.option_logprobs([question], [options], dlp.routing_for([{adapter: 1.0}]))[0]
    prompts = ["Sort the following words alphabetically: List: pear apple fig",
               "((2 + 3) * 4 - 1) =\nAnswer with a number.", "Name the capital of Canada."]
    alone = [dlp.generate([p], config=GenerationConfig(max_new_tokens=n))[0] for p, n in zip(prompts, (12, 6, 20))]
    ctx = dlp.tokenizer(chat_prompt(dlp.tokenizer, question), add_special_tokens=False)["input_ids"]
    conts = [dlp.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    try:
        with TestClient(create_app(dlp, ServerConfig(max_batch_size=8))) as client, ThreadPoolExecutor(3) as pool:
            scored = client.post("/v1/completions", json={"model": adapter, "prompt": [ctx + c for c in conts],
                                                          "max_tokens": 0, "echo": True, "logprobs": 1}).json()
            futures = [pool.submit(client.post, "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": p}], "max_tokens": n, "temperature": 0})
                for p, n in zip(prompts, (12, 6, 20))]
            answers = [f.result().json() for f in futures]
        for choice, cont, lp in zip(scored["choices"], conts, want):
            assert abs(sum(choice["logprobs"]["token_logprobs"][-len(cont):]) - lp) < 1e-4
        for ref, ans in zip(alone, answers):
            assert ans["choices"][0]["message"]["content"] == ref.text and ans["routing"]["adapters"] == ref.adapters
    finally:
        dlp.close()


@pytest.mark.skipif(not (ASSETS / "manifest.json").exists(), reason="bundled assets not built (make assets)")
def test_bfloat16_real_model_equals_peft_bfloat16():
    """The embedded model in bfloat16 with a bundled adapter: every path against peft in bfloat16.

    Each path adds its fp32 delta to the layer output and rounds once to bf16, as peft does, but the dense
    path sums the delta over all N adapters (zeros included) in another order: a one-ulp rounding flip in
    an early layer then travels through 30 bf16 layers. Measured: gathered and merged equal peft exactly,
    dense differs by up to 0.375 (mean 0.005) on logits reaching ~40, with the same greedy tokens."""
    from peft import PeftModel

    model, tok = load_base_model(dtype="bfloat16")
    adapters = {n: ASSETS / "adapters" / n for n in ("squad", "bbh_object_counting")}
    ids, mask = encode_prompts(tok, ["Context: Paris is in France.\nQuestion: Where is Paris?", "What is 2 + 3?"])
    peft_model = PeftModel.from_pretrained(model, adapters["squad"]).eval()
    cfg = GenerationConfig(max_new_tokens=8)
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits.float()
    want_tokens = [o.token_ids for o in generate_ids(peft_model, tok, ids, mask, cfg)]
    peft_model.unload()
    fused = FusedLoRAModel(model, adapters)
    try:
        for path in ("gathered", "dense", "merged"):
            fused.config = FusionConfig(path=path)
            with torch.no_grad(), fused.routed(torch.tensor([[1.0, 0.0]] * 2)):
                got = model(input_ids=ids, attention_mask=mask).logits
                tokens = [o.token_ids for o in generate_ids(model, tok, ids, mask, cfg)]
            assert got.dtype == torch.bfloat16
            keep = mask.bool()
            if path == "dense":  # bf16 rounding flips propagate (docstring): bound the spread, not one ulp
                diff = (got.float()[keep] - want[keep]).abs()
                assert float(diff.max()) <= 0.75 and float(diff.mean()) <= 0.02, (path, float(diff.max()), float(diff.mean()))
            else:
                torch.testing.assert_close(got.float()[keep], want[keep], atol=0.25, rtol=0, msg=f"path {path}")
            assert tokens == want_tokens, path
    finally:
        fused.remove()
