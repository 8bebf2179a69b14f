"""`dlp-lora` command line: one thin subcommand per library entry point.

Each subcommand parses its flags (built from the library's config dataclasses where there is one) and
calls one library function. Heavy imports happen inside the subcommand so `dlp-lora --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dlp_lora.assets import DEFAULT_ASSETS

__all__ = ["main"]

EXIT_UNFINISHED = 75  # train-adapter stopped at --time-budget-min with tasks left (EX_TEMPFAIL: run again)


def add_config_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "", overrides_only: bool = False) -> None:
    """One --flag per dataclass field (dashes for underscores), defaults and help from the dataclass.

    A field's metadata may name its flag (`flag`) or make none (`cli: False`, see `config.checks`); `prefix`
    puts all of a config's flags under one name (`--split-dev-size`) where two configs of one command
    share field names. overrides_only: absent flags stay absent from the namespace, so they cannot
    override settings that come from elsewhere (e.g. an assets manifest's selection defaults).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli", True) is False:
            continue
        name = prefix + f.metadata.get("flag", f.name.replace("_", "-"))
        flag, dest, hint, default = "--" + name, name.replace("-", "_"), hints[f.name], f.default
        if overrides_only:
            default = argparse.SUPPRESS
        origin = typing.get_origin(hint)
        if hint is bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default)
        elif origin is tuple:
            item = typing.get_args(hint)[0]
            parser.add_argument(flag, dest=dest, nargs="*", type=item, default=default, help=f"default: {f.default}")
        elif origin is typing.Literal:
            parser.add_argument(flag, dest=dest, choices=typing.get_args(hint), default=default)
        else:
            scalar = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if origin else hint
            shown = repr(f.default) if isinstance(f.default, str) else f.default  # a blank-line marker stays visible
            parser.add_argument(flag, dest=dest, type=scalar, default=default, help=f"default: {shown}")


def flag_values(cls: type, ns: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """{field: value} of the flags `add_config_args` made for `cls` that are in the namespace."""
    values = {}
    for f in dataclasses.fields(cls):
        dest = (prefix + f.metadata.get("flag", f.name)).replace("-", "_")
        if f.metadata.get("cli", True) is not False and hasattr(ns, dest):
            value = getattr(ns, dest)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return values


def config_from_args(cls: type, ns: argparse.Namespace, prefix: str = "", **given: Any) -> Any:
    """Build the dataclass from `given` fields overridden by its flags; its __post_init__ validates (errors
    name the field)."""
    return cls(**{**given, **flag_values(cls, ns, prefix)})


# ---- subcommands -------------------------------------------------------------------------------------


def _bench_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import BenchConfig

    add_config_args(p, BenchConfig)
    p.add_argument("--quick", action="store_true", help="a reduced set that runs in under a minute")
    p.add_argument("--base-model", default=None, help="HF dir or hub id (default: the embedded SmolLM2)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--markdown", default=None, help="write the markdown table here (e.g. docs/performance.md)")
    p.add_argument(
        "--routing",
        action="store_true",
        help="instead: sentence vs prompt routing on the assets' pipeline (router calls included)",
    )
    p.add_argument("--assets", default=DEFAULT_ASSETS, help="assets folder for --routing")


def _bench(ns: argparse.Namespace) -> None:
    from dlp_lora.bench import save_json, write_section
    from dlp_lora.bench.fusion import markdown_table, run_fusion_benchmark
    from dlp_lora.config import BenchConfig
    from dlp_lora.models import load_base_model

    cfg = BenchConfig.quick() if ns.quick else config_from_args(BenchConfig, ns)
    if ns.routing:
        return _bench_routing(ns, cfg)
    model, _ = load_base_model(ns.base_model)
    result = run_fusion_benchmark(model, cfg)
    table = markdown_table(result, "dlp-lora " + " ".join(sys.argv[1:]))
    print(table)
    if ns.json:
        save_json(result, ns.json)
    if ns.markdown:
        write_section(Path(ns.markdown), "## Fusion latency", table)


def _bench_routing(ns: argparse.Namespace, cfg) -> None:
    from dlp_lora.bench import save_json, write_section
    from dlp_lora.bench.routing import routing_markdown, run_routing_benchmark, switch_cost
    from dlp_lora.config import FusionConfig
    from dlp_lora.pipeline import DLPLoRA

    rows, costs = [], []
    for path in ("auto", "gathered"):  # gathered at batch 1: no re-merge on a switch, dearer tokens
        dlp = DLPLoRA.from_assets(ns.assets, ns.base_model, fusion=FusionConfig(path=path))
        try:
            sizes = cfg.batch_sizes if path == "auto" else (1,)
            rows += run_routing_benchmark(dlp, sizes, cfg.new_tokens, cfg.repeats, label=path)
            costs.append(switch_cost(dlp))
        finally:
            dlp.close()
    table = routing_markdown(rows, costs, "dlp-lora " + " ".join(sys.argv[1:]), cfg.new_tokens, cfg.repeats)
    print(table)
    if ns.json:
        save_json({"rows": rows, "switch_cost": costs}, ns.json)
    if ns.markdown:
        write_section(Path(ns.markdown), "## Routing granularity cost", table)


def _tasks_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import SplitConfig

    add_config_args(p, SplitConfig)
    p.add_argument("--data-dir", default=None, help="benchmark data root (default: ../shared/data)")
    p.add_argument("--markdown", default=None, help="write the pool table here (e.g. docs/tasks.md)")
    p.add_argument("--results", default=None, help="an evaluation's results.json: add base and oracle test scores")
    p.add_argument("--assets", default=None, help="an assets folder: add its adapters' dev curves and gate decisions")


def _tasks(ns: argparse.Namespace) -> None:
    from dlp_lora.config import SplitConfig
    from dlp_lora.tasks import pool_table

    results = json.loads(Path(ns.results).read_text()) if ns.results else None
    table = pool_table(ns.data_dir, config_from_args(SplitConfig, ns), results)
    if ns.assets:
        from dlp_lora.assets import Manifest
        from dlp_lora.training.gate import gate_table

        manifest = Manifest.load(ns.assets)
        table += (
            f"\n## Adapters of {ns.assets} and the deployment gate\n\nFrom the manifest's training records "
            "(`dlp-lora tasks --assets DIR`): the dev curve (headline score every `eval_every` steps from step "
            "0), the step kept, and the gate: base and adapter on the task's gate split (or dev where it has "
            "none), the paired-bootstrap interval of the difference; deployed only when it lies above 0.\n\n"
            + gate_table(manifest.records, manifest.tasks)
        )
        if any("choice" in (manifest.records.get(t) or {}) for t in manifest.tasks):
            from dlp_lora.training.choice import choice_table

            table += (
                "\n## What serves each class\n\nFrom `dlp-lora choose-serving`: every option scored on the "
                "examples the gate decides on (mean, difference with the base model [95% paired bootstrap "
                "interval]; ✗: within noise or collapsed, not eligible) and the option that serves the "
                "class: by fewest adapters first, an eligible option that also beats the one chosen before it "
                "beyond noise (`dlp_lora.training.choice`), else the base model. A class decided on dev (too "
                "small for a gate split) that this leaves to the base model goes to a generalist when that "
                "generalist's recipe, cross-validated on the class's train + dev examples (`choose-serving "
                "--crossval K`), beats the base model by the same rule. One pair of columns per generalist "
                "offered (`--generalist`).\n\n" + choice_table(manifest)
            )
    print(table)
    if ns.markdown:
        Path(ns.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.markdown).write_text(table if table.endswith("\n") else table + "\n")


def _choose_serving_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import SplitConfig

    p.add_argument("--assets", default=DEFAULT_ASSETS, help="assets folder whose classes to decide")
    p.add_argument("--data-dir", default=None, help="benchmark data root (default: ../shared/data)")
    p.add_argument("--tasks", nargs="*", default=None, help="classes to decide (default: every trained task)")
    p.add_argument("--generalist", default="multitask", help="the baseline adapter offered to every class")
    p.add_argument(
        "--weights",
        nargs="*",
        type=float,
        default=[1.0],
        help="generalist weights of the specialist+generalist options (the specialist at 1)",
    )
    p.add_argument(
        "--crossval",
        type=int,
        default=0,
        metavar="K",
        help="first cross-validate the generalist's recipe in K folds on the train + dev examples of every "
        "class too small for a gate split (trains K generalists; resumable); 0: use the scores the assets hold",
    )
    p.add_argument("--crossval-dir", default="runs/crossval", help="where the fold generalists are trained")
    add_config_args(p, SplitConfig)


def _choose_serving(ns: argparse.Namespace) -> None:
    from dlp_lora.config import SplitConfig
    from dlp_lora.training.candidates import score_candidates
    from dlp_lora.training.choice import apply_choices, choice_table

    split = config_from_args(SplitConfig, ns)
    score_candidates(ns.assets, ns.tasks, ns.data_dir, split, ns.generalist, tuple(ns.weights))
    if ns.crossval:
        from dlp_lora.training.crossval import crossval_generalist

        crossval_generalist(ns.assets, ns.crossval_dir, ns.data_dir, split, ns.generalist, ns.crossval)
    print(choice_table(apply_choices(ns.assets, ns.data_dir, split, ns.tasks, ns.generalist)))


def _train_adapter_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import AdapterTrainConfig, SplitConfig

    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--task", action="append", help="task name (repeatable)")
    group.add_argument("--all", action="store_true", help="every task in the registry")
    group.add_argument(
        "--task-file",
        action="append",
        metavar="NAME=PATH",
        help='your own task: a JSON/JSONL file of {"input", "output"} pairs (repeatable)',
    )
    group.add_argument(
        "--multitask",
        action="store_true",
        help="the baseline: one LoRA on every task of --assets together (use e.g. --r 64 --alpha 128)",
    )
    p.add_argument("--multitask-name", default="multitask", help="with --multitask: the baseline's name")
    p.add_argument(
        "--multitask-dev",
        type=int,
        default=0,
        metavar="N",
        help="with --multitask: a dev curve on the first N dev examples of every class with a gate split "
        "(each scored by its own task), the best checkpoint kept; 0: none, the last step kept",
    )
    p.add_argument("--assets", default=DEFAULT_ASSETS, help="assets folder to write adapters and manifest into")
    p.add_argument("--data-dir", default=None, help="benchmark data root (default: ../shared/data)")
    p.add_argument("--base-model", default=None, help="HF dir or hub id (default: the embedded SmolLM2)")
    p.add_argument(
        "--time-budget-min",
        type=float,
        default=None,
        help="stop at the first checkpoint past this many minutes; run again to continue",
    )
    add_config_args(p, AdapterTrainConfig)
    add_config_args(p, SplitConfig)


def _train_adapter(ns: argparse.Namespace) -> None:
    from dlp_lora.config import AdapterTrainConfig, SplitConfig
    from dlp_lora.tasks import task_names
    from dlp_lora.training.pool import train_pool_adapters

    split = config_from_args(SplitConfig, ns)
    if ns.multitask:
        from dlp_lora.training.pool import train_pool_multitask

        cfg = config_from_args(AdapterTrainConfig, ns)
        manifest = train_pool_multitask(
            ns.assets, ns.data_dir, split, cfg, ns.base_model, ns.multitask_name, dev_per_task=ns.multitask_dev
        )
        rec = manifest.records[ns.multitask_name]
        print(f"{ns.multitask_name} steps={rec['steps']} best={rec['best_step']} loss={rec['final_train_loss']:.3f}")
        return
    tasks = task_names() if ns.all else ns.task or [_user_task(spec) for spec in ns.task_file]
    budget = None if ns.time_budget_min is None else 60 * ns.time_budget_min
    manifest = train_pool_adapters(
        ns.assets,
        tasks,
        ns.data_dir,
        split,
        config_from_args(AdapterTrainConfig, ns),
        ns.base_model,
        time_budget_s=budget,
    )
    unfinished = 0
    for t in tasks:
        t = getattr(t, "name", t)
        rec = manifest.records.get(t)
        if rec is None:
            unfinished += 1
            print(f"{t:32s} not finished (run again to continue)")
            continue
        gate = rec.get("gate", {})
        print(
            f"{t:32s} steps={rec['steps']:4d} best={rec.get('best_step')} dev={rec['dev']} "
            f"gate={'deployed' if gate.get('deployed') else 'base'} ({gate.get('reason', '')})"
        )
    if unfinished:
        # A distinct status, so a script (make assets) can tell "stopped at the budget" from done or failed.
        raise SystemExit(EXIT_UNFINISHED)


def _user_task(spec: str):
    """NAME=PATH -> a free-form Task over the user's {"input", "output"} file, scored by exact match."""
    from dlp_lora.tasks import Task
    from dlp_lora.tasks.loaders import user_file

    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"--task-file expects NAME=PATH, got {spec!r}")
    return Task(
        name=name.strip(), kind="qa", source=path, metric="exact", load=user_file(name.strip(), path), max_new_tokens=64
    )


def _train_router_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import RouterConfig, RouterDataConfig, RouterTrainConfig, SelectionConfig, SplitConfig

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--assets", help="train on the training splits of this assets folder's tasks")
    src.add_argument("--tasks", nargs="+", help="train on these registry tasks' training splits ('all': the pool)")
    src.add_argument("--jsonl", help='labelled prompts, one {"text", "task"} per line')
    p.add_argument(
        "--dev-jsonl",
        help="dev prompts for early stopping and calibration (with --jsonl; default: a "
        "seeded stratified --dev-fraction of --jsonl)",
    )
    p.add_argument("--dev-fraction", type=float, default=0.1, help="default: 0.1")
    p.add_argument("--out", help="router directory (with --tasks or --jsonl)")
    p.add_argument("--data-dir", default=None, help="benchmark data root (default: ../shared/data)")
    add_config_args(p, RouterConfig)
    add_config_args(p, RouterTrainConfig)
    add_config_args(p, RouterDataConfig)
    # Training chooses the top-p on dev: of the selection only the weighting is the user's.
    p.add_argument(
        "--weighting",
        choices=typing.get_args(typing.get_type_hints(SelectionConfig)["weighting"]),
        default=SelectionConfig().weighting,
        help="how kept probabilities become weights",
    )
    add_config_args(p, SplitConfig, prefix="split-")


def _train_router(ns: argparse.Namespace) -> None:
    from dlp_lora.config import RouterConfig, RouterDataConfig, RouterTrainConfig, SelectionConfig, SplitConfig

    train_cfg = config_from_args(RouterTrainConfig, ns)
    arch = config_from_args(RouterConfig, ns)  # training sets the classes from its data
    if ns.jsonl:
        from dlp_lora.training.router import train_jsonl_router

        if not ns.out:
            raise ValueError("--out is required with --jsonl")
        h = train_jsonl_router(ns.jsonl, ns.out, arch, train_cfg, ns.dev_jsonl, ns.dev_fraction)
        print(
            f"router saved to {ns.out}: best dev accuracy {h['best_dev_acc']:.4f} at epoch {h['best_epoch']}, "
            f"temperature {h['temperature']:.3f}"
        )
        return
    data = config_from_args(RouterDataConfig, ns)
    # --train-cap is the router's own (RouterDataConfig); the split keeps the adapters' default cap.
    split = config_from_args(SplitConfig, ns, prefix="split-")
    selection = SelectionConfig(weighting=ns.weighting)
    if ns.assets:
        from dlp_lora.training.router_pool import train_pool_router

        m = train_pool_router(ns.assets, ns.data_dir, split, arch, train_cfg, data, selection)
        print(json.dumps({k: v for k, v in m.records["router"].items() if k != "p_curve"}, indent=2))
        return
    if not ns.out:
        raise ValueError("--out is required with --tasks")
    from dlp_lora.tasks import task_names
    from dlp_lora.training.router_pool import train_task_router

    tasks = task_names() if ns.tasks == ["all"] else ns.tasks
    record = train_task_router(tasks, ns.out, ns.data_dir, split, arch, train_cfg, data, selection)
    print(json.dumps({k: v for k, v in record.items() if k != "p_curve"}, indent=2))


def _router_report_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import SelectionConfig, SplitConfig

    p.add_argument("--assets", default=DEFAULT_ASSETS, help="assets folder whose router is evaluated")
    p.add_argument(
        "--router",
        default=None,
        help="a router directory to evaluate instead of the assets' router (its own class list names the tasks)",
    )
    p.add_argument("--split", default="test", choices=("dev", "test"), help="held-out split to evaluate on")
    p.add_argument("--data-dir", default=None, help="benchmark data root (default: ../shared/data)")
    p.add_argument("--out", default="docs/router", help="where report.json, report.md and the PNGs go")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="ROUTER_DIR",
        help="also evaluate this router on the same prompts and add a side-by-side table (repeatable)",
    )
    p.add_argument(
        "--same-task",
        action="append",
        default=None,
        metavar="TASK,TASK",
        help="tasks that text cannot tell apart, merged for the grouped accuracy (repeatable; "
        "default: arc_easy,arc_challenge when both are routed)",
    )
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    add_config_args(p, SelectionConfig, overrides_only=True)
    add_config_args(p, SplitConfig)


def _router_report(ns: argparse.Namespace) -> None:
    from dlp_lora.config import SelectionConfig
    from dlp_lora.evaluation.router_eval import router_report_for

    given = flag_values(SelectionConfig, ns)
    groups = [g.split(",") for g in ns.same_task] if ns.same_task is not None else None
    report = router_report_for(
        ns.assets,
        ns.router,
        ns.out,
        ns.split,
        ns.data_dir,
        _split(ns),
        given,
        groups,
        ns.compare,
        latency=not ns.no_latency,
        command="dlp-lora " + " ".join(sys.argv[1:]),
    )
    print((Path(ns.out) / "report.md").read_text())
    print(
        f"top-1 accuracy {100 * report['top1_accuracy']:.2f}% on {report['overall']['prompts']} in-pool "
        f"{ns.split} prompts"
    )


def _split(ns: argparse.Namespace):
    from dlp_lora.config import SplitConfig

    return config_from_args(SplitConfig, ns)


def _add_task_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the new task's name (its router class and adapter folder)")
    p.add_argument("--adapter", required=True, help="the task's PEFT LoRA directory")
    p.add_argument("--examples", required=True, help='its examples: a JSON list or JSONL of {"input", "output"}')
    p.add_argument("--assets", default=DEFAULT_ASSETS, help="assets folder to add it to")
    p.add_argument("--data-dir", default=None, help="benchmark data root, for the other tasks' replay prompts")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps on the new head row (default: 300)")
    p.add_argument(
        "--max-replay-drop",
        type=float,
        default=0.0025,
        help="most of any other class's replay prompts the new class may take; its bias is capped to "
        "keep it (default: 0.0025; 1 = no cap: the new task is recognised more often, at the "
        "others' expense)",
    )


def _add_task(ns: argparse.Namespace) -> None:
    from dlp_lora.training.add_task import add_task_to_assets

    rec = add_task_to_assets(
        ns.assets, ns.name, ns.adapter, ns.examples, ns.data_dir, steps=ns.steps, max_replay_drop=ns.max_replay_drop
    )
    head = rec["router_head"]
    print(
        f"added {ns.name} in {rec['seconds']} s: new-task dev accuracy {head['new_task_dev_accuracy']}, other "
        f"classes' dev accuracy dropped by at most {head['max_drop_points']} points"
    )


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import EvalConfig, SplitConfig

    # Scores must not depend on which kernels were fast on the machine that ran them: fp32 unless asked.
    _pipeline_args(p, quantize="none")
    p.add_argument("--tasks", nargs="*", default=None, help="tasks to evaluate (default: every task of the assets)")
    p.add_argument("--out", default="runs/eval", help="where predictions, results.json/.md and plots go")
    p.add_argument("--data-dir", default=None, help="benchmark data root (default: ../shared/data)")
    add_config_args(p, EvalConfig)
    add_config_args(p, SplitConfig)
    from dlp_lora.config import ArrowConfig

    group = p.add_argument_group("the `arrow`, `arrow-gks` and `dlp+arrow` methods (--methods ... arrow "
                                  "arrow-gks dlp+arrow; --arrow-general names arrow-gks's general adapters)")  # fmt: skip
    add_config_args(group, ArrowConfig, prefix="arrow-")


def _evaluate(ns: argparse.Namespace) -> None:
    from dlp_lora.config import ArrowConfig, EvalConfig, SplitConfig
    from dlp_lora.evaluation.run import run_evaluation

    cfg = config_from_args(EvalConfig, ns)
    split = config_from_args(SplitConfig, ns)
    dlp = _load_pipeline(ns)
    arrow = ArrowConfig(**flag_values(ArrowConfig, ns, prefix="arrow-"))  # the Arrow methods' setting
    run_evaluation(
        dlp, ns.tasks or dlp.task_names, ns.out, cfg, split, ns.data_dir, "dlp-lora " + " ".join(sys.argv[1:]), arrow
    )
    print((Path(ns.out) / "results.md").read_text())


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--assets", default=DEFAULT_ASSETS, help="assets folder holding the adapters")
    p.add_argument("--mix", required=True, help='the mixture, e.g. "task_a=0.7,task_b=0.3"')
    p.add_argument("--out", required=True, help="directory for the exported PEFT adapter")
    p.add_argument("--fp16", action="store_true", help="store fp16 (half the size; default fp32, exact)")


def _export(ns: argparse.Namespace) -> None:
    import torch

    from dlp_lora.adapters.mix import parse_mix
    from dlp_lora.export import export_mixture

    out = export_mixture(ns.assets, parse_mix(ns.mix), ns.out, torch.float16 if ns.fp16 else torch.float32)
    print(f"wrote a PEFT LoRA adapter to {out} (load it with peft, vLLM or LoRAX)")


def _device_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import DeviceConfig

    g = p.add_argument_group("device and precision (default: --device auto --dtype float32)")
    add_config_args(g, DeviceConfig, overrides_only=True)


def _quantize_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    from dlp_lora.config import Quantization

    p.add_argument(
        "--quantize",
        choices=typing.get_args(Quantization),
        default=default,
        help=f"base weights (default: {default}): auto times int8 against fp32 on this CPU at load and "
        "quantizes only the layer shapes where int8 is faster (fp32 on a GPU); none is fp32; int8 "
        "quantizes every layer (CPU; ~4x fewer weight bytes, slow on CPUs without VNNI); the "
        "adapters stay fp32",
    )


def _router_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import ArrowConfig

    group = p.add_argument_group("routing: the trained router, or Arrow's training-free routing per token")
    group.add_argument("--router", choices=("trained", "arrow"), default="trained",
                       help="trained: the assets' router per prompt (default); arrow: every token, in every "
                       "adapted layer, to the deployed adapters whose prototypes match it")  # fmt: skip
    add_config_args(group, ArrowConfig, prefix="arrow-")


def _arrow_of(ns: argparse.Namespace):
    """The ArrowConfig of `--router arrow` (None for the trained router)."""
    from dlp_lora.config import ArrowConfig

    given = flag_values(ArrowConfig, ns, prefix="arrow-")
    if ns.router != "arrow":
        changed = [k for k, v in given.items() if v != getattr(ArrowConfig(), k)]
        if changed:
            raise ValueError(f"--arrow-{changed[0].replace('_', '-')} needs --router arrow")
        return None
    return ArrowConfig(**given)


def _pipeline_args(p: argparse.ArgumentParser, quantize: str = "auto") -> None:
    from dlp_lora.config import SelectionConfig

    p.add_argument("--assets", default=DEFAULT_ASSETS, help="assets folder (adapters + router + manifest)")
    p.add_argument("--base-model", default=None, help="override the manifest's base model (HF dir or hub id)")
    _quantize_arg(p, quantize)
    p.add_argument(
        "--compile",
        action="store_true",
        help="decode with torch.compile over a static KV cache (first call per batch size compiles, "
        "tens of seconds on CPU; later calls decode faster; needs a C++ compiler on CPU)",
    )
    add_config_args(p, SelectionConfig, overrides_only=True)
    _device_args(p)


def _load_pipeline(ns: argparse.Namespace):
    from dlp_lora.assets import Manifest
    from dlp_lora.config import DeviceConfig, SelectionConfig
    from dlp_lora.pipeline import DLPLoRA

    if not (Path(ns.assets) / "manifest.json").exists():
        raise FileNotFoundError(f"no assets at {ns.assets}; build them with `make assets` or pass --assets DIR")
    selection = config_from_args(SelectionConfig, ns, **Manifest.load(ns.assets).selection)
    return DLPLoRA.from_assets(
        ns.assets,
        ns.base_model,
        selection=selection,
        device=config_from_args(DeviceConfig, ns),
        quantize=ns.quantize,
        compile=ns.compile,
        arrow=_arrow_of(ns) if hasattr(ns, "router") else None,
    )


def _generate_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import GenerationConfig, RoutingConfig

    _pipeline_args(p)
    _router_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_config_args(p, GenerationConfig)
    add_config_args(p.add_argument_group("routing granularity (docs: dlp_lora.granularity)"), RoutingConfig)


def _generate(ns: argparse.Namespace) -> None:
    from dlp_lora.config import GenerationConfig, RoutingConfig

    dlp = _load_pipeline(ns)
    results = dlp.generate(
        ns.prompt, config=config_from_args(GenerationConfig, ns), routing_config=config_from_args(RoutingConfig, ns)
    )
    for prompt, r in zip(ns.prompt, results):
        if ns.json:
            print(json.dumps({"prompt": prompt, **dataclasses.asdict(r)}))
            continue
        print(f"[{'arrow, per token' if r.arrow else _mix(r.adapters, r.weights)}] {r.text}")
        for s in r.switches:  # `sentence` routing: where the answer changed mixture
            print(f"  from token {s['token']}: [{_mix(s['adapters'], s['weights'])}]")


def _mix(adapters: Sequence[str], weights: Sequence[float]) -> str:
    return ", ".join(f"{a}={w:.3f}" for a, w in zip(adapters, weights)) or "base model"


def _demo_args(p: argparse.ArgumentParser) -> None:
    _pipeline_args(p)
    _router_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="your own prompt (repeat for several)")
    src.add_argument("--prompts", help="a file of prompts: JSON list, JSONL with 'prompt', or one per line")
    p.add_argument("--max-new-tokens", type=int, default=40, help="default: 40")
    p.add_argument(
        "--sentence-prompt",
        default=None,
        help="the prompt of the last part (answered with routing granularity `sentence`)",
    )


def _demo(ns: argparse.Namespace) -> None:
    from dlp_lora.demo import DEMO_PROMPTS, SENTENCE_DEMO_PROMPT, load_prompts, run_demo, sentence_demo

    prompts = ns.prompt or (load_prompts(ns.prompts) if ns.prompts else list(DEMO_PROMPTS))
    print(f"loading {ns.assets} on the base model (--quantize {ns.quantize}) ...", flush=True)
    dlp = _load_pipeline(ns)
    print(run_demo(dlp, prompts, ns.max_new_tokens))
    print(sentence_demo(dlp, ns.sentence_prompt or SENTENCE_DEMO_PROMPT, max(ns.max_new_tokens, 64)))


def _serve_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import RayServeConfig, RoutingConfig, ServerConfig

    p.add_argument("--assets", default=DEFAULT_ASSETS, help="assets folder (adapters + router + manifest)")
    p.add_argument("--base-model", default=None, help="override the manifest's base model (HF dir or hub id)")
    _quantize_arg(p)
    add_config_args(p, ServerConfig)
    _device_args(p)
    _router_args(p)
    add_config_args(
        p.add_argument_group(
            "routing granularity of routed requests that do not choose one (docs: dlp_lora.granularity)"
        ),
        RoutingConfig,
    )
    ray = p.add_argument_group("scale-out on Ray Serve (needs `pip install 'dlp-lora[ray]'`)")
    ray.add_argument("--ray", action="store_true", help="serve the same app as Ray Serve replicas")
    add_config_args(ray, RayServeConfig, overrides_only=True)


def _serve(ns: argparse.Namespace) -> None:
    from dlp_lora.config import DeviceConfig, RayServeConfig, RoutingConfig, ServerConfig

    cfg = config_from_args(ServerConfig, ns)
    device = config_from_args(DeviceConfig, ns)
    routing = config_from_args(RoutingConfig, ns)
    ray_flags = list(flag_values(RayServeConfig, ns))
    if not ns.ray:
        if ray_flags:
            raise ValueError(f"--{ray_flags[0].replace('_', '-')} needs --ray")
        from dlp_lora.server.app import serve

        return serve(ns.assets, cfg, ns.base_model, device, ns.quantize, routing, _arrow_of(ns))
    if ns.router == "arrow":
        raise ValueError("--router arrow is not served on Ray yet; serve it without --ray")
    from dlp_lora.server.ray import serve_ray

    serve_ray(ns.assets, cfg, config_from_args(RayServeConfig, ns), ns.base_model, ns.quantize, device, routing)


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]
COMMANDS: dict[str, Command] = {
    "bench": ("time base vs peft vs fused mixtures (prefill, decode, memory)", _bench_args, _bench),
    "tasks": ("list the task pool and its splits (markdown)", _tasks_args, _tasks),
    "train-adapter": ("train one LoRA per task into an assets folder", _train_adapter_args, _train_adapter),
    "train-router": (
        "train the task router (on an assets folder's tasks or a labelled JSONL)",
        _train_router_args,
        _train_router,
    ),
    "router-report": (
        "router accuracy per rendering, top-p recall, calibration, none-of-the-above, latency",
        _router_report_args,
        _router_report,
    ),
    "choose-serving": (
        "score the generalist and specialist+generalist per class and choose what serves it "
        "(the gate's rule over every option; resumable)",
        _choose_serving_args,
        _choose_serving,
    ),
    "add-task": ("add a task (adapter + router class) without retraining the router", _add_task_args, _add_task),
    "evaluate": ("every method on every task's test split: tables, plots, predictions", _evaluate_args, _evaluate),
    "generate": ("answer prompts with routed adapter mixtures", _generate_args, _generate),
    "demo": ("a mixed batch of prompts from several tasks, with routing and timing", _demo_args, _demo),
    "serve": ("OpenAI-compatible HTTP server with mixed-task batching", _serve_args, _serve),
    "export": ("write a fixed mixture as one standard PEFT LoRA adapter", _export_args, _export),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlp-lora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    ns = parser.parse_args(argv)
    # Our own notices (e.g. what `--quantize auto` measured and chose) on stderr; other libraries stay quiet.
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("dlp_lora").setLevel(logging.INFO)
    try:
        COMMANDS[ns.command][2](ns)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"dlp-lora {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
