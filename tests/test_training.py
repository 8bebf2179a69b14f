"""Adapter training: batching, the schedule, one LoRA trained on a tiny model with the real tokenizer (dev curve,
best checkpoint, resume), the deployment gate (gate split or dev) and collapse check, pool resume."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_vocab_model
from safetensors.torch import load_file

from dlp_lora import FusedLoRAModel
from dlp_lora.assets import Manifest
from dlp_lora.chat import RAW_LAYOUTS, chat_prompt, raw_prompt
from dlp_lora.config import AdapterTrainConfig, SplitConfig
from dlp_lora.models import EMBEDDED_MODEL_ID, load_tokenizer
from dlp_lora.tasks import Example, Task
from dlp_lora.tasks.loaders import resolve_data_dir, user_file
from dlp_lora.training import pool
from dlp_lora.training.adapters import STATE_FILE, lr_factor, planned_steps, train_adapter
from dlp_lora.training.batching import bucketed_batches, collate, encode_examples
from dlp_lora.training.gate import COLLAPSE_SHARE, collapsed, deployment_gate, gate_table

# Library noise on every step of the tiny runs (float(loss) on a graph tensor; a transformers deprecation).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad:UserWarning",
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _examples(n: int, answer: str = "blue") -> list[Example]:
    return [
        Example(
            uid=f"colour/{i}", task="colour", prompt=f"What colour is item {i}?", answer=answer, references=(answer,)
        )
        for i in range(n)
    ]


def _task(examples: list[Example]) -> Task:
    return Task(name="colour", kind="qa", source="test", metric="exact", load=lambda root: examples, max_new_tokens=4)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- batching


def _batch(tok, examples, max_length):
    return collate(encode_examples(tok, examples, max_length), tok.pad_token_id)


def test_collate_masks_prompt_and_pads_right(tok):
    long_ex = Example(
        uid="t/0", task="t", prompt="What is two plus two, written as a digit?", answer="4", references=("4",)
    )
    short_ex = Example(uid="t/1", task="t", prompt="Hi?", answer="Hello there", references=("Hello there",))
    batch = _batch(tok, [long_ex, short_ex], max_length=256)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.dtype == labels.dtype == torch.long
    lengths = mask.sum(1).tolist()
    assert lengths[0] == ids.shape[1] > lengths[1]  # the longest row sets the width
    for b, ex in enumerate((long_ex, short_ex)):
        n = lengths[b]
        assert mask[b, :n].eq(1).all() and mask[b, n:].eq(0).all()  # right padding
        assert ids[b, n:].eq(tok.pad_token_id).all() and labels[b, n:].eq(-100).all()
        kept = labels[b, :n] != -100
        n_prompt = int((~kept).sum())
        assert kept[n_prompt:].all()  # one masked prefix, then only answer tokens
        assert tok.decode(ids[b, :n_prompt]) == chat_prompt(tok, ex.prompt)
        assert torch.equal(labels[b, n_prompt:n], ids[b, n_prompt:n])
        assert tok.decode(labels[b, n_prompt:n]) == ex.answer + tok.eos_token
        assert int(labels[b, n - 1]) == tok.eos_token_id


def test_encode_truncates_the_prompt_head_not_the_answer(tok):
    prompt = " ".join(f"filler{i}" for i in range(200)) + " Which colour is the sky?"
    ex = Example(uid="t/0", task="t", prompt=prompt, answer="blue", references=("blue",))
    (row,) = encode_examples(tok, [ex], max_length=32)
    assert row.truncated and len(row.ids) == 32
    batch = collate([row], tok.pad_token_id)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    answer = _ids(tok, "blue" + tok.eos_token)
    assert labels[-len(answer) :].tolist() == answer and labels[: -len(answer)].eq(-100).all()
    # The prompt keeps its tail (question, then the assistant turn) and loses its head (system turn).
    full_prompt = _ids(tok, chat_prompt(tok, prompt))
    assert ids[: 32 - len(answer)].tolist() == full_prompt[-(32 - len(answer)) :]
    assert "sky?" in tok.decode(ids[: 32 - len(answer)]) and "SmolLM" not in tok.decode(ids)
    assert not encode_examples(tok, _examples(1), max_length=256)[0].truncated


def test_encode_writes_each_example_once_per_format(tok):
    """'raw' rows are a raw-completion layout + " answer\n" + EOS (what /v1/completions clients send and
    stop at); the chat rows are unchanged and come first."""
    examples = _examples(6)
    chat_only = encode_examples(tok, examples, max_length=256)
    both = encode_examples(tok, examples, max_length=256, formats=("chat", "raw"), seed=1)
    assert len(both) == 12 and both[:6] == chat_only
    layouts = set()
    for ex, row in zip(examples, both[6:]):
        prompt, answer = tok.decode(row.ids[: row.n_prompt]), tok.decode(row.ids[row.n_prompt :])
        assert answer == " " + ex.answer + "\n" + tok.eos_token
        layouts.add(next(i for i in range(len(RAW_LAYOUTS)) if prompt == raw_prompt(ex.prompt, i)))
        assert "<|im_start|>" not in prompt
    assert len(layouts) > 1  # layouts are drawn per example
    with pytest.raises(ValueError, match="unknown training format 'json'"):
        encode_examples(tok, examples, max_length=256, formats=("json",))
    with pytest.raises(ValueError, match="formats must be distinct names"):
        AdapterTrainConfig(formats=("chat", "chat"))


def test_encode_caps_an_overlong_answer_at_half_the_length(tok):
    answer = " ".join(["red"] * 60)
    ex = Example(uid="t/0", task="t", prompt="Say red many times.", answer=answer, references=(answer,))
    batch = _batch(tok, [ex], max_length=40)
    labels = batch["labels"][0]
    kept = labels[labels != -100].tolist()
    assert len(kept) == 20 and kept == _ids(tok, answer + tok.eos_token)[:20]
    assert batch["input_ids"].shape == (1, 40)


def test_bucketed_batches_cover_every_row_once_per_epoch_and_group_lengths():
    lengths = [(i * 37) % 101 for i in range(100)]
    batches = bucketed_batches(lengths, batch_size=4, seed=3, epochs=2, bucket_batches=5)
    assert len(batches) == 2 * 25 and all(len(b) == 4 for b in batches)
    for epoch in (batches[:25], batches[25:]):
        assert sorted(i for b in epoch for i in b) == list(range(100))
    # Padding: rows sorted within windows of 20 waste far less than a plain shuffle would.
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    shuffled = [list(range(100))[i : i + 4] for i in range(0, 100, 4)] * 2
    plain = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in shuffled)
    assert waste < plain / 3
    assert batches == bucketed_batches(lengths, batch_size=4, seed=3, epochs=2, bucket_batches=5)  # seeded
    assert batches != bucketed_batches(lengths, batch_size=4, seed=4, epochs=2, bucket_batches=5)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = AdapterTrainConfig(warmup_ratio=0.1, min_lr_ratio=0.1)
    factors = [lr_factor(s, 100, cfg) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)  # 10 warmup steps
    assert all(a <= b for a, b in zip(factors[:10], factors[1:10]))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # monotone decay
    assert factors[100] == pytest.approx(0.1)
    assert planned_steps(100, AdapterTrainConfig(batch_size=8, epochs=3, max_steps=1000)) == 3 * 13
    assert planned_steps(10_000, AdapterTrainConfig(batch_size=8, epochs=3, max_steps=150)) == 150


# ---------------------------------------------------------------- train_adapter

FAST = AdapterTrainConfig(
    r=4,
    alpha=8,
    dropout=0.0,
    target_modules=("q_proj", "v_proj", "o_proj", "down_proj"),
    epochs=30,
    batch_size=2,
    lr=0.3,
    max_length=64,
    eval_every=15,
    patience=10,
)


@pytest.fixture(scope="module")
def trained(tok, tmp_path_factory):
    """One adapter trained on a tiny model: (model, snapshot of its weights before, record, adapter dir)."""
    model = tiny_vocab_model(len(tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = _examples(6)
    out = tmp_path_factory.mktemp("adapter") / "colour"
    record = train_adapter(model, tok, _task(examples), examples[:4], examples[4:], out, FAST, progress=False)
    return model, before, record, out


def test_train_adapter_loss_goes_down_and_record_is_complete(trained):
    _, _, record, _ = trained
    assert record["final_train_loss"] < record["first_train_loss"] - 0.1
    assert record["steps"] == record["planned_steps"] == 30 * 2  # 30 epochs of 4 examples in batches of 2
    assert (record["task"], record["kind"], record["train_examples"], record["dev_examples_scored"]) == (
        "colour",
        "qa",
        4,
        2,
    )
    assert (record["r"], record["alpha"], record["lr"], record["target_modules"]) == (
        4,
        8,
        0.3,
        ["q_proj", "v_proj", "o_proj", "down_proj"],
    )
    # The dev curve: step 0 (the base model) then every eval_every steps; the best one is saved.
    curve = record["dev_curve"]
    assert [c["step"] for c in curve] == [0, 15, 30, 45, 60] and curve[0]["train_loss"] is None
    assert record["best_step"] in {c["step"] for c in curve} and record["best_step"] > 0
    best = next(c["dev"] for c in curve if c["step"] == record["best_step"])
    assert best == max(c["dev"] for c in curve) > curve[0]["dev"]  # it learnt the answer, the base did not
    assert len(record["dev_scores"]) == len(record["base_dev_scores"]) == 2
    assert sum(record["dev_scores"]) / 2 == best and sum(record["base_dev_scores"]) / 2 == curve[0]["dev"]
    assert record["dev"] == {"em": best} and record["tokens_per_second"] > 0


def test_train_adapter_saves_an_fp16_peft_directory(trained):
    _, _, _, out = trained
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "o_proj", "down_proj"}
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 2 * 4  # A and B, 2 layers, 4 target modules
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    b_norm = sum(float(t.float().abs().sum()) for k, t in tensors.items() if "lora_B" in k)
    assert b_norm > 0  # B starts at zero: a trained adapter has moved it


def test_train_adapter_leaves_the_base_model_unchanged(trained):
    model, before, _, _ = trained
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_pooled_scores_score_each_example_by_its_own_task(trained, tok):
    from dlp_lora.evaluation.examples import example_scores, pooled_scores

    model = trained[0]
    colour = _examples(3, answer="red")
    count = [Example(uid=f"count/{i}", task="count", prompt=f"Count to {i}.", answer=str(i), references=(str(i),))
             for i in range(3)]  # fmt: skip
    tasks = {"colour": _task(colour), "count": Task("count", "qa", "test", "numeric", lambda root: count, 4)}
    mixed = [colour[0], count[0], count[1], colour[1], colour[2], count[2]]
    got = pooled_scores(model, tok, tasks, mixed)
    want = {name: example_scores(model, tok, tasks[name], [ex for ex in mixed if ex.task == name]) for name in tasks}
    order = {"colour": iter(range(3)), "count": iter(range(3))}
    picks = [(ex.task, next(order[ex.task])) for ex in mixed]
    assert got.headline == [want[t].headline[i] for t, i in picks]
    assert got.chosen == [want[t].chosen[i] for t, i in picks]
    with pytest.raises(ValueError, match=r"examples of tasks \['count'\] but no Task"):
        pooled_scores(model, tok, {"colour": tasks["colour"]}, mixed)


def test_gate_scores_are_the_base_model_and_the_saved_adapter_on_the_gate_split(trained, tok):
    from peft import PeftModel

    from dlp_lora.evaluation.examples import example_scores

    model, before, _, out = trained
    examples = _examples(3, answer="red")
    got = pool.gate_scores(model, tok, _task(examples), out, examples)
    assert got["gate_examples"] == 3 and len(got["gate_scores"]) == len(got["gate_chosen"]) == 3
    assert got["base_gate_scores"] == example_scores(model, tok, _task(examples), examples).headline
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # unloaded afterwards
    adapted = PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    want = example_scores(adapted, tok, _task(examples), examples)
    assert (got["gate_scores"], got["gate_chosen"]) == (want.headline, want.chosen)
    assert got["gate_chosen"] != example_scores(model, tok, _task(examples), examples).chosen  # the adapter acts


def test_trained_adapter_loads_with_fused_lora_model(trained, tok):
    from peft import PeftModel

    model, _, _, out = trained
    ids = torch.tensor([_ids(tok, chat_prompt(tok, "What colour is item 9?"))])
    with torch.no_grad():
        base_logits = model(ids).logits
        reference = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()(ids).logits
        fused = FusedLoRAModel(model, {"colour": out})
        try:
            with fused.routed(torch.ones(1, 1)):
                fused_logits = model(ids).logits
        finally:
            fused.remove()
        restored = model(ids).logits
    assert not torch.allclose(fused_logits, base_logits, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(fused_logits, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(restored, base_logits, atol=0, rtol=0)


def test_train_adapter_twice_on_one_base_model(tok, tmp_path):
    model = tiny_vocab_model(len(tok))
    examples = _examples(4, answer="green")
    cfg = AdapterTrainConfig(r=2, alpha=4, dropout=0.0, epochs=1, batch_size=4, max_length=48)
    train_adapter(model, tok, _task(examples), examples, [], tmp_path / "first", FAST, progress=False)
    record = train_adapter(model, tok, _task(examples), examples, [], tmp_path / "second", cfg, progress=False)
    assert record["dev"] == {} and record["dev_examples_scored"] == 0 and record["steps"] == 1
    assert record["best_step"] == 1  # without dev the last checkpoint is kept
    tensors = load_file(str(tmp_path / "second" / "adapter_model.safetensors"))
    # Only the second run's modules and rank: nothing of the first adapter leaks into it.
    assert {k.split(".")[-3] for k in tensors} == {"q_proj", "v_proj"}
    assert {t.shape for k, t in tensors.items() if "lora_A" in k} == {torch.Size([2, 32])}


def test_train_adapter_can_start_from_another_adapter(tok, tmp_path, trained):
    """init_from: the run starts from the given adapter's weights, takes its shape, and scores the base model
    (not the starting adapter) as step 0's `base_dev_scores`."""
    _, _, first, start_dir = trained
    model = tiny_vocab_model(len(tok))
    examples = _examples(6)
    cfg = AdapterTrainConfig(
        init_from=str(start_dir), lr=1e-12, epochs=1, batch_size=2, max_length=64, eval_every=1, patience=10
    )
    record = train_adapter(
        model, tok, _task(examples), examples[:4], examples[4:], tmp_path / "next", cfg, progress=False
    )
    assert (record["r"], record["alpha"], record["target_modules"]) == (4, 8, sorted(FAST.target_modules))
    assert record["init_from"] == str(start_dir)
    want, got = (load_file(str(d / "adapter_model.safetensors")) for d in (start_dir, tmp_path / "next"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)  # lr ~0: unchanged
    assert record["base_dev_scores"] == first["base_dev_scores"]  # the base model, as in a fresh run
    with pytest.raises(FileNotFoundError, match="init_from: expected a PEFT LoRA directory"):
        train_adapter(
            model,
            tok,
            _task(examples),
            examples,
            [],
            tmp_path / "x",
            replace(cfg, init_from=str(tmp_path)),
            progress=False,
        )


def test_train_adapter_refuses_an_empty_training_split(tok, tmp_path):
    with pytest.raises(ValueError, match="task 'colour': no training examples"):
        train_adapter(
            tiny_vocab_model(len(tok)), tok, _task(_examples(3)), [], _examples(3), tmp_path / "x", FAST, progress=False
        )
    assert not (tmp_path / "x").exists()


def test_interrupted_training_resumes_to_the_same_adapter(tok, tmp_path):
    examples = _examples(6)
    cfg = replace(FAST, epochs=3, eval_every=2)  # 6 steps, checkpoints at 2, 4, 6
    straight = train_adapter(
        tiny_vocab_model(len(tok)),
        tok,
        _task(examples),
        examples[:4],
        examples[4:],
        tmp_path / "straight",
        cfg,
        progress=False,
    )
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed"
    model = tiny_vocab_model(len(tok))
    first = train_adapter(
        model,
        tok,
        _task(examples),
        examples[:4],
        examples[4:],
        out,
        cfg,
        ckpt_dir=ckpt,
        progress=False,
        should_stop=lambda: True,
    )
    assert first is None and (ckpt / STATE_FILE).exists() and not out.exists()  # stopped at the step-2 checkpoint
    assert torch.load(ckpt / STATE_FILE, weights_only=False)["step"] == 2
    with pytest.raises(ValueError, match="made with other settings or data"):
        train_adapter(
            model,
            tok,
            _task(examples),
            examples[:4],
            examples[4:],
            out,
            replace(cfg, lr=0.05),
            ckpt_dir=ckpt,
            progress=False,
        )
    resumed = train_adapter(
        model, tok, _task(examples), examples[:4], examples[4:], out, cfg, ckpt_dir=ckpt, progress=False
    )
    assert not ckpt.exists()  # removed once the adapter is saved
    for key in (
        "steps",
        "best_step",
        "dev_curve",
        "dev_scores",
        "base_dev_scores",
        "first_train_loss",
        "final_train_loss",
    ):
        assert resumed[key] == straight[key], key
    a, b = (
        load_file(str(tmp_path / "straight" / "adapter_model.safetensors")),
        load_file(str(out / "adapter_model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- dev gate and collapse


def test_gate_deploys_only_beyond_noise():
    gain = deployment_gate({"dev_scores": [100.0] * 30 + [0.0] * 10, "base_dev_scores": [0.0] * 30 + [0.0] * 10})
    assert gain["deployed"] and gain["diff"] == 75.0 and gain["low"] > 0
    noise = deployment_gate({"dev_scores": [100.0, 0.0] * 20, "base_dev_scores": [0.0, 100.0] * 10 + [100.0, 0.0] * 10})
    assert not noise["deployed"] and noise["low"] < 0 < noise["high"] and "not better" in noise["reason"]
    worse = deployment_gate({"dev_scores": [0.0] * 40, "base_dev_scores": [100.0] * 40})
    assert not worse["deployed"] and worse["high"] < 0
    assert not deployment_gate({"dev_scores": [], "base_dev_scores": []})["deployed"]


def test_gate_decides_on_the_gate_split_when_the_record_has_one():
    # Dev says the adapter wins (dev also picked its checkpoint); the held-out gate split says it does not.
    record = {
        "dev_scores": [100.0] * 40,
        "base_dev_scores": [0.0] * 40,
        "gate_scores": [100.0, 0.0] * 50,
        "base_gate_scores": [0.0, 100.0] * 25 + [100.0, 0.0] * 25,
    }
    decision = deployment_gate(record)
    assert decision["split"] == "gate" and decision["n"] == 100 and not decision["deployed"]
    del record["gate_scores"]
    decision = deployment_gate(record)
    assert decision["split"] == "dev" and decision["n"] == 40 and decision["deployed"]


def test_gate_refuses_an_adapter_collapsed_onto_one_option():
    gold = [0, 1, 2, 3] * 10
    chosen = [0] * 36 + [1, 2, 3, 1]  # 90% one option: right on every gold-0 prompt only
    scores = [100.0 * (c == g) for c, g in zip(chosen, gold)]
    record = {"dev_scores": scores, "base_dev_scores": [0.0] * 40, "dev_chosen": chosen}
    decision = deployment_gate(record, gold)
    assert collapsed(chosen, gold) and not decision["deployed"] and decision["majority_share"] == 0.9
    assert "collapsed" in decision["reason"]
    # A task whose gold answers are themselves mostly one option may be answered that way.
    assert not collapsed([0] * 40, [0] * 36 + [1] * 4)
    assert not collapsed(gold, gold) and COLLAPSE_SHARE == 0.8


def test_gate_table_lists_each_trained_task_with_its_decision():
    win = {"dev_scores": [100.0] * 30 + [0.0] * 10, "base_dev_scores": [0.0] * 40}
    tie = {"dev_scores": [0.0] * 40, "base_dev_scores": [0.0] * 40}
    records = {
        name: {
            **rec,
            "steps": 42,
            "best_step": 25,
            "dev_curve": [{"step": 0, "dev": 0.0}, {"step": 25, "dev": 75.0}],
            "gate": deployment_gate(rec),
        }
        for name, rec in (("won", win), ("tied", tie))
    }
    rows = gate_table({**records, "router": {"kind": "mini-mlp"}}, ["tied", "untrained", "won"]).splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| tied", "| won"]  # table order; untrained and non-task left out
    assert "| 0, 75 | 25 | 0.0 -> 75.0 | 0.0 -> 75.0 (dev, n=40) | +75.0 [" in rows[1] and rows[1].endswith(
        "| **yes** |"
    )
    assert "| 0 [+0.0, +0.0] | no |" in rows[0]
    gold, chosen = [0, 1] * 20, [0] * 40
    one = {
        "dev_scores": [100.0 * (c == g) for c, g in zip(chosen, gold)],
        "base_dev_scores": [0.0] * 40,
        "dev_chosen": chosen,
    }
    row = gate_table({"one": {**one, "gate": deployment_gate(one, gold)}}, ["one"]).splitlines()[2]
    assert row.endswith("| no: collapsed (100% one option) |")


# ---------------------------------------------------------------- train_pool_adapters (resume)


class _Calls:
    """Test doubles for the expensive parts of train_pool_adapters; they record what they were asked."""

    def __init__(self) -> None:
        self.trained: list[str] = []
        self.gated: list[str] = []
        self.loads = 0

    def load_base_model(self, name=None):
        self.loads += 1
        return "base-model", "tokenizer"

    def train_adapter(
        self,
        model,
        tokenizer,
        task,
        train,
        dev,
        out_dir,
        cfg,
        ckpt_dir=None,
        progress=True,
        on_step=None,
        should_stop=None,
        dev_tasks=None,
    ):
        assert (model, tokenizer) == ("base-model", "tokenizer")
        self.dev = (list(dev), dev_tasks)
        assert Path(ckpt_dir).name == task.name and Path(ckpt_dir).parent.name == "checkpoints"
        self.trained.append(task.name)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "adapter_model.safetensors").write_bytes(b"fake")
        # 'new' ties with the base model on dev (the gate maps it to the base model); the others win.
        won = [0.0 if task.name == "new" else 100.0] * len(dev)
        return {"task": task.name, "train_examples": len(train), "dev_scores": won, "base_dev_scores": [0.0] * len(dev)}

    def gate_scores(self, model, tokenizer, task, adapter_dir, examples):
        assert (model, tokenizer) == ("base-model", "tokenizer") and adapter_dir.name == task.name
        self.gated.append(task.name)
        # As on dev: 'new' ties with the base model on the gate split; the others win.
        won = [0.0 if task.name == "new" else 100.0] * len(examples)
        return {
            "gate_examples": len(examples),
            "gate_scores": won,
            "base_gate_scores": [0.0] * len(examples),
            "gate_chosen": [],
        }


@pytest.fixture
def pool_env(tmp_path, monkeypatch):
    """Four small user tasks, an assets folder where they are in various states, the test doubles in pool."""
    tasks = {}
    for name in ("done", "file_only", "record_only", "new"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"input": f"{name} q{i}?", "output": f"a{i}"}) + "\n" for i in range(10)))
        tasks[name] = Task(name=name, kind="qa", source=str(path), metric="exact", load=user_file(name, path))
    calls = _Calls()
    monkeypatch.setattr(pool, "load_base_model", calls.load_base_model)
    monkeypatch.setattr(pool, "train_adapter", calls.train_adapter)
    monkeypatch.setattr(pool, "gate_scores", calls.gate_scores)
    root = tmp_path / "assets"
    for name in ("done", "file_only"):
        (root / "adapters" / name).mkdir(parents=True)
        (root / "adapters" / name / "adapter_model.safetensors").write_bytes(b"weights")
    Manifest(
        base_model=EMBEDDED_MODEL_ID,
        tasks=["done", "record_only"],
        adapters={"done": "adapters/done", "record_only": "adapters/record_only"},
        records={
            "done": {"task": "done", "kept": True, "gate_examples": 0},
            "record_only": {"task": "record_only", "gate_examples": 0},
        },
    ).save(root)
    return root, tasks, calls


def test_pool_resume_skips_only_finished_tasks(pool_env, tmp_path):
    root, tasks, calls = pool_env
    split = SplitConfig(train_cap=5, dev_size=3, test_size=2)
    manifest = pool.train_pool_adapters(root, list(tasks.values()), data_dir=tmp_path, split_cfg=split, progress=False)
    # 'done' has both its adapter file and its gated record; the others miss one of them.
    assert calls.trained == ["file_only", "record_only", "new"] and calls.loads == 1
    assert calls.gated == ["file_only", "record_only", "new"]
    assert manifest.records["done"] == {"task": "done", "kept": True, "gate_examples": 0}  # untouched
    # 10 examples: test 2, dev 1, train 5 and the 2 left over are the gate split the decision is made on.
    assert {"train": 5, "dev": 1, "test": 2, "gate": 2}.items() <= manifest.records["new"]["splits"].items()
    assert manifest.records["new"]["gate"]["split"] == "gate" and manifest.records["new"]["gate"]["n"] == 2
    saved = Manifest.load(root)
    assert sorted(saved.tasks) == sorted(tasks) and len(saved.tasks) == 4
    assert set(saved.records) == set(tasks)
    # The dev gate: 'file_only' beat the base model and is deployed; 'new' did not and is served by the base.
    assert saved.records["file_only"]["gate"]["deployed"] and saved.adapters["file_only"] == "adapters/file_only"
    assert not saved.records["new"]["gate"]["deployed"] and saved.adapters["new"] is None
    assert "new" not in saved.deployed and "file_only" in saved.deployed

    # A second run finds everything finished: no model load, no training.
    pool.train_pool_adapters(root, list(tasks.values()), data_dir=tmp_path, split_cfg=split, progress=False)
    assert calls.trained == ["file_only", "record_only", "new"] and calls.loads == 1


def test_pool_gates_a_trained_task_whose_record_predates_the_gate_split(pool_env, tmp_path):
    root, tasks, calls = pool_env
    manifest = Manifest.load(root)
    manifest.records["done"] = {"task": "done", "dev_scores": [100.0], "base_dev_scores": [0.0]}  # no gate_examples
    manifest.save(root)
    split = SplitConfig(train_cap=5, dev_size=3, test_size=2)
    manifest = pool.train_pool_adapters(root, [tasks["done"]], data_dir=tmp_path, split_cfg=split, progress=False)
    assert calls.trained == [] and calls.gated == ["done"]  # scored on the gate split, not retrained
    assert manifest.records["done"]["gate"]["split"] == "gate" and manifest.records["done"]["dev_scores"] == [100.0]
    # With no gate split (gate_size 0) the decision falls back to dev.
    manifest.records["done"].pop("gate_examples")
    manifest.save(root)
    manifest = pool.train_pool_adapters(
        root,
        [tasks["done"]],
        data_dir=tmp_path,
        progress=False,
        split_cfg=SplitConfig(train_cap=5, dev_size=3, test_size=2, gate_size=0),
    )
    assert calls.gated == ["done"] and manifest.records["done"]["gate_examples"] == 0


def test_pool_unknown_task_fails_before_any_training(pool_env, tmp_path):
    root, tasks, calls = pool_env
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        pool.train_pool_adapters(root, [tasks["new"], "nope"], data_dir=tmp_path, progress=False)
    assert calls.trained == [] and calls.loads == 0
    assert "new" not in Manifest.load(root).records


def test_pool_refuses_a_folder_of_another_base_model(pool_env, tmp_path):
    root, tasks, calls = pool_env
    with pytest.raises(
        ValueError,
        match=r"holds adapters for base model 'embedded:SmolLM2-135M-Instruct', "
        r"not 'other/model'",
    ):
        pool.train_pool_adapters(root, [tasks["new"]], data_dir=tmp_path, base_model="other/model", progress=False)
    assert calls.trained == [] and calls.loads == 0


def test_multitask_baseline_trains_once_on_every_task_and_is_recorded(tmp_path, monkeypatch):
    try:
        resolve_data_dir()
    except FileNotFoundError:
        pytest.skip("../shared/data is not present")
    calls = _Calls()
    monkeypatch.setattr(pool, "load_base_model", calls.load_base_model)
    monkeypatch.setattr(pool, "train_adapter", calls.train_adapter)
    root = tmp_path / "assets"
    # A router with a `none` class puts it last in the tasks, with no adapter and no data to train on.
    Manifest(
        base_model=EMBEDDED_MODEL_ID,
        tasks=["bbh_navigate", "bbh_snarks", "none"],
        adapters={"bbh_navigate": "adapters/bbh_navigate", "bbh_snarks": "adapters/bbh_snarks", "none": None},
    ).save(root)
    split = SplitConfig(train_cap=5)
    manifest = pool.train_pool_multitask(root, split_cfg=split, progress=False)
    assert calls.trained == ["multitask"] and manifest.records["multitask"]["train_examples"] == 10
    assert Manifest.load(root).baselines == {"multitask": "baselines/multitask"}
    assert calls.dev == ([], None)  # no dev curve by default: the last step is kept
    pool.train_pool_multitask(root, split_cfg=split, progress=False)  # finished: skipped
    assert calls.trained == ["multitask"] and calls.loads == 1
    # With a dev curve: the first N dev examples of every class with a gate split, each with its own task.
    pool.train_pool_multitask(root, split_cfg=split, name="generalist", progress=False, dev_per_task=2)
    dev, dev_tasks = calls.dev
    assert [ex.task for ex in dev] == ["bbh_navigate"] * 2 + ["bbh_snarks"] * 2 and set(dev_tasks) == {
        "bbh_navigate",
        "bbh_snarks",
    }
    # Classes without a gate split keep their dev examples clean for the choices made on them.
    no_gate = SplitConfig(train_cap=5, gate_size=0)
    pool.train_pool_multitask(root, split_cfg=no_gate, name="generalist2", progress=False, dev_per_task=2)
    assert calls.dev == ([], None)


def test_bundled_assets_deploy_no_collapsed_or_ungated_adapter():
    # On the real trained records: every deployed multiple-choice adapter answers more than one option on
    # dev (a collapsed adapter must have been gated out), and the manifest maps exactly the gated tasks to
    # the base model.
    from pathlib import Path

    from dlp_lora.assets import Manifest
    from dlp_lora.tasks import get_task, load_splits
    from dlp_lora.tasks.loaders import resolve_data_dir

    root = Path(__file__).resolve().parents[1] / "assets" / "smollm2-135m-26tasks"
    manifest = Manifest.load(root)
    gated = {t: r for t, r in manifest.records.items() if "gate" in r}
    if not gated:
        pytest.skip("the bundled assets predate the dev gate")
    for name, rec in gated.items():
        assert (manifest.adapters[name] is not None) == rec["gate"]["deployed"], name
        if rec["gate"]["deployed"] and rec["kind"] == "mcq":
            try:
                dev = load_splits(
                    get_task(name),
                    resolve_data_dir(),
                    SplitConfig(**{k: rec["splits"][k] for k in ("train_cap", "dev_size", "test_size", "seed")}),
                ).dev
            except FileNotFoundError:
                pytest.skip("../shared/data is not present")
            gold = [ex.gold_index for ex in dev[: len(rec["dev_chosen"])]]
            assert not collapsed(rec["dev_chosen"], gold), (name, rec["gate"])
