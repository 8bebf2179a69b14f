"""Evaluation: method registry, option log-likelihood scoring, harness resume and the written report."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny_assets, tiny_pipeline

from dlp_lora.chat import chat_prompt
from dlp_lora.config import SelectionConfig, SplitConfig
from dlp_lora.evaluation.harness import EvalConfig, evaluate_task
from dlp_lora.evaluation.methods import METHODS, method_weights
from dlp_lora.evaluation.report import PAIRS, pairs_for
from dlp_lora.evaluation.run import run_evaluation
from dlp_lora.evaluation.stats import paired_difference
from dlp_lora.models import load_tokenizer
from dlp_lora.router import select_with
from dlp_lora.tasks import Example, Task, load_splits
from dlp_lora.tasks.prompts import mcq_example
from dlp_lora.types import Routing


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture
def dlp(tmp_path, tok):
    return tiny_pipeline(make_tiny_assets(tmp_path / "assets", len(tok)), tok)


def _tasks() -> dict[str, Task]:
    """Two tiny tasks named like the tiny assets' adapters: one multiple choice, one free-form."""
    maths = [
        Example(
            uid=f"maths/{i}", task="maths", prompt=f"What is {i} plus {i}?", answer=str(2 * i), references=(str(2 * i),)
        )
        for i in range(12)
    ]
    science = [
        mcq_example(f"science/{i}", "science", f"Which gas is number {i}?", ["oxygen", "neon", "argon"], i % 3)
        for i in range(12)
    ]
    return {
        "maths": Task(
            name="maths", kind="qa", source="test", metric="numeric", load=lambda root: maths, max_new_tokens=3
        ),
        "science": Task(
            name="science", kind="mcq", source="test", metric="choice", load=lambda root: science, max_new_tokens=2
        ),
    }


SPLIT = SplitConfig(train_cap=4, dev_size=1, test_size=3)


def test_every_method_gives_valid_weights():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    truth = torch.tensor([1, 0])
    sel = SelectionConfig(p=0.6)
    for name in METHODS:
        w = method_weights(name, probs, truth, sel)
        assert w.shape == probs.shape and (w >= 0).all(), name
    assert torch.equal(method_weights("base", probs, truth, sel), torch.zeros(2, 3))
    assert torch.equal(method_weights("oracle", probs, truth, sel), torch.tensor([[0.0, 1, 0], [1, 0, 0]]))
    torch.testing.assert_close(method_weights("dlp", probs, truth, sel)[1], torch.tensor([0.4, 0.35, 0]) / 0.75)
    assert (method_weights("dlp@0.3", probs, truth, sel) > 0).sum(1).tolist() == [1, 1]
    assert (method_weights("topk2", probs, truth, sel) > 0).sum(1).tolist() == [2, 2]
    # Class 0 without an adapter: row 0 keeps class 1 alone, row 1 (top class 0) is the base model alone,
    # under every routed method, as serving selects; uniform and oracle are not routed.
    swapped = torch.tensor([[0.2, 0.7, 0.1], [0.4, 0.35, 0.25]])
    for name in ("dlp", "dlp-paper", "top1", "topk2", "dlp@0.9"):
        gated = method_weights(name, swapped, truth, sel, no_adapter=[0])
        assert gated[:, 0].eq(0).all() and gated[1].eq(0).all() and gated[0, 1] > 0, name
    assert torch.equal(method_weights("uniform", probs, truth, sel, [0]), method_weights("uniform", probs, truth, sel))
    # The paper's weighting: softmax over the kept probabilities, so near-uniform for close probabilities.
    paper = method_weights("dlp-paper", probs, truth, sel)[1]
    torch.testing.assert_close(paper[:2], torch.softmax(torch.tensor([0.4, 0.35]), 0))


def test_unknown_method_refused():
    probs, truth = torch.ones(1, 2) / 2, torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown method 'magic'.*known methods"):
        method_weights("magic", probs, truth, SelectionConfig())
    with pytest.raises(ValueError, match="unknown method 'top1@0.5'"):
        method_weights("top1@0.5", probs, truth, SelectionConfig())
    with pytest.raises(ValueError, match="p_sweep values must be in"):
        EvalConfig(p_sweep=(1.5,))


def _reference_logprob(dlp, prompt: str, option: str, mix: torch.Tensor) -> float:
    """Plain per-row semantics: one unpadded forward of prompt + option, summed option-token log-probs."""
    ctx = dlp.tokenizer(chat_prompt(dlp.tokenizer, prompt), add_special_tokens=False)["input_ids"]
    cont = dlp.tokenizer(option, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad(), dlp.fused.routed(mix[None]):
        logp = torch.log_softmax(dlp.model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logp[len(ctx) - 1 + j, cont[j]] for j in range(len(cont))))


@pytest.mark.parametrize(
    "options",
    [
        [["A", "B", "C"]] * 3,
        [["the red fox", "a blue whale swimming", "no"]] * 3,
        [["yes", "no"], ["the red fox", "a blue whale swimming", "x", "y z"], ["one"]],
    ],
)
@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_option_logprobs_equal_per_row_reference(dlp, options, batch_size):
    """Prompts of different lengths (left padding), options of different lengths and counts (the shared
    prompt cache fans out unevenly), each prompt under its own mixture, in chunks of every size."""
    prompts = [
        "A much longer question that makes the rows of different lengths, pick one.",
        "Pick one.",
        "Which is it?",
    ]
    routing = Routing.from_dense(torch.tensor([[1.0, 0.0], [0.3, 0.7], [0.0, 0.0]]))
    got = dlp.option_logprobs(prompts, options, routing, batch_size=batch_size)
    dense = routing.to_dense(2)
    for b, prompt in enumerate(prompts):
        want = [_reference_logprob(dlp, prompt, o, dense[b]) for o in options[b]]
        assert got[b] == pytest.approx(want, abs=1e-4)


def test_harness_scores_resumes_and_reports(dlp, tmp_path):
    tasks = _tasks()
    cfg = EvalConfig(methods=("base", "oracle", "dlp"), p_sweep=(0.5,), limit=3, batch_size=2, composite_pairs=2)
    calls = []
    generate = dlp.generate

    def counting_generate(prompts, **kw):  # a test double that counts generation calls
        calls.append(len(prompts))
        return generate(prompts, **kw)

    dlp.generate = counting_generate
    summary = run_evaluation(dlp, list(tasks.values()), tmp_path / "eval", cfg, SPLIT)
    assert set(summary) == {"base", "oracle", "dlp", "dlp@0.5"}
    out = tmp_path / "eval"
    for name in ("results.json", "results.md", "per_task.png", "p_sweep.png"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "predictions" / "oracle" / "science.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["adapters"] == ["science"] for r in rows)
    assert all(len(r["option_logprobs"]) == 3 for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert results["per_task"]["maths"]["base"]["mean_k"] == 0
    # Multiple choice headline: option-text acc_norm; every method paired with the base model on the same examples.
    assert {"acc", "acc_norm", "accuracy"} <= set(results["per_task"]["science"]["oracle"])
    for task in ("maths", "science"):
        d = results["vs_base"][task]["oracle"]
        assert d["low"] <= d["estimate"] <= d["high"] and d["n"] == 3
    vs = results["summary"]["oracle"]["vs_base"]
    assert set(vs) == {"mcq", "qa", "all", "tasks"} and sum(vs["tasks"].values()) == 2
    assert "base" not in results["vs_base"]["maths"] and "Against the base model" in (out / "results.md").read_text()
    assert set(results["pairs"]) == {"oracle - base", "dlp - oracle", "dlp - base"}  # the pairs both run
    assert results["pairs"]["oracle - base"] == pytest.approx(results["summary"]["oracle"]["vs_base"]["all"])
    assert 0 < results["per_task"]["science"]["base"]["top_answer_share"] <= 1
    assert "## Collapse check" in (out / "results.md").read_text()
    assert results["composite"]["pairs"] == 2
    composite_rows = re.findall(r"\| per (?:prompt|segment) \| ([\d.]+) \|", (out / "results.md").read_text())
    assert len(composite_rows) == 2 and all(0 <= float(v) <= 100 for v in composite_rows)  # percentages
    c = results["composite"]
    d = paired_difference(c["per_segment_prompt_scores"], c["base_prompt_scores"])
    assert re.search(rf"\| per segment \| [\d.]+ \| {re.escape(d.fmt())}", (out / "results.md").read_text())

    # Resume: every (method, task) file is complete, so nothing is generated again.
    calls.clear()
    again = evaluate_task(dlp, tasks["science"], out, cfg, SPLIT, progress=False)
    assert (
        calls == []
        and {k: v for k, v in again["oracle"].items() if k != "headline_scores"}
        == results["per_task"]["science"]["oracle"]
    )
    # A truncated prediction file is rerun, and only that one.
    path = out / "predictions" / "base" / "science.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    evaluate_task(dlp, tasks["science"], out, cfg, SPLIT, progress=False)
    assert sum(calls) == 3
    # A file made under other mixtures (another router, p or gate) is stale: its method is rerun, and the
    # rows another method already answered under the same mixture are reused, not generated again.
    path = out / "predictions" / "dlp" / "science.jsonl"
    stale = [{**json.loads(line), "weights": [0.5]} for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in stale))
    (out / "predictions" / "oracle" / "science.jsonl").unlink()
    calls.clear()
    evaluate_task(dlp, tasks["science"], out, cfg, SPLIT, progress=False)
    assert json.loads(path.read_text().splitlines()[0])["weights"] != [0.5]

    def keys(method: str) -> set:
        rows = map(json.loads, (out / "predictions" / method / "science.jsonl").read_text().splitlines())
        return {(r["uid"], tuple(r["adapters"]), tuple(r["weights"])) for r in rows}

    assert sum(calls) == len((keys("oracle") | keys("dlp")) - keys("base") - keys("dlp@0.5")) < 6


def test_collapse_rows_flag_one_answer_for_most_prompts():
    from dlp_lora.evaluation.report import collapsed_rows

    per_task = {
        "t": {
            "a": {"top_answer_share": 0.9, "gold_top_share": 0.5},  # collapsed
            "b": {"top_answer_share": 0.6, "gold_top_share": 0.5},
            "c": {"top_answer_share": 0.95, "gold_top_share": 0.9},  # so are the answers
            "d": {"top_answer_share": 0.85, "gold_top_share": 0.6, "option_auc": {"estimate": 0.5}},
        }
    }
    assert collapsed_rows(per_task) == [("t", "a", 0.9, 0.5, None), ("t", "d", 0.85, 0.6, {"estimate": 0.5})]


def test_option_auc_tells_ranking_from_leaning():
    from dlp_lora.evaluation.stats import bootstrap_auc

    labels = [1, 0] * 20
    assert bootstrap_auc(labels, [float(y) for y in labels]).estimate == 1.0  # tells every pair apart
    assert bootstrap_auc(labels, [-float(y) for y in labels]).estimate == 0.0
    # Leaning to option 1 on every question (the label prior) ranks nothing: 0.5, whatever the lean.
    lean = bootstrap_auc(labels, [3.0] * 40)
    assert lean.estimate == 0.5 and lean.low == lean.high == 0.5
    noisy = bootstrap_auc(labels, [y + 0.9 * ((i * 7919) % 13 / 13) for i, y in enumerate(labels)])
    assert 0.5 < noisy.low <= noisy.estimate <= noisy.high <= 1.0 and noisy.n == 40
    with pytest.raises(ValueError, match="labels in"):
        bootstrap_auc([0, 2], [0.1, 0.2])


def test_option_auc_of_a_two_option_task_from_its_log_likelihoods():
    from dlp_lora.evaluation.examples import option_auc

    yes_no = [mcq_example(f"b/{i}", "b", f"Is {i} even?", ["true", "false"], i % 2) for i in range(20)]
    # Per byte, "true" (4) at -1.0 beats "false" (5) at -2.5 on every question: a lean, no ranking.
    assert option_auc([[-1.0, -2.5]] * 20, yes_no).estimate == 0.5
    # A larger margin for "true" exactly where it is gold: every pair ranked.
    assert option_auc([[-1.0, -2.5 - 2 * (i % 2 == 0)] for i in range(20)], yes_no).estimate == 1.0
    three = [mcq_example("c/0", "c", "?", ["a", "b", "c"], 0)] * 2
    assert option_auc([[-1.0, -2.0, -3.0]] * 2, three) is None


def test_harness_refuses_task_outside_router_classes(dlp, tmp_path):
    other = Task(
        name="poetry", kind="qa", source="test", metric="exact", load=lambda root: _tasks()["maths"].load(root)
    )
    with pytest.raises(ValueError, match="'poetry'.*not router classes"):
        run_evaluation(dlp, [other], tmp_path, EvalConfig(limit=2), SPLIT)


def test_the_none_class_is_not_evaluated(dlp, tmp_path):
    """`dlp-lora evaluate` passes the router's classes; `none` (no adapter, no test split) is skipped."""
    summary = run_evaluation(
        dlp,
        [*_tasks().values(), "none"],
        tmp_path,
        EvalConfig(methods=("base",), p_sweep=(), limit=2, loglik=False),
        SPLIT,
    )
    assert set(json.loads((tmp_path / "results.json").read_text())["per_task"]) == {"maths", "science"}
    assert set(summary) == {"base"}


def test_baseline_adapter_is_served_only_when_named_and_evaluated(tmp_path, tok):
    from conftest import make_peft_adapter, tiny_vocab_model

    from dlp_lora.pipeline import DLPLoRA

    root = make_tiny_assets(tmp_path / "assets", len(tok))
    extra = make_peft_adapter(tmp_path / "multitask", seed=9, base=tiny_vocab_model(len(tok)))
    plain = tiny_pipeline(root, tok)
    plain.close()  # one model carries one FusedLoRAModel at a time
    dlp = DLPLoRA(
        plain.model,
        tok,
        plain.router,
        {"maths": root / "adapters/maths", "science": root / "adapters/science"},
        baselines={"multitask": extra},
    )
    assert dlp.adapter_names == ["maths", "science", "multitask"] and dlp.baselines == ["multitask"]
    assert dlp.task_names == ["maths", "science"]  # what `dlp-lora evaluate` evaluates by default
    prompts = ["What is 2 plus 2?", "Which gas do plants take in?"]
    assert all(r.adapters and "multitask" not in r.adapters for r in dlp.generate(prompts, max_new_tokens=2))
    pinned = dlp.generate(prompts[:1], max_new_tokens=2, routing=dlp.routing_for([{"multitask": 1.0}]))
    assert pinned[0].adapters == ["multitask"]
    summary = run_evaluation(
        dlp,
        list(_tasks().values()),
        tmp_path / "eval",
        EvalConfig(methods=("base",), p_sweep=(), limit=2, loglik=False),
        SPLIT,
    )
    assert set(summary) == {"base", "multitask"}  # baselines join every run
    # Composite prompts: the base model and the generalist answer every part too, unrouted.
    from dlp_lora.evaluation.composite import _part_score, evaluate_composite, make_pairs

    tasks = _tasks()
    pairs = make_pairs({name: task.load(None) for name, task in tasks.items()}, 2)
    composite = evaluate_composite(dlp, pairs, tasks, max_new_tokens=3)
    assert composite["settings"] == ["per_prompt", "per_segment", "base", "multitask"]
    assert (composite["base_mean_k"], composite["multitask_mean_k"]) == (0.0, 1.0)
    parts = [ex for pair in pairs for ex in pair]
    by_generalist = dlp.generate([ex.prompt for ex in parts], max_new_tokens=3,
                                 routing=dlp.routing_for([{"multitask": 1.0}] * len(parts)))  # fmt: skip
    assert all(r.adapters == ["multitask"] for r in by_generalist)
    want = sum(_part_score(tasks[ex.task], ex, r.text) for ex, r in zip(parts, by_generalist)) / len(parts)
    assert composite["multitask_score"] == pytest.approx(want)
    # Per prompt: the mean of its two parts (the unit the report's paired intervals resample).
    by_prompt = [(_part_score(tasks[a.task], a, ra.text) + _part_score(tasks[b.task], b, rb.text)) / 2
                 for (a, b), ra, rb in zip(pairs, by_generalist[::2], by_generalist[1::2])]  # fmt: skip
    assert composite["multitask_prompt_scores"] == pytest.approx(by_prompt)
    with pytest.raises(ValueError, match="share names with routed adapters"):
        DLPLoRA(plain.model, tok, None, {"maths": root / "adapters/maths"}, baselines={"maths": extra})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run_evaluation(dlp, list(_tasks().values()), tmp_path / "e2", EvalConfig(methods=("nope",), limit=2), SPLIT)


def test_composite_counts_the_class_of_a_task_the_base_model_serves(tmp_path, tok):
    from dlp_lora.assets import Manifest
    from dlp_lora.evaluation.composite import evaluate_composite, make_pairs

    root = make_tiny_assets(tmp_path / "assets", len(tok))
    manifest = Manifest.load(root)
    manifest.adapters["science"] = None  # gated: the router keeps the class, the base model answers
    manifest.save(root)
    dlp = tiny_pipeline(root, tok)
    assert dlp.base_served == ["science"] and dlp.adapter_names == ["maths"]
    tasks = _tasks()
    pairs = make_pairs({name: task.load(None) for name, task in tasks.items()}, 2)
    out = evaluate_composite(dlp, pairs, tasks, max_new_tokens=3)
    parts = [ex for pair in pairs for ex in pair]
    classes = select_with(dlp.router.predict_proba([ex.prompt for ex in parts]), dlp.selection).to_dense(2)
    truth = torch.tensor([dlp.task_names.index(ex.task) for ex in parts])
    assert out["per_segment_true_task_weight"] == pytest.approx(float(classes[torch.arange(len(parts)), truth].mean()))
    assert 0 <= out["per_segment_mean_k"] <= 1  # one adapter in the bank


@pytest.fixture
def with_general(tmp_path, tok):
    """The tiny pipeline plus a `general` baseline of the experts' rank (for GenKnowSub)."""
    from conftest import make_peft_adapter, tiny_vocab_model

    from dlp_lora.pipeline import DLPLoRA

    root = make_tiny_assets(tmp_path / "assets", len(tok))
    general = make_peft_adapter(tmp_path / "general", seed=9, base=tiny_vocab_model(len(tok)))
    plain = tiny_pipeline(root, tok)
    plain.close()  # one model carries one FusedLoRAModel at a time
    adapters = {"maths": root / "adapters/maths", "science": root / "adapters/science"}
    return DLPLoRA(plain.model, tok, plain.router, adapters, baselines={"general": general})


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_harness_arrow_methods_run_every_example_under_arrow(with_general, tmp_path):
    """`arrow` and `arrow-gks` are methods like the others: their rows are the pipeline's answers and option
    scores under Arrow without / with GenKnowSub (no mixture named), cached apart from the base model's and
    from each other, and stored with their Arrow setting, so a rerun with another setting reruns them."""
    from dlp_lora.config import ArrowConfig

    dlp, tasks = with_general, _tasks()
    cfg = EvalConfig(methods=("base", "arrow", "arrow-gks"), p_sweep=(), limit=3, batch_size=2, composite_pairs=0)
    with pytest.raises(ValueError, match="routes with Arrow: pass arrow=ArrowConfig"):
        run_evaluation(dlp, list(tasks.values()), tmp_path / "no", cfg, SPLIT)
    with pytest.raises(ValueError, match="name one with --arrow-general"):
        run_evaluation(dlp, list(tasks.values()), tmp_path / "no", cfg, SPLIT, arrow=ArrowConfig(top_k=1))
    only_arrow = EvalConfig(methods=("base", "arrow"), p_sweep=(), limit=3, composite_pairs=0)
    with pytest.raises(ValueError, match="are for the arrow-gks method"):
        run_evaluation(dlp, list(tasks.values()), tmp_path / "no", only_arrow, SPLIT,
                       arrow=ArrowConfig(top_k=1, general=("general",)))  # fmt: skip
    arrow = ArrowConfig(top_k=1, general=("general",))
    summary = run_evaluation(dlp, list(tasks.values()), tmp_path / "eval", cfg, SPLIT, arrow=arrow)
    assert set(summary) == {"base", "arrow", "arrow-gks", "general"}
    per_task = json.loads((tmp_path / "eval" / "results.json").read_text())["per_task"]
    # Arrow rows count the top_k adapters each token uses, as the composite and out-of-pool tables do.
    assert per_task["maths"]["arrow"]["mean_k"] == 1.0 and per_task["maths"]["arrow"]["fused_fraction"] == 0.0
    out = tmp_path / "eval" / "predictions"
    for task in ("maths", "science"):
        prompts = [ex.prompt for ex in load_splits(tasks[task], None, SPLIT).test[:3]]
        base = _rows(out / "base" / f"{task}.jsonl")
        for method, general in (("arrow", ()), ("arrow-gks", ("general",))):
            rows = _rows(out / method / f"{task}.jsonl")
            routing = dlp.arrow_routing(ArrowConfig(top_k=1, general=general))
            want = dlp.generate(prompts, max_new_tokens=tasks[task].max_new_tokens, routing=routing)
            assert [r["text"] for r in rows] == [w.text for w in want] and all(r["adapters"] == [] for r in rows)
            assert all(r["arrow"] == {"experts": ["maths", "science"], "general": list(general), "top_k": 1,
                                      "temperature": 1.0, "seed": 0} for r in rows)  # fmt: skip
            if task == "science":
                assert [r["option_logprobs"] for r in rows] != [r["option_logprobs"] for r in base]
                if method == "arrow-gks":
                    plain = _rows(out / "arrow" / f"{task}.jsonl")
                    assert [r["option_logprobs"] for r in rows] != [r["option_logprobs"] for r in plain]
    # Another Arrow setting into the same folder: the Arrow rows are answered again, the base rows read back.
    stale = (out / "base" / "maths.jsonl").stat().st_mtime_ns, (out / "arrow" / "maths.jsonl").stat().st_mtime_ns
    run_evaluation(dlp, list(tasks.values()), tmp_path / "eval", cfg, SPLIT, arrow=replace(arrow, top_k=2))
    assert (out / "base" / "maths.jsonl").stat().st_mtime_ns == stale[0]
    assert (out / "arrow" / "maths.jsonl").stat().st_mtime_ns != stale[1]
    assert all(r["arrow"]["top_k"] == 2 for r in _rows(out / "arrow" / "maths.jsonl"))
    per_task = json.loads((tmp_path / "eval" / "results.json").read_text())["per_task"]
    assert per_task["maths"]["arrow"]["mean_k"] == 2.0 and per_task["maths"]["arrow"]["fused_fraction"] == 1.0


def test_dlp_plus_arrow_gives_arrow_the_pool_prompts_the_router_leaves_to_the_base_model(tmp_path, tok):
    """`dlp+arrow`: the router's mixture where it picks an adapter; Arrow where it picks a pool class the
    base model serves; the base model for `none`. Its rows are the `dlp` and `arrow` rows of the same
    examples, read from either method's run."""
    from dlp_lora.assets import Manifest
    from dlp_lora.config import ArrowConfig
    from dlp_lora.evaluation.harness import Hybrid, method_dense

    root = make_tiny_assets(tmp_path / "assets", len(tok), names=("maths", "science", "none"))
    manifest = Manifest.load(root)
    manifest.adapters["science"] = manifest.adapters["none"] = None  # the base model serves both
    manifest.save(root)
    dlp = tiny_pipeline(root, tok, arrow=ArrowConfig(top_k=1))
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    plan = method_dense(dlp, "dlp+arrow", probs, torch.zeros(3, dtype=torch.long))
    assert isinstance(plan, Hybrid) and plan.arrow_rows.tolist() == [False, True, False]
    assert plan.dense[0].tolist() == [1.0] and plan.dense[2].tolist() == [0.0]  # maths; none: the base model

    tasks = _tasks()
    cfg = EvalConfig(methods=("dlp", "arrow", "dlp+arrow"), p_sweep=(), limit=3, batch_size=2, composite_pairs=0)
    run_evaluation(dlp, list(tasks.values()), tmp_path / "eval", cfg, SPLIT)
    out = tmp_path / "eval" / "predictions"
    for task in ("maths", "science"):
        both = _rows(out / "dlp+arrow" / f"{task}.jsonl")
        dlp_rows, arrow_rows = _rows(out / "dlp" / f"{task}.jsonl"), _rows(out / "arrow" / f"{task}.jsonl")
        probs = dlp.router.predict_proba([ex.prompt for ex in load_splits(tasks[task], None, SPLIT).test[:3]])
        plan = method_dense(dlp, "dlp+arrow", probs, torch.zeros(3, dtype=torch.long))
        for b, row in enumerate(both):
            want = arrow_rows[b] if plan.arrow_rows[b] else dlp_rows[b]
            assert row["text"] == want["text"] and row.get("arrow") == want.get("arrow")


def test_composite_and_out_of_pool_prompts_take_arrow_and_compare_with_the_base_model(with_general, tmp_path):
    from dlp_lora.config import ArrowConfig
    from dlp_lora.evaluation.composite import _part_score, evaluate_composite, make_pairs
    from dlp_lora.evaluation.leave_alone import evaluate_leave_alone
    from dlp_lora.evaluation.report import write_report

    dlp, tasks = with_general, _tasks()
    arrow = dlp.arrow_routing(ArrowConfig(top_k=2))
    pairs = make_pairs({name: task.load(None) for name, task in tasks.items()}, 2)
    composite = evaluate_composite(dlp, pairs, tasks, arrows={"arrow": arrow}, max_new_tokens=3)
    assert composite["settings"][-1] == "arrow" and composite["arrow_mean_k"] == 2.0
    parts = [ex for pair in pairs for ex in pair]
    by_arrow = dlp.generate([ex.prompt for ex in parts], max_new_tokens=3, routing=arrow)
    want = sum(_part_score(tasks[ex.task], ex, r.text) for ex, r in zip(parts, by_arrow)) / len(parts)
    assert composite["arrow_score"] == pytest.approx(want)

    examples = tasks["maths"].load(None)[:3]
    n = len(dlp.adapter_names)
    general = torch.zeros(3, n)
    general[:, dlp.adapter_names.index("general")] = 1.0
    settings = {"base": torch.zeros(3, n), "general": general, "arrow": arrow}
    out = evaluate_leave_alone(dlp, examples, settings, max_new_tokens=4, batch_size=2)
    assert out["settings"] == ["base", "general", "arrow"] and out["prompts"] == out["scored"] == 3
    assert out["base"] == {"same_answer": 1.0, "drift_nats": pytest.approx(0.0, abs=1e-5), "mean_k": 0.0}
    assert out["general"]["mean_k"] == 1.0 and out["arrow"]["mean_k"] == 2.0
    # The drift is the base answer's per-token log-likelihood under the base model minus under the setting.
    prompts = [ex.prompt for ex in examples]
    answers = [r.text for r in dlp.generate(prompts, max_new_tokens=4, routing=Routing.from_dense(settings["base"]))]
    lp = {name: [o[0] for o in dlp.option_logprobs(prompts, [[a] for a in answers],
                                                   Routing.from_dense(w) if torch.is_tensor(w) else w)]
          for name, w in (("base", settings["base"]), ("general", general))}  # fmt: skip
    tokens = [len(dlp.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    drift = sum((b - g) / t for b, g, t in zip(lp["base"], lp["general"], tokens)) / 3
    assert out["general"]["drift_nats"] == pytest.approx(drift, abs=1e-5) and drift != pytest.approx(0.0)
    with pytest.raises(ValueError, match="at least one prompt"):
        evaluate_leave_alone(dlp, [], settings)
    meta = {"command": "test", "examples_per_task": 3}
    per = {"base": {"em": 50.0, "bleu": 0.0, "rouge1": 0.0, "rougeL": 0.0, "headline_scores": [100.0, 0.0],
                    "mean_k": 0.0, "fused_fraction": 0.0, "top_answer_share": 0.5, "gold_top_share": 0.5}}  # fmt: skip
    write_report(tmp_path / "r", {"maths": per}, {"maths": tasks["maths"]}, meta, composite, {**out, "sources": 1})
    text = (tmp_path / "r" / "results.md").read_text()
    assert "## Out-of-pool prompts: left to the base model?" in text and "| `base` | 100% | +0.000 | 0.00 |" in text
    assert "| `arrow` |" in text.split("## Composite prompts")[1]


def test_report_shows_whether_two_option_tasks_are_told_apart(tmp_path):
    from dlp_lora.evaluation.report import write_report

    yn = Task(name="yn", kind="mcq", source="test", metric="choice", load=lambda root: [])

    def scores(right: int, auc: float) -> dict:
        per = [100.0] * right + [0.0] * (10 - right)
        return {"acc_norm": right * 10.0, "acc": right * 10.0, "accuracy": right * 10.0, "headline_scores": per,
                "top_answer_share": 0.9, "gold_top_share": 0.6, "mean_k": 0.0, "fused_fraction": 0.0,
                "option_auc": {"estimate": auc, "low": auc - 0.1, "high": auc + 0.1}}  # fmt: skip

    meta = {"command": "test", "examples_per_task": 10}
    write_report(tmp_path, {"yn": {"base": scores(4, 0.45), "dlp": scores(6, 0.5)}}, {"yn": yn}, meta)
    text = (tmp_path / "results.md").read_text()
    assert "## Two-option tasks: told apart, or a lean to one answer?" in text
    assert "| yn | 0.45 [0.35, 0.55] | 0.50 [0.40, 0.60] |" in text
    assert "| yn | dlp | 90% | 60% | 0.50 [0.40, 0.60] |" in text  # collapsed, and the AUC says it is a lean


def test_every_generalist_gets_the_pairs_of_multitask():
    pairs = pairs_for(("multitask", "multitask-v2"))
    for g in ("multitask", "multitask-v2"):
        assert ("dlp", g) in pairs and (g, "base") in pairs
    assert ("multitask-v2", "multitask") in pairs and len(pairs) == len(set(pairs))
    assert pairs_for(("multitask",)) == list(PAIRS)  # one generalist: the pairs as written
