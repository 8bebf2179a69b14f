"""Routing granularity: segments, the sentence re-routing policy, and exactness of policy-driven switches."""

from __future__ import annotations

import json
import string
from contextlib import ExitStack

import pytest
import torch
from conftest import make_tiny_assets, tiny_pipeline, tiny_vocab_model

from dlp_lora.chat import UserTurns, conversation_prompt, encode_prompts
from dlp_lora.config import FusionConfig, GenerationConfig, RoutingConfig, SelectionConfig
from dlp_lora.granularity import SentencePolicy, completion_route_text, routing_text, scoring_text, split_segments
from dlp_lora.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"granularity": "token"}, "granularity must be prompt|segment|sentence"),
        ({"segment_marker": ""}, "segment_marker must be a non-empty string"),
        ({"sentence_ends": ()}, "sentence_ends must be non-empty strings"),
        ({"window_chars": 3}, "window_chars must be >= 16"),
        ({"min_sentence_tokens": 0}, "min_sentence_tokens must be >= 1"),
    ],
)
def test_config_refuses_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        RoutingConfig(**kw)


def test_segments_and_the_answered_segment():
    text = "Context: cats.\n\n\n\nWhat is 2 + 3?\n\n  "
    assert split_segments(text) == ["Context: cats.", "What is 2 + 3?"]
    assert split_segments("no marker") == ["no marker"]
    assert split_segments("a ## b", "##") == ["a", "b"]
    assert routing_text(text, RoutingConfig(granularity="prompt")) == text
    assert routing_text(text, RoutingConfig()) == "What is 2 + 3?"  # `segment`, the default
    assert routing_text("a ## b", RoutingConfig(granularity="sentence", segment_marker="##")) == "b"


def _policy(decoded: dict[int, str], route, cfg=None, rows=3):
    return SentencePolicy(
        cfg or RoutingConfig(granularity="sentence", min_sentence_tokens=1),
        ["p0", "p1", "p2"][:rows],
        torch.eye(3)[:rows],
        decode=lambda t: decoded[t[0]],
        route=route,
        eos=frozenset({2}),
    )


def test_policy_batches_sentence_ends_and_leaves_other_rows_alone():
    calls = []

    def route(texts):
        calls.append(list(texts))
        return torch.tensor([[0.0, 0.5, 0.5]] * len(texts))

    policy = _policy({10: " word", 11: " end.", 12: "!"}, route)
    assert policy.step(torch.tensor([10, 10, 10]), torch.zeros(3, dtype=torch.bool)) is None
    changes = policy.step(torch.tensor([11, 10, 12]), torch.zeros(3, dtype=torch.bool))
    assert calls == [["p0\n word end.", "p2\n word!"]]  # one router call for both rows that ended a sentence
    assert sorted(changes) == [0, 2]
    torch.testing.assert_close(policy.current[1], torch.eye(3)[1])  # row 1 untouched
    torch.testing.assert_close(policy.current[0], torch.tensor([0.0, 0.5, 0.5]))
    assert [(s.row, s.token) for s in policy.switches] == [(0, 0), (1, 0), (2, 0), (0, 2), (2, 2)]
    # The same mixture again is not a switch; finished rows and EOS are ignored.
    assert policy.step(torch.tensor([11, 2, 11]), torch.tensor([False, False, True])) is None
    assert len(calls) == 2 and calls[1] == ["p0\n word end. end."]
    per_token = policy.per_token(0, 4)
    torch.testing.assert_close(per_token[:2], torch.eye(3)[[0, 0]])
    torch.testing.assert_close(per_token[2:], torch.tensor([[0.0, 0.5, 0.5]] * 2))


def test_policy_window_and_min_sentence_tokens():
    seen = []
    cfg = RoutingConfig(granularity="sentence", window_chars=16, min_sentence_tokens=2)
    policy = _policy({11: ".", 10: " abcdefghijklmnop"}, lambda t: seen.extend(t) or torch.eye(3)[: len(t)], cfg, 1)
    policy.step(torch.tensor([11]), torch.zeros(1, dtype=torch.bool))  # a 1-token sentence: no router call
    assert seen == []
    policy.step(torch.tensor([10]), torch.zeros(1, dtype=torch.bool))
    policy.step(torch.tensor([11]), torch.zeros(1, dtype=torch.bool))
    assert seen == ["bcdefghijklmnop."]  # the last 16 characters of prompt + answer


def test_policy_checks_initial_shape():
    with pytest.raises(ValueError, match=r"initial weights must be \(B=2, N\)"):
        SentencePolicy(RoutingConfig(), ["a", "b"], torch.ones(3, 2), decode=str, route=lambda t: t)


# Nearly every token ends a "sentence", so the untrained router re-routes rows many times.
BUSY = RoutingConfig(
    granularity="sentence",
    sentence_ends=tuple(string.ascii_letters + string.digits + string.punctuation),
    min_sentence_tokens=2,
)
PROMPTS = ["What is 3 + 4?\n\nName a noble gas.", "Sort: pear apple", "Which planet is largest?"]


def _reference(dlp, prompt: str, first: torch.Tensor, switches: list[dict], steps: int) -> list[int]:
    """One row alone: greedy decoding where each mixture change is a new `routed` block on the same cache."""
    names = dlp.adapter_names
    mixes = {s["token"]: dlp.routing_for([dict(zip(s["adapters"], s["weights"]))]) for s in switches}
    ids, mask = encode_prompts(dlp.tokenizer, [prompt])
    out_tokens = []
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(dlp.fused.routed(first[None]))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = dlp.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for i in range(steps):
            token = out.logits[:, -1].argmax(-1)
            out_tokens.append(int(token))
            if i + 1 in mixes:  # the forward on token i samples token i + 1: leave the block, enter the next
                stack.close()
                stack.enter_context(dlp.fused.routed(mixes[i + 1]))
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = dlp.model(
                input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True
            )
    assert len(names) == first.shape[0]
    return out_tokens


@pytest.mark.parametrize("path, rows", [("gathered", 3), ("dense", 3), ("merged", 1), ("auto", 1)])
def test_policy_switch_equals_two_block_reference(tmp_path, tok, path, rows):
    """A row re-routed by the sentence policy equals a reference that decodes each stretch in its own block."""
    assets = make_tiny_assets(tmp_path / "assets", len(tok))
    dlp = tiny_pipeline(assets, tok, selection=SelectionConfig(p=0.99), fusion=FusionConfig(path=path))
    prompts = PROMPTS[:rows]
    cfg = GenerationConfig(max_new_tokens=12)
    steps: list[torch.Tensor] = []
    results = dlp.generate(prompts, config=cfg, routing_config=BUSY, on_step=lambda t, f: steps.append(t.clone()))
    first = dlp.route(prompts, BUSY).to_dense(len(dlp.adapter_names))
    segment = dlp.generate(prompts, config=cfg, routing_config=RoutingConfig(granularity="segment"))
    assert any(r.switches for r in results), "the policy never switched: the test would prove nothing"
    for b, r in enumerate(results):
        assert r.adapters == segment[b].adapters  # `sentence` starts where `segment` does
        got = [int(t[b]) for t in steps[: r.completion_tokens]]
        assert _reference(dlp, prompts[b], first[b], r.switches, r.completion_tokens) == got


def test_policy_per_row_configs_leave_prompt_rows_alone():
    calls = []
    cfgs = [RoutingConfig(granularity="sentence", min_sentence_tokens=1), RoutingConfig()]
    policy = SentencePolicy(
        cfgs,
        ["p0", "p1"],
        torch.eye(3)[:2],
        decode=lambda t: ".",
        route=lambda texts: calls.append(texts) or torch.full((len(texts), 3), 1 / 3),
    )
    changes = policy.step(torch.tensor([5, 5]), torch.zeros(2, dtype=torch.bool))
    assert list(changes) == [0] and calls == [["p0\n."]]  # row 1 routes per prompt: never re-routed
    with pytest.raises(ValueError, match=r"one RoutingConfig or one per prompt \(2\)"):
        SentencePolicy([RoutingConfig()], ["a", "b"], torch.eye(2), decode=str, route=lambda t: t)


def test_generate_takes_one_routing_config_per_row(tmp_path, tok):
    """A batch mixing granularities: each row equals that row generated alone under its own config."""
    assets = make_tiny_assets(tmp_path / "assets", len(tok))
    dlp = tiny_pipeline(assets, tok, selection=SelectionConfig(p=0.99))
    cfg = GenerationConfig(max_new_tokens=8)
    cfgs = [BUSY, RoutingConfig(), RoutingConfig(granularity="segment")]
    seen = []
    batch = dlp.generate(PROMPTS, config=cfg, routing_config=cfgs, on_switch=lambda *a: seen.append(a))
    assert batch[0].switches and not batch[1].switches and not batch[2].switches
    assert [(row, tok_i) for row, tok_i, *_ in seen][: len(batch[0].switches)] == [
        (0, s["token"]) for s in batch[0].switches
    ]
    for b, c in enumerate(cfgs):
        alone = dlp.generate([PROMPTS[b]], config=cfg, routing_config=c)[0]
        assert (alone.text, alone.adapters, alone.switches) == (batch[b].text, batch[b].adapters, batch[b].switches)
    with pytest.raises(ValueError, match=r"one per prompt \(3\)"):
        dlp.generate(PROMPTS, config=cfg, routing_config=cfgs[:2])


def test_cli_generate_granularity_flags(tmp_path, tok, capsys):
    """`dlp-lora generate --granularity sentence ...` prints what the pipeline gives, switches included."""
    from dlp_lora.assets import Manifest
    from dlp_lora.cli import main
    from dlp_lora.pipeline import DLPLoRA

    root = make_tiny_assets(tmp_path / "assets", len(tok))
    tiny_vocab_model(len(tok)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    manifest = Manifest.load(root)
    Manifest(**{**manifest.__dict__, "base_model": str(root / "base")}).save(root)
    argv = [
        "generate",
        "--assets",
        str(root),
        "--prompt",
        PROMPTS[0],
        "--max-new-tokens",
        "10",
        "--json",
        "--quantize",
        "none",  # `auto` times int8 against fp32 on this CPU; the comparison below is with the fp32 pipeline
        "--granularity",
        "sentence",
        "--min-sentence-tokens",
        "2",
        "--sentence-ends",
        *BUSY.sentence_ends,
    ]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    want = DLPLoRA.from_assets(root).generate(
        [PROMPTS[0]], config=GenerationConfig(max_new_tokens=10), routing_config=BUSY
    )[0]
    assert got["switches"] and (got["text"], got["switches"]) == (want.text, want.switches)
    assert main([a for a in argv if a != "--json"]) == 0  # the text form lists the switches under the answer
    out = capsys.readouterr().out
    assert out.startswith(f"[{', '.join(f'{a}={w:.3f}' for a, w in zip(want.adapters, want.weights))}] ")
    assert out.count("\n  from token ") == len(want.switches)


def test_sentence_demo_cuts_the_answer_at_each_switch(tmp_path, tok):
    from dlp_lora.demo import sentence_demo

    dlp = tiny_pipeline(make_tiny_assets(tmp_path / "assets", len(tok)), tok, selection=SelectionConfig(p=0.99))
    want = dlp.generate(
        [PROMPTS[0]], config=GenerationConfig(max_new_tokens=12), routing_config=RoutingConfig(granularity="sentence")
    )[0]
    out = sentence_demo(dlp, PROMPTS[0], max_new_tokens=12).strip().splitlines()
    assert f"{len(want.switches)} mixture change(s)" in out[0] and len(out) == 2 + len(want.switches) + 1
    assert out[2].startswith("  tokens   0-") and all(a in out[2] for a in want.adapters)


@pytest.mark.parametrize(
    "text,want",
    [
        ("Q: What is X?\nA: carbon dioxide", "Q: What is X?\nA:"),  # lm-eval zero-shot QA
        ("Question: Why?\nAnswer: because: it is", "Question: Why?\nAnswer:"),  # ARC style, ':' in the answer
        ("Q: a?\nA: b\n\nQ: c?\nA: d\n\nQ: What is X?\nA: oxygen", "Q: What is X?\nA:"),  # few-shot primer
        ("Context line\nIs it true?\nyes", "Context line\nIs it true?"),  # no cue: the last line is the answer
        ("The cat sat on the mat", "The cat sat on the mat"),  # nothing tells: read whole
    ],
)
def test_scoring_text_reads_the_question(text, want):
    assert scoring_text(text) == want


def test_user_turns_find_the_last_user_message_of_a_templated_prompt():
    tok = load_tokenizer()
    turns = UserTurns(tok)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first\n\nQ: one?"}]
    chat += [{"role": "assistant", "content": "A: 1"}, {"role": "user", "content": "Q: two?\nA:"}]
    text = conversation_prompt(tok, chat)
    assert turns.last_message(text) == "Q: two?\nA:"
    assert turns.last_message(text + "an answer: with a colon") == "Q: two?\nA:"
    assert turns.last_message(conversation_prompt(tok, chat[1:2])) == "first\n\nQ: one?"
    assert turns.last_message("Q: two?\nA: yes") is None  # raw text: not a chat
    assert completion_route_text("Q: two?\nA: yes", turns, scoring=True) == "Q: two?\nA:"
    assert completion_route_text("Q: two?\nA: yes", turns, scoring=False) == "Q: two?\nA: yes"
    assert completion_route_text(text + "yes", turns, scoring=False) == "Q: two?\nA:"
    assert UserTurns(_NoTemplate()).last_message(text) is None


class _NoTemplate:
    chat_template = None
