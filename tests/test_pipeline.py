"""DLPLoRA end to end on a tiny model that shares the real tokenizer, and the assets manifest checks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_assets, tiny_pipeline, tiny_vocab_model

from dlp_lora.assets import Manifest
from dlp_lora.config import GenerationConfig, SelectionConfig
from dlp_lora.models import load_tokenizer
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.router import Router


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture
def assets(tmp_path, tok):
    """A complete assets folder: 2 adapters + an untrained router with the same class order."""
    return make_tiny_assets(tmp_path / "assets", len(tok))


def _pipeline(root, tok, **kw) -> DLPLoRA:
    return tiny_pipeline(root, tok, **kw)


def test_generate_returns_text_and_routing(assets, tok):
    dlp = _pipeline(assets, tok, selection=SelectionConfig(p=0.99))
    prompts = ["What is 3 + 4?", "Which planet is largest?"]
    results = dlp.generate(prompts, config=GenerationConfig(max_new_tokens=5))
    routing = dlp.route(prompts)
    for b, r in enumerate(results):
        assert r.adapters and set(r.adapters) <= {"maths", "science"}
        assert abs(sum(r.weights) - 1.0) < 1e-5
        assert [dlp.adapter_names[i] for i, _ in routing.row(b)] == r.adapters
        assert 1 <= r.completion_tokens <= 5 and r.prompt_tokens > 5


def test_routed_rows_equal_explicit_routing_alone(assets, tok):
    dlp = _pipeline(assets, tok)
    prompts = ["What is 3 + 4?", "Name a noble gas.", "Sort: pear apple"]
    mixes = [{"maths": 1.0}, {"maths": 0.5, "science": 0.5}, {"science": 1.0}]
    cfg = GenerationConfig(max_new_tokens=6)
    batch = dlp.generate(prompts, config=cfg, routing=dlp.routing_for(mixes))
    for p, mix, r in zip(prompts, mixes, batch):
        alone = dlp.generate([p], config=cfg, routing=dlp.routing_for([mix]))[0]
        assert alone.text == r.text and alone.adapters == r.adapters
    # The routing took effect: the same prompts under the base model alone answer otherwise (a pipeline
    # that ignored `routing` would pass the comparison above and fail here).
    base = dlp.generate(prompts, config=cfg, routing=dlp.routing_for([{}] * len(prompts)))
    assert all(b.adapters == [] for b in base)
    assert [b.text for b in base] != [r.text for r in batch]


def test_router_adapter_mismatch_refused(assets, tok):
    manifest = Manifest.load(assets)
    router = Router.load(assets / "router")
    swapped = dict(reversed(list(manifest.adapter_paths(assets).items())))
    with pytest.raises(ValueError, match="do not match adapters"):
        DLPLoRA(tiny_vocab_model(len(tok)), tok, router, swapped)


def test_runtime_adapter_fills_a_base_served_class(assets, tok):
    """Removing a class's adapter leaves the class to the base model (its weight on nothing); an adapter
    added under the class's name is routed again, wherever it lands in the bank; another name is served
    by name only."""
    dlp = _pipeline(assets, tok, selection=SelectionConfig(p=0.99))
    prompts = ["What is 3 + 4?", "Name a noble gas."]
    classes = dlp.class_weights(prompts)
    assert (classes > 0).all()  # both classes carry weight in both rows, so every column below is tested
    dlp.remove_adapter("maths")
    assert dlp.base_served == ["maths"] and dlp.adapter_names == ["science"]
    # A row whose top class lost its adapter is the base model alone; elsewhere that class loses its share.
    top_maths = classes[:, 0] >= classes[:, 1]
    assert torch.equal(dlp.route(prompts).to_dense(1), classes[:, [1]] * ~top_maths[:, None])
    dlp.add_adapter("extra", assets / "adapters" / "science")  # a name the router has no class for
    dlp.add_adapter("maths", assets / "adapters" / "maths")
    assert dlp.adapter_names == ["science", "extra", "maths"] and dlp.base_served == [] and dlp.baselines == ["extra"]
    science, maths = classes[:, [1]], classes[:, [0]]
    assert torch.equal(dlp.route(prompts).to_dense(3), torch.hstack([science, torch.zeros(2, 1), maths]))
    with pytest.raises(ValueError, match="already served"):
        dlp.add_adapter("maths", assets / "adapters" / "maths")
    with pytest.raises(ValueError, match="no adapter named"):
        dlp.remove_adapter("nope")


def test_bad_requests(assets, tok):
    dlp = _pipeline(assets, tok)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        dlp.routing_for([{"nope": 1.0}])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        dlp.generate(["fine", "  "])
    with pytest.raises(ValueError, match="empty list"):
        dlp.generate([])
    with pytest.raises(ValueError, match="routing has 1 rows for 2 prompts"):
        dlp.generate(["a", "b"], routing=dlp.routing_for([{"maths": 1.0}]))
    dlp.max_prompt_tokens = 8
    with pytest.raises(ValueError, match="the limit is 8"):
        dlp.generate(["a long prompt " * 10])
    assert dlp.fused.active_path is None  # nothing left routed after a refused request


def test_manifest_round_trip_and_strict_checks(assets):
    m = Manifest.load(assets)
    assert m.tasks == ["maths", "science"] and m.selection == {"p": 0.9}
    m.check(assets)
    broken = Manifest(base_model="tiny", tasks=["maths", "science"], adapters={"maths": "adapters/maths"})
    with pytest.raises(ValueError, match="differ"):
        broken.check(assets)
    missing = Manifest(base_model="tiny", tasks=["x"], adapters={"x": "adapters/x"})
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        missing.check(assets)
    (assets / "manifest.json").write_text(json.dumps({"format": 99, "base_model": "tiny"}))
    with pytest.raises(ValueError, match="manifest format"):
        Manifest.load(assets)
    with pytest.raises(FileNotFoundError, match="expected an assets folder"):
        Manifest.load(assets / "nowhere")


def test_router_class_order_checked_on_load(assets):
    with pytest.raises(ValueError):
        Router.load(assets / "router", expected_tasks=["science", "maths"])


def test_demo_table_and_prompt_files(assets, tok, tmp_path):
    from dlp_lora.demo import load_prompts, run_demo

    out = run_demo(_pipeline(assets, tok), ["What is 3 + 4?", "Name a noble gas."], max_new_tokens=3)
    lines = out.splitlines()
    assert lines[0].split() == ["prompt", "adapters", "(weight)", "answer"] and len(lines) >= 6
    assert "2 prompts in one mixed batch" in out and "tok/s" in out and "single adapter" in out
    (tmp_path / "a.json").write_text('["one", "two"]')
    (tmp_path / "b.jsonl").write_text('{"prompt": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "c.txt").write_text("one\ntwo\n")
    for name in ("a.json", "b.jsonl", "c.txt"):
        assert load_prompts(tmp_path / name) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"question": "one"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected a \"prompt\" or \"text\""):
        load_prompts(tmp_path / "bad.jsonl")
