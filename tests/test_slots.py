"""The compiled running batch on a static KV cache (`slots.SlotBatch`) answers what each row answers alone:
rows join and leave at different steps, the slot count grows and shrinks, the cache's columns move right
(a long prompt joins) and left (the cache is full), and a batch goes eager when a row does not fit.

Logic tests compile with dynamo's "eager" backend and count graphs (one per slot count, whatever joins,
leaves or mixtures); one test builds real inductor kernels when a C++ compiler is on PATH."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import tiny_llama
from test_engine import _Tok
from torch._dynamo.testing import CompileCounter

from dlp_lora import FusedLoRAModel
from dlp_lora.config import GenerationConfig
from dlp_lora.engine import Engine, Row
from dlp_lora.slots import SlotBatch

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")


PROMPTS = [[5, 9, 17, 33], [40, 41], [7, 8, 9, 10, 11, 12, 13], [3], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69]]
MIXES = [{"a": 1.0}, {"b": 0.3, "c": 0.7}, {}, {"a": 0.5, "c": 0.5}, {"c": 1.0}]
LIMITS = [9, 4, 7, 12, 6]


def _rows(idx: list[int], logprobs: int | None = None) -> list[Row]:
    return [
        Row(
            prompt_ids=PROMPTS[i],
            mixture=MIXES[i],
            params=GenerationConfig(max_new_tokens=LIMITS[i], ignore_eos=True),
            logprobs=logprobs,
        )
        for i in idx
    ]


def _drive(engine: Engine, slots: SlotBatch, rows: list[Row], joins: dict[int, list[int]]) -> list[int]:
    """Row i joins (prefilled on its own) before step joins[i]; returns the live count at each step."""
    sizes, step = [], 0
    waiting = dict(joins)
    while waiting or len(slots):
        arriving = [rows[i] for i, s in list(waiting.items()) if s <= step]
        for row in arriving:
            del waiting[rows.index(row)]
        if arriving:
            new = Engine.drop_finished(engine.prefill(arriving))
            if new is not None:
                slots.join(new)
        if len(slots):
            sizes.append(len(slots.rows))
            slots.decode()
            slots.drop_finished()
        step += 1
    engine.release()
    return sizes


@pytest.fixture
def engine(adapter_dirs):
    return Engine(FusedLoRAModel(tiny_llama(), adapter_dirs), _Tok())


def _refs(engine: Engine) -> list[list[int]]:
    out = []
    for p, m, n in zip(PROMPTS, MIXES, LIMITS):
        row = Row(prompt_ids=p, mixture=m, params=GenerationConfig(max_new_tokens=n, ignore_eos=True))
        batch = engine.prefill([row])
        while batch is not None:
            engine.decode(batch)
            batch = Engine.drop_finished(batch)
        engine.release()
        out.append(row.tokens)
    return out


def test_rows_joining_and_leaving_answer_as_alone_with_one_graph_per_slot_count(engine):
    refs = _refs(engine)
    counter = CompileCounter()
    slots = SlotBatch(engine, sizes=(1, 2, 4), length=32, backend=counter)
    rows = _rows(list(range(5)))
    sizes = _drive(engine, slots, rows, {0: 0, 1: 2, 2: 3, 3: 3, 4: 5})
    for row, ref in zip(rows, refs):
        assert row.tokens == ref and row.finish_reason == "length"
    assert set(sizes) == {1, 2, 4}  # the slot count grew and shrank
    assert counter.frame_count == 3  # one graph per slot count: joins, leaves and new mixtures reuse it


def test_a_full_cache_moves_left_and_a_long_prompt_moves_it_right(engine):
    refs = _refs(engine)
    # 20 columns: row 3 (1 + 12 tokens) runs past the end while others join; row 4's 10-token prompt
    # joins when the write column is shorter than it.
    slots = SlotBatch(engine, sizes=(4,), length=20, backend="eager")
    rows = _rows(list(range(5)))
    _drive(engine, slots, rows, {3: 0, 1: 1, 0: 4, 4: 6, 2: 9})
    for row, ref in zip(rows, refs):
        assert row.tokens == ref


def test_logprobs_equal_the_eager_batch(engine):
    eager = _rows([0, 1, 4], logprobs=2)
    batch = engine.prefill(eager)
    while batch is not None:
        engine.decode(batch)
        batch = Engine.drop_finished(batch)
    engine.release()
    slotted = _rows([0, 1, 4], logprobs=2)
    _drive(engine, SlotBatch(engine, sizes=(4,), length=32, backend="eager"), slotted, {0: 0, 1: 0, 2: 0})
    for a, b in zip(eager, slotted):
        assert [t.token for t in a.token_logprobs] == [t.token for t in b.token_logprobs]
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in b.token_logprobs]), torch.tensor([t.logprob for t in a.token_logprobs])
        )


def test_the_step_after_the_cache_moves_left_sees_every_column(engine):
    """Log-probabilities, not only tokens, equal each row's eager run when a full cache moves left mid-answer:
    the step that moves must attend with the moved mask (a stale one hides the row's first columns)."""
    refs = []
    for i in (3, 0):
        (row,) = _rows([i], logprobs=2)
        batch = engine.prefill([row])
        while batch is not None:
            engine.decode(batch)
            batch = Engine.drop_finished(batch)
        engine.release()
        refs.append(row)
    slotted = _rows([3, 0], logprobs=2)
    # 14 columns: row 3 (1 + 12 tokens) starts at column 0; row 0 (4 + 9) joins 8 steps later, so the write
    # column reaches 14 while row 0 still answers and the cache moves left.
    _drive(engine, SlotBatch(engine, sizes=(2,), length=14, backend="eager"), slotted, {0: 0, 1: 8})
    for a, b in zip(refs, slotted):
        assert [t.token for t in a.token_logprobs] == [t.token for t in b.token_logprobs]
        torch.testing.assert_close(
            torch.tensor([t.logprob for t in b.token_logprobs]), torch.tensor([t.logprob for t in a.token_logprobs])
        )


def test_rows_that_do_not_fit_are_refused_and_the_batch_converts_to_eager(engine):
    refs = _refs(engine)
    slots = SlotBatch(engine, sizes=(2,), length=16, backend="eager")
    rows = _rows([0, 1])
    long_row = Row(prompt_ids=PROMPTS[2], mixture={}, params=GenerationConfig(max_new_tokens=20))
    assert slots.fits(_rows([4])[0]) and not slots.fits(long_row)  # 10 + 6 columns fit 16; 7 + 20 do not
    slots.join(engine.prefill(rows))
    for _ in range(2):
        slots.decode()
    with pytest.raises(ValueError, match="fit"):
        slots.join(engine.prefill([long_row]))
    batch = slots.to_running()
    assert len(slots) == 0 and len(batch) == 2
    while batch is not None:  # the rows go on eagerly where they stopped
        engine.decode(batch)
        batch = Engine.drop_finished(batch)
    engine.release()
    assert [r.tokens for r in rows] == refs[:2]


def test_bad_settings_are_refused(engine):
    with pytest.raises(ValueError, match="sizes"):
        SlotBatch(engine, sizes=(), backend="eager")
    with pytest.raises(ValueError, match="length"):
        SlotBatch(engine, sizes=(1,), length=1, backend="eager")
    slots = SlotBatch(engine, sizes=(1,), length=32, backend="eager")
    with pytest.raises(ValueError, match="do not fit 1 slots"):
        slots.join(engine.prefill(_rows([0, 1])))
    with pytest.raises(ValueError, match="live row"):
        slots.decode()


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "clang++", "c++")), reason="no C++ compiler")
def test_inductor_kernels_decode_what_the_eager_batch_decodes(engine):
    refs = _refs(engine)
    slots = SlotBatch(engine, sizes=(2,), length=32)
    assert slots.warm().keys() == {2}
    rows = _rows([0, 1])
    _drive(engine, slots, rows, {0: 0, 1: 1})
    assert [r.tokens for r in rows] == refs[:2]


def test_an_eager_batch_mid_decode_moves_into_the_slots(engine):
    """The server's way back: rows decoded eagerly for a while (merged at different steps, so left padded)
    join the slots with their whole context and go on as if nothing moved."""
    refs = _refs(engine)
    rows = _rows([0, 1, 2])
    batch = engine.prefill(rows[:1])
    engine.decode(batch)
    batch = Engine.merge(batch, engine.prefill(rows[1:]))
    engine.decode(batch)
    slots = SlotBatch(engine, sizes=(4,), length=32, backend="eager")
    slots.join(Engine.drop_finished(batch))
    while len(slots):
        slots.decode()
        slots.drop_finished()
    engine.release()
    assert [r.tokens for r in rows] == refs[:3]
