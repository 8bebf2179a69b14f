"""Arrow routing in the fused layers: the ops against a token-by-token reference, the model against PEFT's
own `create_arrow_model` (with and without GenKnowSub), and the engine answering under it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_peft_adapter, padded_ids, tiny_llama

from dlp_lora.fusion import ops
from dlp_lora.fusion.inject import FusedLoRAModel, arrow_stacks
from dlp_lora.types import ArrowRouting

TARGETS = ("q_proj", "v_proj", "up_proj")


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Four task adapters and two general ones, equal rank and targets (what PEFT's Arrow requires)."""
    root = tmp_path_factory.mktemp("arrow")
    base = tiny_llama()
    paths = {f"task{i}": make_peft_adapter(root / f"task{i}", seed=10 + i, r=4, alpha=8, targets=TARGETS, base=base)
             for i in range(4)}  # fmt: skip
    paths |= {f"gen{i}": make_peft_adapter(root / f"gen{i}", seed=20 + i, r=4, alpha=8, targets=TARGETS, base=base)
              for i in range(2)}  # fmt: skip
    return paths


def test_arrow_delta_equals_the_token_by_token_reference():
    g = torch.Generator().manual_seed(0)
    e, r, d_in, d_out = 5, 3, 12, 7
    As = [torch.randn(r, d_in, generator=g) for _ in range(e)]
    Bs = [torch.randn(d_out, r, generator=g) for _ in range(e)]
    scales = [0.5, 1.0, 2.0, 1.5, 0.25]
    A, B = torch.stack(As), torch.stack(Bs)
    P = ops.arrow_prototypes(A, B, seed=0, iters=40)
    # The prototype is B A's top right singular vector (up to sign).
    for i in range(e):
        top = torch.linalg.svd(B[i] @ A[i]).Vh[0]
        assert min((P[i] - top).abs().max(), (P[i] + top).abs().max()) < 1e-4
    x = torch.randn(2, 6, d_in, generator=g)
    Bt = torch.stack([(b * s).T for b, s in zip(Bs, scales)])
    for top_k, temperature in [(1, 1.0), (2, 0.5), (5, 3.0)]:
        got = ops.lora_delta_arrow(x, P, A, Bt, top_k, temperature)
        want = ops.lora_delta_arrow_loop(x, list(zip(As, Bs, scales)), P, top_k, temperature)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _peft_arrow(paths: dict, names: list[str], general: list[str], top_k: int, temperature: float):
    from peft import ArrowConfig, create_arrow_model

    cfg = ArrowConfig(top_k=top_k, router_temperature=temperature, use_gks=bool(general), rng_seed=0)
    return create_arrow_model(
        tiny_llama(),
        [str(paths[n]) for n in names],
        cfg,
        general_adapter_paths=[str(paths[n]) for n in general] or None,
    ).eval()


@pytest.mark.parametrize("top_k,temperature,gks", [(2, 1.0, False), (3, 0.5, False), (2, 1.0, True)])
def test_fused_arrow_equals_peft_create_arrow_model(experts, top_k, temperature, gks):
    """Every token of every row routed in every layer as PEFT routes it: logits equal in fp32, batch of rows
    of different lengths (left padding), prefill and cached decode steps."""
    names, general = ["task0", "task1", "task2", "task3"], (["gen0", "gen1"] if gks else [])
    peft_model = _peft_arrow(experts, names, general, top_k, temperature)
    fused = FusedLoRAModel(tiny_llama(), {n: experts[n] for n in names + general})
    arrow = ArrowRouting(experts=(0, 1, 2, 3), top_k=top_k, temperature=temperature,
                         general=(4, 5) if gks else ())  # fmt: skip
    ids, mask = padded_ids(b=3, t=7)
    with torch.no_grad(), fused.routed(arrow):
        got = fused.model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
    plain = tiny_llama()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got - want)[real].abs().max() <= 1e-4
    assert (got - plain)[real].abs().max() > 1e-3  # the experts changed the answer
    # The prototypes are PEFT's bit for bit (the same float32 power iteration, expert by expert).
    theirs = {n.removeprefix("base_model.model."): m.lora_arrow["arrow_router"].prototypes
              for n, m in peft_model.named_modules() if hasattr(m, "lora_arrow")}  # fmt: skip
    ours = {name: stacks[0] for name, stacks in arrow_stacks(fused.bank, arrow, torch.device("cpu")).items()}
    assert theirs.keys() == ours.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)
    fused.remove()


def test_arrow_decodes_with_the_engine_as_with_peft(experts):
    """Greedy tokens under Arrow through the engine (KV cache, rows ending apart) equal PEFT's."""
    from conftest import generate_ids

    from dlp_lora.config import GenerationConfig
    from dlp_lora.engine import Engine, Row

    names = ["task0", "task1", "task2", "task3"]
    peft_model = _peft_arrow(experts, names, [], 2, 1.0)
    fused = FusedLoRAModel(tiny_llama(), {n: experts[n] for n in names})

    class Tok:
        eos_token_id, pad_token_id = None, 0

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    ids, mask = padded_ids(b=3, t=6)
    cfg = GenerationConfig(max_new_tokens=5)
    want = [r.token_ids for r in generate_ids(peft_model, Tok(), ids, mask, cfg)]
    engine = Engine(fused, Tok(), arrow=ArrowRouting(experts=(0, 1, 2, 3), top_k=2))
    rows = [Row(prompt_ids=i[m.bool()].tolist(), mixture={}, params=cfg) for i, m in zip(ids, mask)]
    assert [r.tokens for r in engine.generate(rows)] == want
    fused.remove()


def test_arrow_refuses_what_it_cannot_route(experts, adapter_dirs, tmp_path):
    with pytest.raises(ValueError, match="top_k must be in"):
        ArrowRouting(experts=(0, 1), top_k=3)
    with pytest.raises(ValueError, match="must not be experts"):
        ArrowRouting(experts=(0, 1), top_k=1, general=(1,))
    fused = FusedLoRAModel(tiny_llama(), adapter_dirs)  # adapters on different modules
    with pytest.raises(ValueError, match="every expert on the same modules"), fused.routed(ArrowRouting((0, 1), 1)):
        pass
    with pytest.raises(ValueError, match="out of range"), fused.routed(ArrowRouting((0, 7), 1)):
        pass
    fused.remove()
    wide = make_peft_adapter(tmp_path / "wide", seed=3, r=8, targets=TARGETS)  # a general adapter of another rank
    mixed = FusedLoRAModel(tiny_llama(), {"task0": experts["task0"], "task1": experts["task1"], "wide": wide})
    with pytest.raises(ValueError, match="GenKnowSub"), mixed.routed(ArrowRouting((0, 1), 1, general=(2,))):
        pass
    mixed.remove()


def test_pipeline_and_server_route_with_arrow(tmp_path):
    """`DLPLoRA(arrow=...)` answers each prompt as the fused model under Arrow does; the server started with
    it answers the routed model the same and refuses a named model; the CLI's `--router arrow` prints it."""
    from conftest import make_tiny_assets, tiny_pipeline
    from fastapi.testclient import TestClient

    from dlp_lora.chat import prompt_ids
    from dlp_lora.config import ArrowConfig, GenerationConfig, ServerConfig
    from dlp_lora.models import load_tokenizer
    from dlp_lora.server import create_app

    tok = load_tokenizer()
    root = make_tiny_assets(tmp_path / "assets", len(tok), names=("maths", "science", "code"))
    dlp = tiny_pipeline(root, tok, arrow=ArrowConfig(top_k=2))
    prompts = ["What is 3 + 4?", "Name a noble gas."]
    got = dlp.generate(prompts, config=GenerationConfig(max_new_tokens=6))
    assert all(r.arrow and r.adapters == [] for r in got)
    ids = prompt_ids(tok, prompts)
    plain = tiny_pipeline(root, tok)
    with torch.no_grad(), plain.fused.routed(dlp.arrow_routing()):
        for p_ids, r in zip(ids, got):
            out = plain.model.generate(torch.tensor([p_ids]), max_new_tokens=6, do_sample=False)
            assert out[0, len(p_ids) :].tolist()[: len(r.token_ids)] == r.token_ids
    with TestClient(create_app(dlp, ServerConfig(model_name="tiny-base", max_prompt_tokens=96))) as client:
        body = {"model": "dlp-lora", "max_tokens": 6, "temperature": 0}
        ans = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": prompts[0]}]})
        assert ans.status_code == 200 and ans.json()["choices"][0]["message"]["content"] == got[0].text
        for model in ("maths", "tiny-base"):  # an adapter, and the base model, by name
            named = client.post("/v1/completions", json={**body, "model": model, "prompt": "hi"})
            assert named.status_code == 400 and "Arrow" in named.json()["error"]["message"], model
    with pytest.raises(ValueError, match="top_k 4 needs at least that many"):
        tiny_pipeline(root, tok, arrow=ArrowConfig(top_k=4))
    with pytest.raises(ValueError, match=r"general adapters \['nope'\] are not loaded"):
        tiny_pipeline(root, tok, arrow=ArrowConfig(top_k=1, general=("nope",)))
