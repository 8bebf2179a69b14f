"""End to end on the real embedded SmolLM2-135M-Instruct (slow: loads 134.5M parameters)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import generate_ids, make_peft_adapter

from dlp_lora import FusedLoRAModel, load_base_model
from dlp_lora.chat import encode_prompts
from dlp_lora.config import FusionConfig, GenerationConfig
from dlp_lora.types import ArrowRouting

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
    dirs = {
        n: make_peft_adapter(tmp_path / n, seed=s, r=4, base=model, init_lora_weights=False)
        for n, s in (("x", 1), ("y", 2))
    }
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
            with fused.routed(weights[b : b + 1]) as active:
                assert active.path == "merged"
                alone = generate_ids(model, tok, ids[b : b + 1, keep], mask[b : b + 1, keep], cfg)
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
        prompts = [
            "Sort the following words alphabetically: List: pear apple fig",
            "((2 + 3) * 4 - 1) =\nAnswer with a number.",
            # A SQuAD-sized passage: the router reads a two-line context as small talk (`none`).
            "Context: The Nile is a major north-flowing river in northeastern Africa. It flows into the "
            "Mediterranean Sea. The Nile is among the longest rivers in the world, and its drainage basin "
            "covers eleven countries, including Tanzania, Uganda, Rwanda, Ethiopia, Sudan and Egypt.\n"
            "Question: Into which sea does the Nile flow?\nAnswer with a short span from the context.",
        ]
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


@pytest.mark.skipif(not (ASSETS / "manifest.json").exists(), reason="bundled assets not built (make assets)")
def test_the_demo_shows_specialists_the_generalist_and_the_base_model():
    """`make demo`'s prompts, routed with the bundled assets: some get their specialist, one the generalist
    its class is served by (the manifest's `serve`), some the base model alone."""
    from dlp_lora import DLPLoRA
    from dlp_lora.assets import Manifest
    from dlp_lora.demo import DEMO_PROMPTS

    manifest = Manifest.load(ASSETS)
    dlp = DLPLoRA.from_assets(ASSETS)
    try:
        routing = dlp.route(list(DEMO_PROMPTS))
        first = [dlp.adapter_names[routing.row(b)[0][0]] if routing.row(b) else None for b in range(len(DEMO_PROMPTS))]
    finally:
        dlp.close()
    generalists = {n for mix in manifest.serve.values() if set(mix) <= set(manifest.baselines) for n in mix}
    assert generalists and generalists & set(first)
    assert len({a for a in first if a in manifest.deployed}) >= 3 and None in first


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
    prompts = [
        "Sort the following words alphabetically: List: pear apple fig",
        "((2 + 3) * 4 - 1) =\nAnswer with a number.",
        "Name the capital of Canada.",
    ]
    alone = [dlp.generate([p], config=GenerationConfig(max_new_tokens=n))[0] for p, n in zip(prompts, (12, 6, 20))]
    ctx = dlp.tokenizer(chat_prompt(dlp.tokenizer, question), add_special_tokens=False)["input_ids"]
    conts = [dlp.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    try:
        with TestClient(create_app(dlp, ServerConfig(max_batch_size=8))) as client, ThreadPoolExecutor(3) as pool:
            scored = client.post(
                "/v1/completions",
                json={
                    "model": adapter,
                    "prompt": [ctx + c for c in conts],
                    "max_tokens": 0,
                    "echo": True,
                    "logprobs": 1,
                },
            ).json()
            futures = [
                pool.submit(
                    client.post,
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": p}], "max_tokens": n, "temperature": 0},
                )
                for p, n in zip(prompts, (12, 6, 20))
            ]
            answers = [f.result().json() for f in futures]
        for choice, cont, lp in zip(scored["choices"], conts, want):
            assert abs(sum(choice["logprobs"]["token_logprobs"][-len(cont) :]) - lp) < 1e-4
        for ref, ans in zip(alone, answers):
            assert ans["choices"][0]["message"]["content"] == ref.text and ans["routing"]["adapters"] == ref.adapters
    finally:
        dlp.close()


# bfloat16 on the real model. No bound here comes from one machine's measurement: CPUs (AVX2, AVX-512,
# with or without VNNI/AMX) block bf16 dot products differently, so a one-ulp rounding flip in an early layer
# travels through 30 layers by an amount that depends on the CPU. Each layer is therefore checked tightly
# (one bf16 ulp against peft's own layer on the same input), and the whole model relative to an fp32
# reference, against peft's own bf16 error measured in the same run.
BF16_ADAPTERS = ("squad", "bbh_object_counting")
BF16_PROMPTS = ["Context: Paris is in France.\nQuestion: Where is Paris?", "What is 2 + 3?"]
PEFT_ERROR_MULTIPLE = 2.0
"""A path's bf16 error (vs fp32) may be at most this multiple of peft's own bf16 error on the same input:
both round the same quantities once per layer and differ only in the order of fp32 sums."""


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 at each |x| (exponent of x, 7 stored mantissa bits)."""
    x = x.abs().float().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


def _weights(n_rows: int) -> torch.Tensor:
    return torch.tensor([[1.0, 0.0], [0.6, 0.4]][:n_rows])


@pytest.mark.skipif(not (ASSETS / "manifest.json").exists(), reason="bundled assets not built (make assets)")
def test_bfloat16_layers_within_one_ulp_of_peft_and_the_loop_reference():
    """Layer by layer on real bf16 hidden states, every targeted layer of the first and last decoder block:
    the fp32 LoRA delta of every path equals the per-row loop reference within 1e-5; each path's bf16 output
    is within one bf16 ulp of the plain reference (the bf16 base layer's output plus the loop's fp32 delta,
    rounded once) for a single adapter and a mixture, and of peft's own `lora.Linear` for the single adapter.
    (peft's `add_weighted_adapter` builds a mixture's weights in the base's bf16, so it is no reference for
    one ulp: that mixture is checked against the loop instead.)"""
    from peft import PeftModel

    from dlp_lora.adapters.bank import AdapterBank
    from dlp_lora.fusion import ops
    from dlp_lora.types import Routing

    model, tok = load_base_model(dtype="bfloat16")
    dirs = {n: ASSETS / "adapters" / n for n in BF16_ADAPTERS}
    ids, mask = encode_prompts(tok, BF16_PROMPTS)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        last = model.config.num_hidden_layers - 1
        inputs = {
            f"model.layers.{i}.self_attn.{p}": model.model.layers[i].input_layernorm(hidden[i])
            for i in (0, last)
            for p in ("q_proj", "v_proj")
        }
        base_out = {name: model.get_submodule(name)(x) for name, x in inputs.items()}
    weights = _weights(len(BF16_PROMPTS))  # row 0: the first adapter alone; row 1: a mixture of both

    bank = AdapterBank(model, dirs)
    reference = {}
    for name, x in inputs.items():
        stack, x32 = bank.modules[name], x.float()
        terms = [(w.A, w.B, w.scale) if (w := a.modules.get(name)) else None for a in bank.adapters]
        delta = ops.lora_delta_loop(x32, terms, weights, stack.Bt.shape[-1])
        routing = Routing.from_dense(weights)
        A_sel, Bt_sel = ops.gather_stacks(stack.A, stack.Bt, routing.indices, routing.weights)
        torch.testing.assert_close(ops.lora_delta_gathered(x32, A_sel, Bt_sel), delta, atol=1e-5, rtol=1e-5)
        dense = ops.lora_delta_dense(x32, stack.A, stack.Bt, ops.dense_mask(weights, stack.rank))
        torch.testing.assert_close(dense, delta, atol=1e-5, rtol=1e-5)
        reference[name] = (base_out[name].float() + delta).to(torch.bfloat16)

    peft_model = PeftModel.from_pretrained(model, dirs[BF16_ADAPTERS[0]]).eval()
    with torch.no_grad():
        peft_row0 = {name: peft_model.base_model.model.get_submodule(name)(x[:1])[0] for name, x in inputs.items()}
    peft_model.unload()

    def within_one_ulp(got: torch.Tensor, want: torch.Tensor, what: tuple) -> None:
        ulp = torch.maximum(_bf16_ulp(got), _bf16_ulp(want))
        over = (got.float() - want.float()).abs() - ulp
        assert float(over.max()) <= 0, (*what, float(over.max()))

    fused = FusedLoRAModel(model, dirs)
    try:
        for path in ("gathered", "dense", "merged"):
            fused.config = FusionConfig(path=path)
            for b in range(len(BF16_PROMPTS)):
                # merged serves one mixture per block: each row runs in its own block there
                rows = slice(b, b + 1) if path == "merged" else slice(None)
                with torch.no_grad(), fused.routed(weights[rows]):
                    for name, x in inputs.items():
                        got = model.get_submodule(name)(x[rows])[0 if path == "merged" else b]
                        assert got.dtype == torch.bfloat16
                        within_one_ulp(got, reference[name][b], (path, name, b, "loop"))
                        if b == 0:
                            within_one_ulp(got, peft_row0[name], (path, name, b, "peft"))
    finally:
        fused.remove()


@pytest.mark.skipif(not (ASSETS / "manifest.json").exists(), reason="bundled assets not built (make assets)")
def test_bfloat16_model_error_no_larger_than_peft_own():
    """The whole model in bf16 against an fp32 reference (peft, fp32): each path's logit error is at most
    PEFT_ERROR_MULTIPLE times peft's own bf16 error, in mean and in max; greedy tokens (teacher-forced on
    the fp32 answer) equal fp32's wherever fp32's top-2 margin exceeds twice the largest error allowed."""
    from peft import PeftModel

    dirs = {n: ASSETS / "adapters" / n for n in BF16_ADAPTERS}
    cfg = GenerationConfig(max_new_tokens=8)
    ref_model, tok = load_base_model()
    ids, mask = encode_prompts(tok, BF16_PROMPTS)
    peft32 = PeftModel.from_pretrained(ref_model, dirs[BF16_ADAPTERS[0]]).eval()
    answers = generate_ids(peft32, tok, ids, mask, cfg)
    width = max(len(a.token_ids) for a in answers)
    full = torch.cat(
        [ids, torch.tensor([a.token_ids + [tok.pad_token_id] * (width - len(a.token_ids)) for a in answers])], dim=1
    )
    full_mask = torch.cat(
        [mask, torch.tensor([[1] * len(a.token_ids) + [0] * (width - len(a.token_ids)) for a in answers])], dim=1
    )
    keep = full_mask.bool()
    with torch.no_grad():
        want = peft32(input_ids=full, attention_mask=full_mask).logits[keep]
    top2 = want.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]

    model, _ = load_base_model(dtype="bfloat16")
    peft16 = PeftModel.from_pretrained(model, dirs[BF16_ADAPTERS[0]]).eval()
    with torch.no_grad():
        peft_err = (peft16(input_ids=full, attention_mask=full_mask).logits.float()[keep] - want).abs()
    peft16.unload()
    fused = FusedLoRAModel(model, dirs)
    try:
        for path in ("gathered", "dense", "merged"):
            fused.config = FusionConfig(path=path)
            with torch.no_grad(), fused.routed(torch.tensor([[1.0, 0.0]] * len(BF16_PROMPTS))):
                got = model(input_ids=full, attention_mask=full_mask).logits
            assert got.dtype == torch.bfloat16
            err = (got.float()[keep] - want).abs()
            assert float(err.mean()) <= PEFT_ERROR_MULTIPLE * float(peft_err.mean()), (
                path,
                err.mean(),
                peft_err.mean(),
            )
            assert float(err.max()) <= PEFT_ERROR_MULTIPLE * float(peft_err.max()), (path, err.max(), peft_err.max())
            clear = margin > 2 * PEFT_ERROR_MULTIPLE * float(peft_err.max())
            assert bool(clear.any()), "no position with a clear fp32 margin: the token check tested nothing"
            assert torch.equal(got.float()[keep].argmax(-1)[clear], want.argmax(-1)[clear]), path
    finally:
        fused.remove()


def test_arrow_on_the_bundled_adapters_equals_peft(real):
    """Arrow over the bundled pool's deployed adapters: our fused layers against PEFT's own
    `create_arrow_model` on the same directories, a mixed batch of real prompts.

    In float64 the two are the same computation: the prototypes equal PEFT's bit for bit (both made in
    float32, PEFT's way) and the logits agree to 1e-10 (measured: 0.0). In fp32 the deltas are summed in
    another order (one dense matmul against PEFT's per-expert einsums), so the two differ by fp32 rounding.
    Those bounds are relative to PEFT's own fp32 error in this run (no constant taken from one CPU): ours no
    further from the float64 result than twice PEFT's distance, and the two no further apart than twice that."""
    import copy

    from peft import ArrowConfig, create_arrow_model

    from dlp_lora.assets import DEFAULT_ASSETS, Manifest

    root = Path(__file__).parent.parent / DEFAULT_ASSETS
    paths = Manifest.load(root).adapter_paths(root)
    experts = [str(p) for p in paths.values() if p is not None]
    model, tok = real
    ids, mask = encode_prompts(tok, ["Q: What is 17 + 25?\nA:", "Sort these words: pear apple fig", "Is it valid?"])
    arrow = ArrowRouting(experts=tuple(range(len(experts))), top_k=3)

    def ours(m):
        fused = FusedLoRAModel(m, {f"expert{i}": p for i, p in enumerate(experts)})
        try:
            with torch.no_grad(), fused.routed(arrow):
                return m(input_ids=ids, attention_mask=mask).logits.double()
        finally:
            fused.remove()

    def peft(m):
        peft_model = create_arrow_model(m, experts, ArrowConfig(top_k=3, router_temperature=1.0, rng_seed=0)).eval()
        try:
            with torch.no_grad():
                return peft_model(input_ids=ids, attention_mask=mask).logits.double()
        finally:
            peft_model.unload()

    model64 = copy.deepcopy(model).double()
    ours32, ours64, theirs, theirs64 = ours(model), ours(model64), peft(model), peft(model64)
    del model64
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits.double()
    tokens = mask.bool()
    assert (ours64 - theirs64)[tokens].abs().max() <= 1e-10
    peft_error = (theirs - ours64)[tokens].abs().max()
    assert (ours32 - theirs)[tokens].abs().max() <= 2 * peft_error
    assert (ours32 - ours64)[tokens].abs().max() <= 2 * peft_error
    assert (ours32 - plain)[tokens].abs().max() > 1e-2  # Arrow changed the model
