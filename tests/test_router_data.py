"""Router data and calibration: renderings, out-of-pool sources, the `none` selection, temperature, splits."""

from __future__ import annotations

import json
import random

import pytest
import torch

from dlp_lora.config import SelectionConfig
from dlp_lora.router import plain_select_row, select_with
from dlp_lora.router.calibration import expected_calibration_error, fit_temperature, reliability_bins
from dlp_lora.tasks.out_of_pool import generic_examples, is_unseen_source, out_of_pool_sources
from dlp_lora.tasks.prompts import mcq_example
from dlp_lora.tasks.renderings import HELD_OUT_RENDERINGS, RENDERINGS, TRAIN_RENDERINGS, render, render_many
from dlp_lora.tasks.types import Example
from dlp_lora.training.router import stratified_split

MCQ = mcq_example(
    "t/1",
    "t",
    "Which sentence has the correct adjective order:",
    ["big red ball", "red big ball"],
    0,
    source_prompt="Which sentence has the correct adjective order:\nOptions:\n(A) big red ball\n(B) red big ball",
)
QA = Example(
    uid="q/1",
    task="q",
    prompt="Sort the words: pear apple\nAnswer with the list.",
    answer="apple pear",
    references=("apple pear",),
    question="Sort the words: pear apple",
    instruction="Answer with the list.",
)


def test_train_and_held_out_renderings_are_disjoint_and_cover_the_formats():
    assert not set(TRAIN_RENDERINGS) & set(HELD_OUT_RENDERINGS)
    assert set(TRAIN_RENDERINGS) | set(HELD_OUT_RENDERINGS) == set(RENDERINGS)
    assert {
        "template",
        "source",
        "chatml",
        "paren",
        "numbered",
        "inline",
        "no_instruction",
        "lowercase",
        "whitespace",
        "head_cut",
        "tail_cut",
    } <= set(TRAIN_RENDERINGS)


@pytest.mark.parametrize("name", list(RENDERINGS))
def test_every_rendering_is_deterministic_and_keeps_content(name):
    for ex in (MCQ, QA):
        text = render(ex, name)
        assert text.strip() and text == render(ex, name)
        assert any(w in text.lower() for w in ("red", "pear", "apple", "adjective", "sort"))


def test_renderings_write_the_options_in_their_own_style():
    assert render(MCQ, "template") == MCQ.prompt
    assert render(MCQ, "source") == MCQ.source_prompt
    assert "(A) big red ball\n(B) red big ball" in render(MCQ, "paren")
    assert "1) big red ball\n2) red big ball" in render(MCQ, "numbered")
    assert "(A) big red ball (B) red big ball" in render(MCQ, "inline")
    assert "a) big red ball" in render(MCQ, "lower_letters") and MCQ.instruction not in render(MCQ, "lower_letters")
    assert render(MCQ, "chatml").startswith("<|im_start|>system")
    assert render(MCQ, "lowercase") == render(MCQ, "lowercase").lower()
    mixed = render(MCQ, "mixed_options")
    assert "big red ball" in mixed and "red big ball" in mixed and "(A)" not in mixed and "|" not in mixed
    assert render(QA, "paren") == QA.prompt  # free-form: no options to restyle
    assert len(render(MCQ, "head_cut")) < len(MCQ.prompt) + 40


def test_render_many_draws_per_example_and_refuses_unknown_names():
    triples = render_many([MCQ, QA], TRAIN_RENDERINGS, per_example=3)
    assert len(triples) == 6 and len({(t[0].uid, t[1]) for t in triples}) == 6
    assert triples == render_many([MCQ, QA], TRAIN_RENDERINGS, per_example=3)
    with pytest.raises(ValueError, match="unknown renderings \\['fancy'\\]"):
        render_many([MCQ], ["fancy"])
    with pytest.raises(ValueError, match="unknown rendering 'fancy'"):
        render(MCQ, "fancy")


def _fake_data(root):
    (root / "bbh").mkdir(parents=True)
    for name in ("navigate", "ruin_names", "logical_deduction_five_objects", "hyperbaton"):
        (root / "bbh" / f"{name}.json").write_text(json.dumps({"examples": []}))
    for folder in ("arc-easy", "hellaswag", "mmlu-anatomy"):
        (root / "nutcracker-db" / folder).mkdir(parents=True)
    return root


def test_out_of_pool_sources_follow_the_registry_pool(tmp_path):
    root = _fake_data(tmp_path)
    pool = ["arc_easy", "mmlu", "bbh_navigate", "bbh_logical_deduction_three_objects"]
    assert out_of_pool_sources(root, pool) == ["bbh/hyperbaton", "bbh/ruin_names", "nutcracker-db/hellaswag", "generic"]
    # The pool changes: a task taken into the pool leaves the out-of-pool set.
    assert "bbh/hyperbaton" not in out_of_pool_sources(root, pool + ["bbh_hyperbaton"])
    assert not is_unseen_source("generic")
    assert len(generic_examples()) >= 300 and len({e.prompt for e in generic_examples()}) == len(generic_examples())


def test_none_top1_gives_an_all_zero_row_and_matches_the_reference():
    probs = torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.1, 0.3], [0.5, 0.45, 0.05]])
    cfg = SelectionConfig(p=0.9)
    routing = select_with(probs, cfg, no_adapter=[2])
    assert routing.weights[0].abs().sum() == 0  # none on top: base model alone
    assert routing.indices[1].tolist()[:2] == [0, 2] and routing.weights[1].tolist()[1] == 0.0
    assert float(routing.weights[1, 0]) == pytest.approx(0.6 / 0.9)  # its share is dropped, not renormalised
    assert float(routing.weights[2].sum()) == pytest.approx(1.0)
    for b in range(3):
        ref = plain_select_row(probs[b], cfg, no_adapter=[2])
        got = list(zip(routing.indices[b].tolist(), routing.weights[b].tolist()))[: len(ref)]
        assert [i for i, _ in got] == [i for i, _ in ref]
        assert [w for _, w in got] == pytest.approx([w for _, w in ref], abs=1e-6)
    with pytest.raises(ValueError, match="outside the router's 3 classes"):
        select_with(probs, cfg, no_adapter=[3])
    with pytest.raises(TypeError, match="class indices"):
        select_with(probs, cfg, no_adapter="none")


def test_fit_temperature_recovers_the_temperature_of_the_data():
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 5, generator=gen) * 2
    labels = torch.multinomial(true_logits.softmax(-1), 1, generator=gen).squeeze(1)
    t = fit_temperature(true_logits * 3, labels)  # logits 3x too sharp: T should be about 3
    assert 2.6 < t < 3.4
    before = expected_calibration_error((true_logits * 3).softmax(-1), labels)
    after = expected_calibration_error((true_logits * 3 / t).softmax(-1), labels)
    assert after < 0.03 < before
    bins = reliability_bins(true_logits.softmax(-1), labels, num_bins=10)
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 4000
    with pytest.raises(ValueError, match="labels must be"):
        fit_temperature(true_logits, labels[:5])


def test_stratified_split_gives_every_label_a_dev_share_of_a_sorted_file():
    labels = ["a"] * 50 + ["b"] * 30 + ["c"] * 2 + ["d"]
    texts = [f"{lab} {i}" for i, lab in enumerate(labels)]
    tr_x, tr_y, dev_x, dev_y = stratified_split(texts, labels, 0.1, seed=0)
    assert sorted(set(dev_y)) == ["a", "b", "c"] and dev_y.count("a") == 5 and dev_y.count("b") == 3
    assert "d" in tr_y and not set(tr_x) & set(dev_x) and len(tr_x) + len(dev_x) == len(texts)
    assert stratified_split(texts, labels, 0.1, seed=0) == (tr_x, tr_y, dev_x, dev_y)
    assert stratified_split(texts, labels, 0.1, seed=1)[2] != dev_x
    shuffled = list(zip(texts, labels))
    random.Random(0).shuffle(shuffled)
    assert sorted(stratified_split([t for t, _ in shuffled], [y for _, y in shuffled], 0.1)[3]) == sorted(dev_y)
    with pytest.raises(ValueError, match="dev_fraction must be in"):
        stratified_split(texts, labels, 1.5)


def test_tasks_the_dev_gate_sent_to_the_base_model_stay_router_classes():
    # A gated task's prompts must still be recognised (and sent to no adapter), not rerouted to another task.
    from dlp_lora.assets import Manifest
    from dlp_lora.tasks.router_prompts import task_classes

    m = Manifest(
        base_model="b",
        tasks=["arc_easy", "piqa", "none"],
        adapters={"arc_easy": "adapters/arc_easy", "piqa": None, "none": None},
    )
    assert task_classes(m) == ["arc_easy", "piqa"]


def test_router_train_cap_is_its_own_and_leaves_dev_and_test_unchanged(tmp_path):
    # The router trains on more prompts per task than the adapters (RouterDataConfig.train_cap, not
    # SplitConfig.train_cap); its dev and test prompts must be the same at any cap.
    from dlp_lora.config import RouterDataConfig, SplitConfig
    from dlp_lora.tasks.loaders import user_file
    from dlp_lora.tasks.router_prompts import routed_prompts
    from dlp_lora.tasks.types import Task

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"input": f"Question {i}?", "output": str(i)}) + "\n" for i in range(100)))
    task = Task(name="mine", kind="qa", source=str(path), metric="exact", load=user_file("mine", path))
    split = SplitConfig(train_cap=10, dev_size=5, test_size=10)
    small, large = (RouterDataConfig(train_cap=cap, renderings_per_example=1, none_class=False) for cap in (10, 60))
    assert len(routed_prompts([task], "train", tmp_path, split, small)) == 10
    assert len(routed_prompts([task], "train", tmp_path, split, large)) == 60
    for part in ("dev", "test"):
        assert (
            routed_prompts([task], part, tmp_path, split, small).texts
            == routed_prompts([task], part, tmp_path, split, large).texts
        )
    with pytest.raises(ValueError, match="train_cap must be >= 1, got 0"):
        RouterDataConfig(train_cap=0)
