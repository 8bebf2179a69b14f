"""Assets routers from user task files: retrain from the manifest's files, add a task by extending the head,
and the CLI's add-task and train-router --jsonl (a file sorted by task)."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
from conftest import make_peft_adapter, make_tiny_assets, tiny_vocab_model

from dlp_lora.assets import Manifest
from dlp_lora.cli import main
from dlp_lora.config import RouterConfig, RouterDataConfig, RouterTrainConfig, SplitConfig
from dlp_lora.models import load_tokenizer
from dlp_lora.router import Router
from dlp_lora.training.add_task import add_task
from dlp_lora.training.router_pool import train_pool_router

TINY = RouterConfig(task_names=("_",), embed_dim=16, hidden_dim=32, num_layers=2, max_length=64)
FAST = RouterTrainConfig(epochs=6, batch_size=32, lr=1e-2, patience=2)
DATA = RouterDataConfig(renderings_per_example=2, none_class=False)
SPLIT = SplitConfig(train_cap=200, dev_size=10, test_size=10)


pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _files(root):
    rng = random.Random(0)
    nouns = ["cat", "river", "house", "garden", "train", "book", "city", "lamp"]
    maths = [{"input": f"What is {rng.randint(1, 99)} plus {rng.randint(1, 99)}?", "output": "42"} for _ in range(80)]
    science = [
        {"input": f"Why does the {rng.choice(nouns)} absorb light and heat in summer? ({i})", "output": "x"}
        for i in range(80)
    ]
    sentiment = [
        {
            "input": f"Review: I {rng.choice(['loved', 'hated'])} the {rng.choice(nouns)}! Sentiment? ({i})",
            "output": "positive",
        }
        for i in range(80)
    ]
    return (
        _write(root / "maths.jsonl", maths),
        _write(root / "science.jsonl", science),
        _write(root / "sentiment.jsonl", sentiment),
    )


@pytest.fixture(scope="module")
def user_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("add") / "assets"
    make_tiny_assets(root, len(load_tokenizer()))
    maths, science, sentiment = _files(root.parent)
    manifest = Manifest.load(root)
    manifest.records = {"maths": {"examples_file": str(maths)}, "science": {"examples_file": str(science)}}
    manifest.save(root)
    train_pool_router(root, None, SPLIT, TINY, FAST, DATA, progress=False)
    return root, sentiment


def test_router_of_user_tasks_is_retrained_from_the_files_the_manifest_names(user_assets):
    root, _ = user_assets
    manifest = Manifest.load(root)
    record = manifest.records["router"]
    assert record["classes"] == ["maths", "science"] and record["dev_accuracy"] >= 90
    assert 0 < record["temperature"] and manifest.selection["p"] == record["selection"]["p"]
    assert Router.load(root / "router", expected_tasks=manifest.tasks).cfg.temperature == pytest.approx(
        record["temperature"], abs=1e-4
    )


def test_a_base_served_task_keeps_its_router_class(tmp_path):
    # The dev gate maps a failed task to the base model (adapter None); its prompts must still route to it.
    root = make_tiny_assets(tmp_path / "assets", len(load_tokenizer()))
    maths, science, _ = _files(tmp_path)
    manifest = Manifest.load(root)
    manifest.adapters["science"] = None
    manifest.records = {"maths": {"examples_file": str(maths)}, "science": {"examples_file": str(science)}}
    manifest.save(root)
    train_pool_router(root, None, SPLIT, TINY, replace(FAST, epochs=2), DATA, progress=False)
    manifest = Manifest.load(root)
    assert manifest.tasks == ["maths", "science"] and manifest.adapters["science"] is None
    manifest.check(root)


def test_add_task_extends_the_head_and_leaves_other_classes_alone(user_assets, tmp_path):
    root, sentiment = user_assets
    adapter = make_peft_adapter(tmp_path / "sent", seed=7, base=tiny_vocab_model(len(load_tokenizer())))
    old = Router.load(root / "router")
    probe = ["What is 3 plus 4?", "Why does the lamp absorb light and heat in summer? (1)"]
    record = add_task(root, "sentiment", adapter, sentiment, None, SPLIT, DATA, steps=150)
    manifest = Manifest.load(root)
    assert manifest.tasks == ["maths", "science", "sentiment"]
    assert manifest.adapters["sentiment"] == "adapters/sentiment"
    assert (root / "adapters" / "sentiment" / "adapter_config.json").exists()
    assert manifest.records["sentiment"]["examples_file"] == str(sentiment.resolve())
    head = record["router_head"]
    assert head["new_task_dev_accuracy"] >= 0.9 and head["max_drop_points"] <= 5 and head["bias"] <= head["bias_fitted"]
    new = Router.load(root / "router", expected_tasks=manifest.tasks)
    # The old classes' logits are exactly the old router's: only the new row was trained.
    assert torch.equal(new.predict_logits(probe)[:, :2], old.predict_logits(probe))
    assert new.predict_proba(["Review: I loved the city! Sentiment? (3)"]).argmax().item() == 2
    with pytest.raises(ValueError, match="already in"):
        add_task(root, "maths", adapter, sentiment, None, SPLIT, DATA)


def test_add_task_cli_refuses_a_non_adapter_directory(user_assets, tmp_path, capsys):
    root, sentiment = user_assets
    (tmp_path / "empty").mkdir()
    assert (
        main(
            [
                "add-task",
                "other",
                "--assets",
                str(root),
                "--adapter",
                str(tmp_path / "empty"),
                "--examples",
                str(sentiment),
            ]
        )
        == 2
    )
    assert "adapter_config.json" in capsys.readouterr().err


def test_train_router_jsonl_sorted_by_task_gets_a_stratified_dev_split(tmp_path, capsys):
    rows = [{"text": f"compute {i} plus {i}", "task": "math"} for i in range(30)]
    rows += [{"text": f"translate word number {i} to French", "task": "translate"} for i in range(30)]
    data = _write(tmp_path / "sorted.jsonl", rows)  # sorted by task: the first 10% is all 'math'
    assert (
        main(
            [
                "train-router",
                "--jsonl",
                str(data),
                "--out",
                str(tmp_path / "r"),
                "--embed-dim",
                "8",
                "--hidden-dim",
                "16",
                "--num-layers",
                "2",
                "--epochs",
                "4",
                "--lr",
                "0.01",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "best dev accuracy 1.0000" in out and "temperature" in out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["temperature"] > 0


def test_capped_bias_keeps_every_old_class_within_the_allowed_drop():
    from dlp_lora.training.add_task import _capped_bias

    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(200, 8, generator=gen), torch.randn(8, generator=gen)
    truth = torch.arange(200) % 4
    old = torch.randn(200, 4, generator=gen) + 3 * torch.nn.functional.one_hot(truth, 4)
    right = old.argmax(1) == truth
    for max_drop in (0.0, 0.1):
        b = _capped_bias(h, old, truth, w, torch.tensor(10.0), max_drop)  # 10: the new row would take everything
        taken = (h @ w + b) > old.max(1).values
        for c in range(4):
            assert int((taken & right & (truth == c)).sum()) <= int(max_drop * 50)
    assert _capped_bias(h, old, truth, w, torch.tensor(-100.0), 0.0) == -100.0  # never raised
