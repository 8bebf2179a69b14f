"""The one-generation composite evaluation: piece assignment, token spans, and a full run on a tiny pipeline."""

from __future__ import annotations

from conftest import make_tiny_assets, tiny_pipeline

from dlp_lora.config import RoutingConfig, SelectionConfig
from dlp_lora.evaluation.composite import make_pairs
from dlp_lora.evaluation.granularity import (
    SETTINGS,
    Stream,
    assign_pieces,
    evaluate_granularity,
    markdown_section,
    weight_plot,
)
from dlp_lora.models import load_tokenizer
from dlp_lora.tasks import Example, Task
from dlp_lora.tasks.prompts import mcq_example


def test_pieces_answer_the_last_part_first():
    assert assign_pieces("B\n\nA", 2) == ["A", "B"]
    assert assign_pieces("\n\nonly one\n", 2) == ["", "only one"]
    assert assign_pieces("x\n\n\n\ny\n\nz", 2) == ["y", "x"]  # extra pieces are not an answer to anything
    assert assign_pieces("", 2) == ["", ""]


def test_piece_spans_follow_the_tokens():
    tok = load_tokenizer()
    ids = tok("C\n\nThe answer is 4.", add_special_tokens=False)["input_ids"]
    import torch

    s = Stream(result=None, tokens=ids, weights=torch.zeros(len(ids), 2))
    (a_lo, a_hi), (b_lo, b_hi) = s.piece_spans(tok.decode, 2)
    assert (b_lo, a_hi) == (0, len(ids)) and b_hi == a_lo  # piece 1 (part B), then piece 2 (part A)
    assert tok.decode(ids[b_lo:b_hi]).strip() == "C" and tok.decode(ids[a_lo:a_hi]).strip() == "The answer is 4."


def test_evaluate_granularity_on_a_tiny_pipeline(tmp_path):
    tok = load_tokenizer()
    dlp = tiny_pipeline(make_tiny_assets(tmp_path / "assets", len(tok)), tok, selection=SelectionConfig(p=0.99))
    maths = [
        Example(
            uid=f"maths/{i}", task="maths", prompt=f"What is {i} plus {i}?", answer=str(2 * i), references=(str(2 * i),)
        )
        for i in range(4)
    ]
    science = [
        mcq_example(f"science/{i}", "science", f"Which gas is number {i}?", ["oxygen", "neon"], i % 2) for i in range(4)
    ]
    tasks = {
        "maths": Task(name="maths", kind="qa", source="test", metric="numeric", load=lambda r: maths, max_new_tokens=4),
        "science": Task(
            name="science", kind="mcq", source="test", metric="choice", load=lambda r: science, max_new_tokens=3
        ),
    }
    pairs = make_pairs({"maths": maths, "science": science}, 3, seed=0)
    busy = RoutingConfig(sentence_ends=tuple("aeiou.?!"), min_sentence_tokens=1)
    out = evaluate_granularity(dlp, pairs, tasks, batch_size=2, routing_config=busy)
    assert set(out["settings"]) == set(SETTINGS) and out["pairs"] == 3
    for r in out["settings"].values():
        assert len(r["part_scores"]) == 6 and all(0 <= x <= 100 for x in r["part_scores"])
        assert r["score"]["low"] <= r["score"]["estimate"] <= r["score"]["high"]
        assert 0 <= r["true_task_weight"] <= 1 and r["tokens_per_stream"] <= 7
    assert out["settings"]["prompt"]["switches_per_stream"] == 0 == out["settings"]["segment"]["switches_per_stream"]
    assert out["settings"]["sentence"]["switches_per_stream"] > 0  # the traces below do change
    assert "vs_prompt" in out["settings"]["sentence"] and "vs_split" in out["settings"]["prompt"]
    ex = out["examples"][0]
    assert set(ex["weights"]) == {p.task for p in pairs[0]} and all(
        len(w) == len(ex["weights"][pairs[0][0].task]) for w in ex["weights"].values()
    )
    md = markdown_section(out, "cmd", plot="w.png")
    assert md.count("\n| ") == 1 + len(SETTINGS) and "![" in md
    assert weight_plot(out, tmp_path / "w.png", examples=2).stat().st_size > 0
