"""Metrics against values worked out by hand (SQuAD EM/F1, BLEU from its definition, ROUGE with stemming)."""

from __future__ import annotations

import math

import pytest

from dlp_lora.evaluation.metrics import (
    choice_accuracy,
    corpus_bleu,
    exact_match,
    numeric_match,
    rouge_scores,
    score_task,
    token_f1,
)


def test_choice_accuracy():
    assert choice_accuracy(["A", "c", " B ", "", "D"], [["A"], ["C"], ["A"], ["B"], ["D", "A"]]) == 60.0
    assert choice_accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="expected as many predictions as references, got 2 and 1"):
        choice_accuracy(["A", "B"], [["A"]])


@pytest.mark.parametrize(
    "pred,refs,expected",
    [
        ("the Eiffel tower", ["Eiffel Tower"], 1.0),  # case and article ignored
        ("Eiffel Tower.", ["Eiffel Tower"], 1.0),  # punctuation ignored
        ("Paris France", ["Paris"], 0.0),
        ("Paris", ["London", "paris"], 1.0),  # any reference counts
        ("", ["Paris"], 0.0),
    ],
)
def test_exact_match(pred, refs, expected):
    assert exact_match(pred, refs) == expected


@pytest.mark.parametrize(
    "pred,refs,expected",
    [
        # pred tokens {in, paris, france}, ref {paris}: P = 1/3, R = 1, F1 = 2 * (1/3 * 1) / (1/3 + 1) = 0.5
        ("in Paris France", ["Paris"], 0.5),
        # the article is dropped: pred {eiffel, tower}, ref {eiffel, tower, paris}: P = 1, R = 2/3, F1 = 0.8
        ("the Eiffel Tower", ["Eiffel Tower Paris"], 0.8),
        # bag of tokens: pred {a->gone, red, red, car} = {red, red, car}, ref {red, car}: common = min counts = 2,
        # P = 2/3, R = 1, F1 = 2 * (2/3) / (5/3) = 0.8
        ("a red red car", ["red car"], 0.8),
        # max over references: 0.0 against "London", 0.5 against "Paris"
        ("in Paris France", ["London", "Paris"], 0.5),
        ("Berlin", ["Paris"], 0.0),
        ("", ["Paris"], 0.0),
        ("the", ["a"], 1.0),  # both normalise to nothing: equal
    ],
)
def test_token_f1(pred, refs, expected):
    assert token_f1(pred, refs) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "pred,refs,expected",
    [
        ("#### 1,234", ["1234"], 1.0),
        ("3.0", ["3"], 1.0),
        ("so -7.", ["-7"], 1.0),
        ("7", ["-7"], 0.0),
        ("12 then 13", ["12"], 0.0),  # the last number is the answer
        ("2.5", ["2.50"], 1.0),
        ("no number", ["0"], 0.0),
        ("none", ["also none"], 0.0),  # no number on either side is not a match
        ("42", ["41", "42"], 1.0),
    ],
)
def test_numeric_match(pred, refs, expected):
    assert numeric_match(pred, refs) == expected


def test_corpus_bleu_perfect_match_is_100():
    assert corpus_bleu(["the cat sat on the mat ."], ["the cat sat on the mat ."]) == pytest.approx(100.0)


def test_corpus_bleu_by_hand():
    # sacrebleu defaults: 13a tokens (here plain words), n = 1..4, exp smoothing (unused: every order has a match).
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (6 tokens each, brevity penalty 1):
    #   1-grams: the(clipped to 1) cat sat on mat = 5/6;  2-grams: the cat, cat sat, sat on = 3/5
    #   3-grams: the cat sat, cat sat on = 2/4;            4-grams: the cat sat on = 1/3
    #   BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25 = 53.728...
    one = 100 * (1 / 12) ** 0.25
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(one, abs=1e-6)
    # hyp "the cat sat on" (4 tokens) vs ref "the cat sat on the mat" (6): every precision is 1,
    #   BP = exp(1 - 6/4) = exp(-0.5), BLEU = 60.653...
    short = 100 * math.exp(-0.5)
    assert corpus_bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(short, abs=1e-6)
    # Corpus level sums counts over both pairs (it does not average sentence scores):
    #   1-grams (5+4)/(6+4), 2-grams (3+3)/(5+3), 3-grams (2+2)/(4+2), 4-grams (1+1)/(3+1);
    #   lengths: hyp 10, ref 12 -> BP = exp(1 - 12/10); BLEU = 56.388...
    both = 100 * math.exp(1 - 12 / 10) * (9 / 10 * 6 / 8 * 4 / 6 * 2 / 4) ** 0.25
    got = corpus_bleu(["the cat sat on the mat", "the cat sat on"], ["the cat sat on a mat", "the cat sat on the mat"])
    assert got == pytest.approx(both, abs=1e-6)
    assert got != pytest.approx((one + short) / 2, abs=0.01)


def test_corpus_bleu_length_mismatch():
    with pytest.raises(ValueError, match="got 1 and 2"):
        corpus_bleu(["a b c d"], ["a b c d", "e f g h"])


def test_rouge_by_hand_with_stemming():
    # rouge-score lower-cases, splits on non-alphanumerics and Porter-stems tokens longer than 3 characters:
    #   ref "the cat chased the dogs" -> the cat chase the dog;  hyp "The dogs chased a cat!" -> the dog chase a cat
    #   ROUGE-1: overlap the(min 2,1 = 1) + cat + chase + dog = 4; P = 4/5, R = 4/5, F = 0.8
    #   ROUGE-L: the longest common subsequence has 2 tokens ("the chase", "the cat" or "the dog"): F = 2/5
    # Without the stemmer ROUGE-1 would be 2/5 (only "the" and "cat" match).
    got = rouge_scores(["The dogs chased a cat!"], ["the cat chased the dogs"])
    assert got == pytest.approx({"rouge1": 80.0, "rougeL": 40.0}, abs=1e-9)


def test_rouge_is_a_mean_over_pairs():
    # Pair 1 as above (80, 40); pair 2 identical (100, 100); pair 3 disjoint (0, 0).
    got = rouge_scores(
        ["The dogs chased a cat!", "red apples", "blue"], ["the cat chased the dogs", "red apples", "green"]
    )
    assert got == pytest.approx({"rouge1": 60.0, "rougeL": 140 / 3}, abs=1e-9)
    with pytest.raises(ValueError, match="got 2 and 1"):
        rouge_scores(["a", "b"], ["a"])


def test_score_task_choice():
    assert score_task("choice", ["A", "B", "C", ""], [["A"], ["C"], ["C"], ["D"]]) == {"accuracy": 50.0}


def test_score_task_squad():
    preds, refs = ["the Eiffel tower", "in Paris France"], [["Eiffel Tower"], ["Paris", "in Paris"]]
    out = score_task("squad", preds, refs)
    assert set(out) == {"em", "f1", "bleu", "rouge1", "rougeL"}
    # EM: 1 + 0 over 2; F1: pair 1 -> 1.0, pair 2 -> max(0.5, 2 * (2/3) / (5/3) = 0.8) = 0.8
    assert out["em"] == 50.0
    assert out["f1"] == pytest.approx(100 * (1.0 + 0.8) / 2)
    # BLEU/ROUGE compare preds with the first reference when no full texts are given: ROUGE-1 of pair 1
    # (the eiffel tower vs eiffel tower: P 2/3, R 1, F 0.8) and pair 2 (in paris france vs paris: F 0.5)
    assert out["rouge1"] == pytest.approx(100 * (0.8 + 0.5) / 2)


def test_score_task_uses_full_texts_and_targets_for_bleu_and_rouge():
    preds, refs = ["18"], [["18"]]
    text = "She has 16 - 3 - 4 = 9 eggs left , 9 * 2 = 18 dollars\n#### 18"
    out = score_task("numeric", preds, refs, texts=[text], targets=[text])
    assert out["em"] == 100.0 and out["bleu"] == pytest.approx(100.0) and out["rouge1"] == pytest.approx(100.0)
    other = score_task("numeric", preds, refs, texts=["I do not know the answer at all"], targets=[text])
    assert other["em"] == 100.0 and other["bleu"] < 5.0 and other["rougeL"] < 20.0


def test_score_task_numeric():
    out = score_task("numeric", ["1234", "3", "", "-7"], [["1,234"], ["3.0"], ["5"], ["7"]])
    assert out["em"] == 50.0  # 1234 = 1,234 and 3 = 3.0; nothing read; -7 != 7
    # numbers are right or wrong: F1 is the numeric match itself ("-7" vs "7" must not score)
    assert out["f1"] == out["em"]


def test_score_task_exact():
    out = score_task("exact", ["True", "no", "banana apple"], [["True"], ["Yes"], ["apple banana"]])
    assert out["em"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 0 + 1) / 3)  # same bag of tokens in a different order


def test_score_task_exact_does_not_erase_dyck_answers():
    out = score_task("exact", ["", "]", ") ] >"], [[") ] >"], [") ] >"], [") ] >"]])
    assert out["em"] == pytest.approx(100 / 3)


def test_score_task_errors():
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'; expected choice\|squad\|numeric\|exact"):
        score_task("bleu", ["a"], [["a"]])
    with pytest.raises(ValueError, match="expected as many predictions as references, got 2 and 1"):
        score_task("squad", ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="got 1 and 2"):
        score_task("choice", ["A"], [["A"], ["B"]])


def test_option_text_acc_and_acc_norm_by_hand():
    from dlp_lora.evaluation.examples import mcq_scores
    from dlp_lora.scoring import option_choice
    from dlp_lora.tasks import Example

    # Summed, "no" (-4) beats "a long answer" (-6); per byte, -6/13 beats -4/2: acc and acc_norm disagree.
    options = ("no", "a long answer")
    assert option_choice([-4.0, -6.0], options, normalize=False) == 0
    assert option_choice([-4.0, -6.0], options, normalize=True) == 1
    assert option_choice([-2.0, -2.0], ("ab", "cd"), normalize=True) == 0  # the first wins ties
    exs = [
        Example(
            uid=str(i),
            task="t",
            prompt="q",
            answer=options[g],
            references=("AB"[g],),
            choices=("A", "B"),
            options=options,
        )
        for i, g in enumerate((1, 0))
    ]
    got = mcq_scores([[-4.0, -6.0], [-4.0, -6.0]], exs)
    assert got.metrics == {"acc": [0.0, 100.0], "acc_norm": [100.0, 0.0]}
    assert got.headline == got.metrics["acc_norm"] and got.chosen == [1, 1]
