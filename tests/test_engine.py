"""Continuous batching at the engine level: rows joining a running batch at different decode steps, each
with its own mixture, sampling and stop, answer exactly what they answer alone; echo log-probabilities
equal the in-process scorer. Each runs in float32 and bfloat16 (the `dtype` fixture) with the device check on
around the engine's calls."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import ATOL, generate_ids, tiny_llama
from devcheck import device_checked

from dlp_lora import FusedLoRAModel
from dlp_lora.config import GenerationConfig
from dlp_lora.engine import Engine, Row


class _Tok:
    """Just enough tokenizer for the engine on a 128-token vocabulary: ids decode to letters."""

    pad_token_id, eos_token_id = 0, 2

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(65 + i % 58) for i in ids if not (skip_special_tokens and i in (0, 2)))


PROMPTS = [[5, 9, 17, 33], [40, 41], [7, 8, 9, 10, 11, 12, 13], [3]]
MIXES = [{"a": 1.0}, {"b": 0.3, "c": 0.7}, {}, {"a": 0.5, "c": 0.5}]
LIMITS = [9, 4, 7, 6]


def _alone(fused, tok, row_ids, mixture, max_tokens, sampling=None, seed=None) -> list[int]:
    names = fused.adapter_names
    dense = torch.zeros(1, len(names))
    for n, w in mixture.items():
        dense[0, names.index(n)] = w
    cfg = sampling or GenerationConfig(max_new_tokens=max_tokens)
    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=cfg.do_sample, temperature=cfg.temperature, seed=seed)
    with fused.routed(dense):
        out = generate_ids(
            fused.model, tok, torch.tensor([row_ids]), torch.ones(1, len(row_ids), dtype=torch.long), cfg
        )
    return out[0].token_ids


@pytest.fixture
def engine(adapter_dirs, dtype):
    return Engine(FusedLoRAModel(tiny_llama(dtype=dtype), adapter_dirs), _Tok())


def _run(engine: Engine, rows: list[Row]) -> None:
    """Prefill `rows` together and decode until every one has finished, device-checked."""
    with device_checked():
        batch = engine.prefill(rows)
        while batch is not None:
            engine.decode(batch)
            batch = Engine.drop_finished(batch)


def test_rows_joining_mid_decode_answer_as_alone(engine):
    refs = [_alone(engine.fused, engine.tokenizer, p, m, n) for p, m, n in zip(PROMPTS, MIXES, LIMITS)]
    rows = [
        Row(prompt_ids=p, mixture=m, params=GenerationConfig(max_new_tokens=n))
        for p, m, n in zip(PROMPTS, MIXES, LIMITS)
    ]
    joins = {2: [rows[1]], 3: [rows[2], rows[3]]}  # rows arrive after the running one's 2nd and 3rd steps
    step, sizes = 0, []
    with device_checked():
        batch = engine.prefill(rows[:1])
        while batch is not None or joins:
            step += 1
            if step in joins:
                batch = Engine.merge(batch, engine.prefill(joins.pop(step)))
            batch = Engine.drop_finished(batch)
            if batch is None:
                continue
            sizes.append(len(batch))
            engine.decode(batch)
            batch = Engine.drop_finished(batch)
    engine.release()
    assert max(sizes) >= 3  # the rows really shared decode steps
    for row, ref in zip(rows, refs):
        assert row.tokens == ref and row.finish_reason in ("stop", "length")


def test_seeded_sampling_rows_do_not_depend_on_neighbours(engine):
    sampling = GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.9)
    alone = Row(prompt_ids=PROMPTS[0], mixture=MIXES[1], params=replace(sampling, seed=2**64 - 1))
    _run(engine, [alone])
    crowd = [
        Row(prompt_ids=p, mixture=m, params=replace(sampling, seed=s))
        for p, m, s in zip(PROMPTS, MIXES, [2**64 - 1, 3, 4, 5])
    ]
    crowd[0].prompt_ids = PROMPTS[0]
    crowd[0].mixture = MIXES[1]
    _run(engine, crowd)
    engine.release()
    assert crowd[0].tokens == alone.tokens and len(alone.tokens) > 0


def test_echo_logprobs_score_the_prompt(engine):
    ids = PROMPTS[2]
    row = Row(prompt_ids=ids, mixture=MIXES[1], params=GenerationConfig(max_new_tokens=0), logprobs=3, echo=True)
    other = Row(
        prompt_ids=PROMPTS[1], mixture={}, params=GenerationConfig(max_new_tokens=0), logprobs=0, echo=True
    )  # padding beside it
    with device_checked():
        batch = engine.prefill([row, other])
    assert Engine.drop_finished(batch) is None and row.tokens == [] and row.finish_reason == "length"
    engine.release()
    dense = engine.dense([row])
    with engine.fused.routed(dense):
        want = torch.log_softmax(engine.model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    # A log-probability is a logit minus a log-sum-exp of logits: twice the logits' tolerance.
    tol = 2 * ATOL[engine.model.dtype]
    assert row.prompt_logprobs[0] is None and len(row.prompt_logprobs) == len(ids)
    for j, lp in enumerate(row.prompt_logprobs[1:]):
        assert lp.token == ids[j + 1] and lp.logprob == pytest.approx(float(want[j, ids[j + 1]]), abs=tol)
        assert [t for t, _ in lp.top] == want[j].topk(3).indices.tolist()


def test_bad_rows_are_refused():
    with pytest.raises(ValueError, match="at least one prompt token"):
        Row(prompt_ids=[], mixture={}, params=GenerationConfig(max_new_tokens=1))
    with pytest.raises(ValueError, match=r"logprobs must be in \[0, 20\]"):
        Row(prompt_ids=[1], mixture={}, params=GenerationConfig(max_new_tokens=1), logprobs=21)


# ---- mid-decode switches (sentence routing) ----------------------------------------------------------


def _planned(plan: dict[int, dict]):
    """A `Row.reroute` that switches to plan[k] once the row holds k answer tokens (no router needed)."""
    fed: list[int] = []

    def reroute(token: int):
        fed.append(token)
        return plan.get(len(fed))

    return reroute


def _switched_alone(
    engine: Engine, row_ids: list[int], first: dict, plan: dict[int, dict], max_tokens: int
) -> list[int]:
    """The reference: one row alone, greedy, each mixture in its own `routed` block over the same KV cache
    (the forward on answer token k - 1 is the first under plan[k])."""
    from contextlib import ExitStack

    model, tokens = engine.model, []
    ids = torch.tensor([row_ids])
    mask = torch.ones_like(ids)
    positions = torch.arange(len(row_ids))[None]
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(
            engine.fused.routed(
                engine.dense([Row(prompt_ids=row_ids, mixture=first, params=GenerationConfig(max_new_tokens=1))])
            )
        )
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        while len(tokens) < max_tokens:
            token = out.logits[:, -1].argmax(-1)
            if int(token) in engine.eos:
                break
            tokens.append(int(token))
            if len(tokens) in plan:
                stack.close()
                stack.enter_context(
                    engine.fused.routed(
                        engine.dense(
                            [
                                Row(
                                    prompt_ids=row_ids,
                                    mixture=plan[len(tokens)],
                                    params=GenerationConfig(max_new_tokens=1),
                                )
                            ]
                        )
                    )
                )
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = model(
                input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True
            )
    return tokens


@pytest.mark.parametrize(
    "path, neighbours", [("gathered", True), ("dense", True), ("merged", False), ("auto", True), ("auto", False)]
)
def test_a_row_switching_mixture_mid_decode_equals_the_reference(adapter_dirs, dtype, path, neighbours):
    """A row whose `reroute` changes its mixture twice equals the block-by-block reference on every fusion
    path; the rows beside it (joining, leaving) answer as alone; the switches are recorded."""
    from dlp_lora.config import FusionConfig

    engine = Engine(FusedLoRAModel(tiny_llama(dtype=dtype), adapter_dirs, FusionConfig(path=path)), _Tok())
    plan = {2: {"b": 0.3, "c": 0.7}, 5: {"c": 1.0}}
    want = _switched_alone(engine, PROMPTS[0], MIXES[0], plan, 9)
    assert len(want) > 5, "the row ends before its second switch: the test would prove less"
    row = Row(
        prompt_ids=PROMPTS[0], mixture=MIXES[0], params=GenerationConfig(max_new_tokens=9), reroute=_planned(plan)
    )
    others = [
        Row(prompt_ids=p, mixture=m, params=GenerationConfig(max_new_tokens=n))
        for p, m, n in zip(PROMPTS[1:], MIXES[1:], LIMITS[1:])
    ]
    refs = [_alone(engine.fused, engine.tokenizer, p, m, n) for p, m, n in zip(PROMPTS[1:], MIXES[1:], LIMITS[1:])]
    with device_checked():
        batch = engine.prefill([row] + others[:1] if neighbours else [row])
        step = 0
        while batch is not None:
            step += 1
            if neighbours and step == 3:  # two more rows join after the first switch
                batch = Engine.merge(batch, engine.prefill(others[1:]))
            engine.decode(batch)
            batch = Engine.drop_finished(batch)
    engine.release()
    assert row.tokens == want
    assert row.switches == [(2, plan[2]), (5, plan[5])] and row.mixture == plan[5]
    for other, ref in zip(others if neighbours else [], refs):
        assert other.tokens == ref and other.switches == []


def _scoring(ids, mixture, max_tokens=1, top=1) -> Row:
    return Row(
        prompt_ids=ids, mixture=mixture, params=GenerationConfig(max_new_tokens=max_tokens), logprobs=top, echo=True
    )


def test_scoring_on_cached_prefixes_equals_scoring_alone(engine):
    """Options of one question (a shared context, each option appended) scored through a prefix cache, in
    one call or across calls, beside other mixtures and short prompts, get what each gets prefilled alone:
    every prompt log-probability, its alternatives and the first new token; only the shared context is
    reused, only under the same mixture."""
    from dlp_lora.prefixes import PrefixCache

    context = [5, 9, 17, 33, 40, 41, 7, 8, 9, 10, 11]
    options = [[12, 13], [14], [15, 16, 17, 18], [12, 19]]
    make = [
        lambda: _scoring(context + options[0], MIXES[1], top=2),
        lambda: _scoring(context + options[1], MIXES[1], max_tokens=0, top=2),
        lambda: _scoring(context + options[2], MIXES[0]),  # another mixture: no reuse
        lambda: _scoring([3, 4], MIXES[1]),  # too short to share
        lambda: _scoring(context + options[3], MIXES[1], top=1),
        lambda: _scoring(context + options[2], MIXES[1], top=3),  # more alternatives than cached: no reuse
        lambda: Row(  # a seeded sample draws from its own generator, cached prefix or not
            prompt_ids=context + options[0] + [20],
            mixture=MIXES[1],
            params=GenerationConfig(max_new_tokens=1, do_sample=True, temperature=1.0, seed=7),
            logprobs=1,
            echo=True,
        ),
    ]
    want = []
    for f in make:
        row = f()
        with device_checked():
            engine.prefill([row])
        want.append(row)
    engine.release()
    prefixes = PrefixCache(max_tokens=64, min_shared=4)
    first = [f() for f in make[:4]]
    with device_checked():
        engine.score(first, prefixes)
        later = [f() for f in make[4:]]
        engine.score(later, prefixes)
    tol = 2 * ATOL[engine.model.dtype]
    for got, ref in zip(first + later, want):
        assert got.done and got.tokens == ref.tokens and got.finish_reason == ref.finish_reason
        assert len(got.prompt_logprobs) == len(ref.prompt_logprobs) and got.prompt_logprobs[0] is None
        for a, b in zip(got.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
            assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=tol)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    # Options 1 and 3 reused option 0's context (one in the same call; 3 also its first token, 12), the
    # sampled row all of option 0; the other mixture, the short prompt and the one asking more
    # alternatives did not.
    assert prefixes.hits == 3 and prefixes.reused_tokens == len(context) + (len(context) + 1) + (len(context) + 2)


def test_prefix_cache_keeps_its_token_budget_and_forgets_on_clear():
    from dlp_lora.prefixes import CachedPrompt, PrefixCache

    def entry(ids):
        kv = [torch.zeros(1, 1, len(ids), 2)]
        return CachedPrompt(ids=ids, keys=kv, values=kv, logprobs=[None] * len(ids), top=0)

    cache = PrefixCache(max_tokens=10, min_shared=2)
    cache.store("m", entry([1, 2, 3, 4]))
    cache.store("m", entry([1, 2, 5, 6, 7]))
    assert cache.lookup("m", [1, 2, 3, 9], 0)[1] == 3 and cache.lookup("x", [1, 2, 3, 9], 0) is None
    cache.store("m", entry([8, 9, 1]))  # over 10 tokens: the least recently used ([1, 2, 5, 6, 7]) leaves
    assert cache.tokens == 7 and len(cache) == 2 and cache.lookup("m", [1, 2, 5, 6], 0)[1] == 2
    cache.store("m", entry(list(range(20))))  # longer than the whole budget: not kept
    assert cache.tokens == 7
    cache.clear()
    assert len(cache) == 0 and cache.tokens == 0 and cache.lookup("m", [1, 2, 3, 9], 0) is None
    with pytest.raises(ValueError, match="min_shared >= 2"):
        PrefixCache(max_tokens=8, min_shared=1)
