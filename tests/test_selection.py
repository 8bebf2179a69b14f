"""Selection: probabilities (B, N) -> Routing, batched result checked against the per-row reference."""

from __future__ import annotations

import pytest
import torch

from dlp_lora.config import SelectionConfig
from dlp_lora.router import plain_select_row, select, select_with
from dlp_lora.types import Routing


def kept(routing: Routing, b: int) -> list[tuple[int, float]]:
    """Row b's (index, weight) pairs with nonzero weight, in slot order."""
    return [(int(i), float(w)) for i, w in zip(routing.indices[b], routing.weights[b]) if w > 0]


def assert_matches_reference(probs: torch.Tensor, cfg: SelectionConfig) -> None:
    routing = select_with(probs, cfg)
    for b in range(probs.shape[0]):
        ref = plain_select_row(probs[b], cfg)
        got = [(int(i), float(w)) for i, w in zip(routing.indices[b], routing.weights[b])][: len(ref)]
        assert [i for i, _ in got] == [i for i, _ in ref], (b, probs[b], got, ref)
        assert [w for _, w in got] == pytest.approx([w for _, w in ref], abs=1e-6)
        assert float(routing.weights[b, len(ref) :].abs().sum()) == 0.0  # padding carries no weight


def test_top_p_smallest_set_and_renorm():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [0.1, 0.5, 0.4]])
    r = select(probs, p=0.6)
    assert r.indices.shape == r.weights.shape == (3, 2)
    assert r.indices.dtype == torch.long
    assert kept(r, 0) == [(0, pytest.approx(0.5 / 0.8)), (1, pytest.approx(0.3 / 0.8))]
    assert kept(r, 1) == [(0, pytest.approx(1.0))]
    assert kept(r, 2) == [(1, pytest.approx(0.5 / 0.9)), (2, pytest.approx(0.4 / 0.9))]


def test_exact_mass_reaches_p_despite_float_rounding():
    # 0.5 + 0.2 is 0.7 exactly, but 0.69999999 in float32: the tolerance must stop at two adapters.
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.15]])
    assert float(probs[0, :2].sum()) < 0.7
    assert [i for i, _ in kept(select(probs, p=0.7), 0)] == [0, 1]


def test_ties_prefer_lower_index():
    probs = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.1, 0.4]])
    r = select(probs, p=0.5)
    assert [i for i, _ in kept(r, 0)] == [0, 1]
    assert [i for i, _ in kept(r, 1)] == [1, 3]
    assert [i for i, _ in kept(select(probs, strategy="top_k", k=3), 1)] == [1, 3, 0]


def test_all_equal_probabilities():
    probs = torch.full((2, 5), 0.2)
    r = select(probs, p=0.6)
    assert r.indices.tolist() == [[0, 1, 2]] * 2
    assert torch.allclose(r.weights, torch.full((2, 3), 1 / 3))


def test_p_one_keeps_all_nonzero():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    r = select(probs, p=1.0)
    assert [i for i, _ in kept(r, 0)] == [0, 2, 3]
    assert kept(r, 1) == [(0, 1.0)]
    assert r.indices.shape == (2, 3)


def test_tiny_p_keeps_top1_only():
    probs = torch.softmax(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    r = select(probs, p=1e-6)
    assert r.indices.shape == (8, 1)
    assert torch.equal(r.indices[:, 0], probs.argmax(dim=1))
    assert torch.allclose(r.weights, torch.ones(8, 1))


def test_single_task():
    for strategy in ("top_p", "top_k", "threshold"):
        r = select(torch.ones(3, 1), strategy=strategy, k=4, threshold=0.9)
        assert r.indices.tolist() == [[0]] * 3 and r.weights.tolist() == [[1.0]] * 3


def test_max_k_caps_every_strategy():
    probs = torch.full((1, 10), 0.1)
    assert select(probs, p=0.95, max_k=2).indices.shape == (1, 2)
    assert select(probs, strategy="top_k", k=5, max_k=3).indices.shape == (1, 3)
    assert select(probs, strategy="threshold", threshold=0.05, max_k=4).indices.shape == (1, 4)


def test_threshold_keeps_top1_even_below_threshold():
    probs = torch.tensor([[0.3, 0.35, 0.35], [0.05, 0.9, 0.05]])
    r = select(probs, strategy="threshold", threshold=0.4)
    assert r.indices.shape == (2, 1) and r.indices[:, 0].tolist() == [1, 1]
    r = select(probs, strategy="threshold", threshold=0.3)
    assert [i for i, _ in kept(r, 0)] == [1, 2, 0] and [i for i, _ in kept(r, 1)] == [1]


def test_softmax_vs_renorm_weights():
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    renorm = select(probs, strategy="top_k", k=2).weights[0]
    soft = select(probs, strategy="top_k", k=2, weighting="softmax").weights[0]
    assert torch.allclose(renorm, torch.tensor([0.6, 0.3]) / 0.9)
    assert torch.allclose(soft, torch.softmax(torch.tensor([0.6, 0.3]), dim=0))
    # Padded slots stay exactly 0 under softmax too.
    mixed = select(torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]]), p=0.7, weighting="softmax")
    assert mixed.weights[0, 1] == 0 and torch.allclose(mixed.weights.sum(1), torch.ones(2))


@pytest.mark.parametrize(
    "cfg",
    [
        SelectionConfig(p=0.6),
        SelectionConfig(p=0.9, weighting="softmax"),
        SelectionConfig(p=0.3, max_k=2),
        SelectionConfig(strategy="top_k", k=3),
        SelectionConfig(strategy="threshold", threshold=0.08),
        SelectionConfig(strategy="threshold", threshold=0.15, max_k=3, weighting="softmax"),
    ],
)
def test_batched_matches_reference(cfg):
    gen = torch.Generator().manual_seed(1234)
    for temperature in (0.3, 1.0, 3.0):
        logits = torch.randn(200, 9, generator=gen) / temperature
        assert_matches_reference(torch.softmax(logits, dim=1), cfg)
    # Rows with exact zeros and ties.
    sparse = torch.tensor([[0.5, 0.0, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0]])
    assert_matches_reference(sparse, cfg)


def test_routing_round_trips_through_dense():
    probs = torch.softmax(torch.randn(16, 7, generator=torch.Generator().manual_seed(3)), dim=1)
    r = select(probs, p=0.8)
    dense = r.to_dense(7)
    assert dense.shape == (16, 7) and torch.allclose(dense.sum(1), torch.ones(16))


def test_empty_batch():
    r = select(torch.zeros(0, 4))
    assert r.indices.shape == (0, 1)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([0.5, 0.5]), "2-D"),
        (torch.zeros(2, 0), "2-D"),
        (torch.tensor([[0.5, float("nan")]]), "NaN or inf"),
        (torch.tensor([[0.5, float("inf")]]), "NaN or inf"),
        (torch.tensor([[1.2, -0.2]]), "negative"),
        (torch.tensor([[2.0, 1.0, -0.5]]), "negative"),
        (torch.tensor([[0.5, 0.5], [2.0, 3.0]]), r"row 1 .*expected probabilities \(softmax output\)"),
    ],
)
def test_refuses_non_probabilities(bad, match):
    with pytest.raises(ValueError, match=match):
        select(bad)


def test_refuses_bad_types_and_config():
    with pytest.raises(TypeError, match="float"):
        select(torch.ones(2, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        select([[1.0]])
    with pytest.raises(ValueError, match="p must be"):
        select(torch.ones(1, 1), p=0.0)
    with pytest.raises(ValueError, match="max_k"):
        select(torch.ones(1, 1), max_k=0)
