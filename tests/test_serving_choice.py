"""What serves each router class (issue 23): the gate's rule over specialist, generalist, mixtures and base,
and a class served by another mixture honoured by routing, evaluation, the server and export."""

from __future__ import annotations

import pytest
import torch
from conftest import make_peft_adapter, make_tiny_assets, tiny_vocab_model
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from dlp_lora.assets import Manifest
from dlp_lora.config import ServerConfig
from dlp_lora.evaluation.harness import method_dense
from dlp_lora.export import export_mixture
from dlp_lora.models import load_tokenizer
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.server import create_app
from dlp_lora.training.choice import BASE, apply_choices, choose_option

N = 60


def _opt(mixture: dict, ones: int, chosen=None) -> dict:
    """Per-example scores: `ones` of N examples right (100), the rest wrong."""
    return {"mixture": mixture, "scores": [100.0] * ones + [0.0] * (N - ones), "chosen": chosen or []}


def test_the_best_option_beyond_noise_serves_the_class():
    options = {
        BASE: _opt({}, 10),
        "t": _opt({"t": 1.0}, 30),
        "g": _opt({"g": 1.0}, 45),
        "t+g": _opt({"t": 1.0, "g": 1.0}, 40),
    }
    choice = choose_option(options)
    assert choice["served"] == "g" and choice["mixture"] == {"g": 1.0} and choice["n"] == N
    assert all(choice["options"][n]["eligible"] for n in ("t", "g", "t+g"))
    assert choice["options"]["g"]["low"] > 0


def test_noise_and_collapse_leave_the_class_to_the_base_model():
    # 3 more right answers of 60 is within noise; the other option is better but collapsed onto option 0.
    gold = [i % 4 for i in range(N)]
    options = {BASE: _opt({}, 20), "t": _opt({"t": 1.0}, 23), "g": _opt({"g": 1.0}, 50, chosen=[0] * N)}
    choice = choose_option(options, gold)
    assert choice["served"] == BASE and choice["mixture"] == {}
    assert "not better" in choice["options"]["t"]["reason"] and "collapsed" in choice["options"]["g"]["reason"]


def test_an_option_must_beat_the_one_before_it_beyond_noise():
    # Fewer adapters first: g serves; t+g ties it, and t+g2 is one example better: neither moves the class.
    options = {
        BASE: _opt({}, 10),
        "t+g": _opt({"t": 1.0, "g": 1.0}, 40),
        "g": _opt({"g": 1.0}, 40),
        "t+g2": _opt({"t": 1.0, "g": 2.0}, 41),
    }
    choice = choose_option(options)
    assert choice["served"] == "g" and "vs_g" in choice["options"]["t+g2"]
    # The specialist comes first (serving_options lists it first); g, 2 examples better, stays out.
    assert choose_option({BASE: options[BASE], "t": _opt({"t": 1.0}, 38), **options})["served"] == "t"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tok):
    """maths and science with their adapters, `code` served by an even mixture of the two (as the gate's
    choice would write it), and a `general` baseline."""
    root = make_tiny_assets(tmp_path_factory.mktemp("assets"), len(tok), ("maths", "science", "code"), tokenizer=tok)
    make_peft_adapter(root / "baselines" / "general", seed=9, base=tiny_vocab_model(len(tok)))
    manifest = Manifest.load(root)
    manifest.adapters["code"] = None
    manifest.baselines["general"] = "baselines/general"
    manifest.serve["code"] = {"maths": 0.5, "general": 0.5}
    manifest.save(root)
    return root


def test_manifest_refuses_a_mixture_of_unknown_adapters(assets, tmp_path):
    manifest = Manifest.load(assets)
    manifest.serve["code"] = {"nope": 1.0}
    with pytest.raises(ValueError, match="manifest serves 'code'"):
        manifest.check(assets)
    assert Manifest.load(assets).served("code") == {"maths": 0.5, "general": 0.5}
    assert Manifest.load(assets).served("maths") == {"maths": 1.0}


def test_a_class_served_by_a_mixture_routes_to_it(assets):
    dlp = DLPLoRA.from_assets(assets)
    assert dlp.base_served == [] and dlp.no_adapter == []
    assert dlp.served("code") == {"maths": 0.5, "general": 0.5}
    names = dlp.adapter_names
    bank = dlp.to_bank(torch.tensor([[0.0, 0.0, 1.0], [0.25, 0.0, 0.75]]))
    want = torch.zeros(2, len(names))
    want[0, names.index("maths")], want[0, names.index("general")] = 0.5, 0.5
    want[1, names.index("maths")], want[1, names.index("general")] = 0.25 + 0.375, 0.375
    torch.testing.assert_close(bank, want, atol=0, rtol=0)
    # The oracle method (the true class's service) of a `code` example is the class's mixture, and its
    # answers equal the mixture named explicitly.
    probs = torch.full((1, 3), 1 / 3)
    dense = method_dense(dlp, "oracle", probs, torch.tensor([2]))
    torch.testing.assert_close(dense, want[:1], atol=0, rtol=0)
    routed = dlp.generate(["Sort: pear apple"], max_new_tokens=5, routing=dlp.routing_for([dlp.served("code")]))[0]
    assert sorted(routed.adapters) == ["general", "maths"] and routed.weights == [0.5, 0.5]
    dlp.remove_adapter("general")  # the class keeps the rest of its mixture
    assert dlp.served("code") == {"maths": 0.5}
    dlp.close()


def test_server_serves_and_lists_the_class_by_its_name(assets):
    dlp = DLPLoRA.from_assets(assets)
    cfg = ServerConfig(max_prompt_tokens=96, max_tokens_limit=16, default_max_tokens=4, model_name="tiny-base")
    try:
        with TestClient(create_app(dlp, cfg)) as client:
            ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
            assert "code" in ids and "general" in ids
            body = {"model": "code", "prompt": "Sort: pear apple", "max_tokens": 4, "temperature": 0}
            by_class = client.post("/v1/completions", json=body).json()
            named = client.post(
                "/v1/completions", json={**body, "model": None, "adapters": ["maths", "general"], "weights": [0.5, 0.5]}
            ).json()
            assert sorted(by_class["routing"]["adapters"]) == ["general", "maths"]
            assert by_class["choices"][0]["text"] == named["choices"][0]["text"]
    finally:
        dlp.close()


def test_export_of_a_class_is_its_mixture(assets, tmp_path):
    by_class = export_mixture(assets, {"code": 1.0}, tmp_path / "c")
    named = export_mixture(assets, {"maths": 0.5, "general": 0.5}, tmp_path / "n")
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (by_class, named))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_apply_choices_writes_the_manifest(tmp_path, tok):
    """Records as the pool and `training.candidates` leave them: squad's generalist wins, dyck's specialist
    alone wins, word sorting gains nothing beyond noise."""
    names = ("squad", "bbh_dyck_languages", "bbh_word_sorting")
    root = make_tiny_assets(tmp_path, len(tok), names)
    make_peft_adapter(root / "baselines" / "general", seed=9, base=tiny_vocab_model(len(tok)))
    manifest = Manifest.load(root)
    manifest.baselines["general"] = "baselines/general"
    base = _opt({}, 10)["scores"]
    for task, spec, gen in (("squad", 30, 50), ("bbh_dyck_languages", 40, 20), ("bbh_word_sorting", 12, 11)):
        manifest.records[task] = {
            "gate_scores": _opt({}, spec)["scores"],
            "base_gate_scores": base,
            "candidates": {
                "general": {
                    "mixture": {"general": 1.0},
                    "split": "gate",
                    "scores": _opt({}, gen)["scores"],
                    "chosen": [],
                }
            },
        }
    manifest.save(root)
    out = apply_choices(root)
    assert out.serve == {"squad": {"general": 1.0}} and out.adapters["squad"] is None
    assert out.adapters["bbh_dyck_languages"] == "adapters/bbh_dyck_languages"
    assert out.adapters["bbh_word_sorting"] is None and out.served("bbh_word_sorting") == {}
    assert out.records["squad"]["choice"]["served"] == "general"
    assert Manifest.load(root).serve == out.serve
