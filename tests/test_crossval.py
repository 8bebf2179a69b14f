"""Cross-validated generalist scores on small classes (issue 23): folds, no example scored by a generalist
that trained on it, resume, and the choice they feed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dlp_lora.assets import Manifest
from dlp_lora.config import AdapterTrainConfig, SplitConfig
from dlp_lora.evaluation.examples import ExampleScores
from dlp_lora.models import EMBEDDED_MODEL_ID
from dlp_lora.tasks import Task
from dlp_lora.tasks.loaders import user_file
from dlp_lora.training import choice as choice_mod
from dlp_lora.training import crossval
from dlp_lora.training.choice import BASE, apply_choices, choice_table, cross_validated

SPLIT = SplitConfig(train_cap=20, dev_size=5, test_size=6, gate_size=0)


def test_folds_are_balanced_seeded_and_checked():
    folds = crossval.fold_assignment(23, 5, seed=0)
    assert sorted({f: folds.count(f) for f in range(5)}.values()) == [4, 4, 5, 5, 5]
    assert folds == crossval.fold_assignment(23, 5, seed=0) != crossval.fold_assignment(23, 5, seed=1)
    with pytest.raises(ValueError, match="2 <= k <= examples, got k=6 for 5"):
        crossval.fold_assignment(5, 6, seed=0)


def test_recipe_of_a_record_rebuilds_its_config():
    rec = {"r": 64, "alpha": 128, "max_steps": 150, "target_modules": ["q_proj", "v_proj"], "task": "multitask"}
    cfg = crossval.recipe_of(rec)
    assert (cfg.r, cfg.alpha, cfg.max_steps, cfg.target_modules) == (64, 128, 150, ("q_proj", "v_proj"))
    assert cfg.formats == AdapterTrainConfig().formats  # a record older than the field keeps the default


class _Doubles:
    """Stand-ins for the model, training and scoring. A fold generalist's score on an example is 100 when the
    example's answer ends in an even digit, so the reassembled scores are checkable; training records what each
    fold generalist saw, and scoring asserts it never scores an example that generalist trained on."""

    def __init__(self) -> None:
        self.trained: dict[str, list[str]] = {}
        self.scored: list[tuple[str, str]] = []
        self.loads = 0

    def load_base_model(self, name=None):
        self.loads += 1
        return "base-model", "tokenizer"

    def train_adapter(self, model, tok, task, train, dev, out_dir, cfg, ckpt_dir=None, progress=True):
        assert cfg.r == 64 and dev == []
        self.trained[Path(out_dir).name] = [ex.prompt for ex in train]
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "adapter_model.safetensors").write_bytes(b"fake")

    class PeftModel:
        @staticmethod
        def from_pretrained(model, path):
            return _Adapted(Path(path).name)

    def example_scores(self, model, tok, task, examples):
        who = model.name if isinstance(model, _Adapted) else "base"
        if who != "base":
            assert not {ex.prompt for ex in examples} & set(self.trained[who]), "scored on its own training data"
        self.scored += [(who, ex.prompt) for ex in examples]
        even = [100.0 * (int(ex.answer[-1]) % 2 == 0) for ex in examples]
        return ExampleScores(headline=even if who != "base" else [0.0] * len(examples))


class _Adapted:
    def __init__(self, name: str) -> None:
        self.name = name

    def eval(self):
        return self

    def unload(self):
        return None


@pytest.fixture
def env(tmp_path, monkeypatch):
    """`small` (40 examples: test 6, dev 4, train 20) decided on dev and `large` (60 examples) decided on a
    gate split, as their records say; a `multitask` baseline in the manifest; the doubles in crossval."""
    tasks = {}
    for name, n in (("small", 40), ("large", 60)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"input": f"{name} q{i}?", "output": f"a{i}"}) + "\n" for i in range(n)))
        tasks[name] = Task(name=name, kind="qa", source=str(path), metric="exact", load=user_file(name, path))
    d = _Doubles()
    for attr in ("load_base_model", "train_adapter", "example_scores"):
        monkeypatch.setattr(crossval, attr, getattr(d, attr))
    monkeypatch.setattr(crossval, "PeftModel", _Doubles.PeftModel)
    monkeypatch.setattr(crossval, "get_task", tasks.__getitem__)
    monkeypatch.setattr(choice_mod, "get_task", tasks.__getitem__)
    root = tmp_path / "assets"
    (root / "baselines" / "multitask").mkdir(parents=True)
    (root / "baselines" / "multitask" / "adapter_config.json").write_text("{}")  # what Manifest.check looks for
    Manifest(
        base_model=EMBEDDED_MODEL_ID,
        tasks=["small", "large"],
        adapters={"small": None, "large": None},
        baselines={"multitask": "baselines/multitask"},
        records={
            # dev-gated: a 4-example tie the dev rule leaves to the base model
            "small": {"dev_scores": [0.0] * 4, "base_dev_scores": [0.0] * 4},
            "large": {"gate_scores": [0.0] * 4, "base_gate_scores": [0.0] * 4},
            "multitask": {"r": 64, "alpha": 128, "max_steps": 150},
        },
    ).save(root)
    return root, tasks, d, tmp_path


def test_every_example_is_scored_by_a_generalist_that_never_saw_it(env):
    root, tasks, d, data = env
    crossval.crossval_generalist(root, data / "work", data, SPLIT, k=5, progress=False)
    cv = Manifest.load(root).records["small"]["crossval"]
    labelled = crossval.labelled(crossval.load_splits(tasks["small"], data, SPLIT))
    assert cv["k"] == 5 and len(cv["folds"]) == len(labelled) == 24 and set(cv["folds"]) == set(range(5))
    assert "crossval" not in Manifest.load(root).records["large"]  # it has a gate split
    # Each fold generalist trained on the large class's train split and on the other folds of the small one.
    large_train = {ex.prompt for ex in crossval.load_splits(tasks["large"], data, SPLIT).train}
    for i in range(5):
        seen = set(d.trained[f"multitask-fold{i}"])
        assert large_train <= seen
        assert seen - large_train == {ex.prompt for ex, f in zip(labelled, cv["folds"]) if f != i}
    # Reassembled in example order: every labelled example once, with its own fold generalist's score.
    options = crossval.crossval_options(Manifest.load(root).records["small"])
    assert options[BASE]["scores"] == [0.0] * 24
    assert options["multitask"]["scores"] == [100.0 * (int(ex.answer[-1]) % 2 == 0) for ex in labelled]
    assert sorted(p for who, p in d.scored if who != "base") == sorted(ex.prompt for ex in labelled)

    # Resumed: nothing is trained or scored again.
    trained, scored = dict(d.trained), list(d.scored)
    crossval.crossval_generalist(root, data / "work", data, SPLIT, k=5, progress=False)
    assert d.trained == trained and d.scored == scored


def test_a_missing_fold_means_no_crossval_options(env):
    root, _, _, data = env
    crossval.crossval_generalist(root, data / "work", data, SPLIT, k=3, progress=False)
    record = Manifest.load(root).records["small"]
    del record["crossval"]["multitask"]["2"]
    assert crossval.crossval_options(record) is None
    assert crossval.crossval_options({}) is None


def test_the_choice_takes_the_crossvalidated_generalist_for_a_small_class(env):
    root, _, _, data = env
    crossval.crossval_generalist(root, data / "work", data, SPLIT, k=4, progress=False)
    manifest = Manifest.load(root)
    manifest.records["small"]["candidates"] = {
        "multitask": {"mixture": {"multitask": 1.0}, "split": "dev", "scores": [0.0] * 4, "chosen": []}
    }
    manifest.save(root)
    out = apply_choices(root, data, SPLIT)
    choice = out.records["small"]["choice"]
    # On 4 dev examples the generalist ties the base model; cross-validated, 13 of 24 right beats 0 of 24.
    assert choice["options"]["multitask"]["eligible"] is False
    assert choice["crossval"]["served"] == "multitask" and choice["crossval"]["n"] == 24
    assert choice["served"] == "multitask" and choice["decided_on"] == "crossval"
    assert out.serve == {"small": {"multitask": 1.0}} and out.adapters["small"] is None
    even = crossval.crossval_options(out.records["small"])["multitask"]["scores"]
    row = next(r for r in choice_table(out).splitlines() if r.startswith("| small |"))
    assert f"| 4-fold, n=24: 0.0 -> `multitask` {sum(even) / 24:.1f} (+{sum(even) / 24:.1f} [" in row and row.endswith(
        "**multitask x1 (cross-validated)** |"
    )


def test_a_second_generalist_keeps_the_crossvalidated_choice_of_the_first(env):
    """choose-serving with another generalist (one never cross-validated) still gives a small class the
    second look with the generalist that was."""
    root, _, _, data = env
    crossval.crossval_generalist(root, data / "work", data, SPLIT, k=4, progress=False)
    manifest = Manifest.load(root)
    assert list(cross_validated(manifest.records["small"], "multitask-v2")) == ["multitask"]
    manifest.records["small"]["candidates"] = {
        name: {"mixture": {name: 1.0}, "split": "dev", "scores": [0.0] * 4, "chosen": []}
        for name in ("multitask", "multitask-v2")
    }
    manifest.save(root)
    choice = apply_choices(root, data, SPLIT, generalist="multitask-v2").records["small"]["choice"]
    assert choice["served"] == "multitask" and choice["decided_on"] == "crossval"
    assert choice["crossval"]["n"] == 24
