"""`dlp-lora` command line: one thin subcommand per library entry point.

Each subcommand parses its flags (built from the library's config dataclasses where there is one) and
calls one library function. Heavy imports happen inside the subcommand so `dlp-lora --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["main"]

DEFAULT_ASSETS = "assets/smollm2-135m-26tasks"


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One --flag per dataclass field (dashes for underscores), defaults and help from the dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, hint, default = "--" + f.name.replace("_", "-"), hints[f.name], f.default
        origin = typing.get_origin(hint)
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif origin is tuple:
            item = typing.get_args(hint)[0]
            parser.add_argument(flag, nargs="*", type=item, default=default, help=f"default: {default}")
        elif origin is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(hint), default=default)
        else:
            scalar = next((t for t in typing.get_args(hint) if t is not type(None)), hint) if origin else hint
            parser.add_argument(flag, type=scalar, default=default, help=f"default: {default}")


def config_from_args(cls: type, ns: argparse.Namespace) -> Any:
    """Build the dataclass from parsed flags; its __post_init__ validates (errors name the field)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**values)


# ---- subcommands -------------------------------------------------------------------------------------

def _bench_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.benchmark import BenchConfig

    add_config_args(p, BenchConfig)
    p.add_argument("--quick", action="store_true", help="a reduced set that runs in under a minute")
    p.add_argument("--base-model", default=None, help="HF dir or hub id (default: the embedded SmolLM2)")
    p.add_argument("--json", default=None, help="write every figure here")
    p.add_argument("--markdown", default=None, help="write the markdown table here (e.g. docs/performance.md)")


def _bench(ns: argparse.Namespace) -> None:
    from dlp_lora.benchmark import BenchConfig, markdown_table, run_fusion_benchmark, save_json
    from dlp_lora.models import load_base_model

    cfg = BenchConfig.quick() if ns.quick else config_from_args(BenchConfig, ns)
    model, _ = load_base_model(ns.base_model)
    result = run_fusion_benchmark(model, cfg)
    table = markdown_table(result, "dlp-lora " + " ".join(sys.argv[1:]))
    print(table)
    if ns.json:
        save_json(result, ns.json)
    if ns.markdown:
        _write_section(Path(ns.markdown), "## Fusion latency", table)


def _write_section(path: Path, heading: str, body: str) -> None:
    """Replace the section that starts with `heading` (up to the next '## ') in a markdown file, or append."""
    text = path.read_text() if path.exists() else "# Performance\n\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + body.rstrip("\n") + ("\n" + text[end:] if end >= 0 else "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _tasks_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import SplitConfig

    add_config_args(p, SplitConfig)
    p.add_argument("--data-dir", default=None, help="benchmark data root (default: ../shared/data)")
    p.add_argument("--markdown", default=None, help="write the pool table here (e.g. docs/tasks.md)")


def _tasks(ns: argparse.Namespace) -> None:
    from dlp_lora.config import SplitConfig
    from dlp_lora.tasks import pool_table

    table = pool_table(ns.data_dir, config_from_args(SplitConfig, ns))
    print(table)
    if ns.markdown:
        Path(ns.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.markdown).write_text(table if table.endswith("\n") else table + "\n")


def _train_adapter_args(p: argparse.ArgumentParser) -> None:
    from dlp_lora.config import AdapterTrainConfig, SplitConfig

    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--task", action="append", help="task name (repeatable)")
    group.add_argument("--all", action="store_true", help="every task in the registry")
    p.add_argument("--assets", default=DEFAULT_ASSETS, help="assets folder to write adapters and manifest into")
    p.add_argument("--data-dir", default=None, help="benchmark data root (default: ../shared/data)")
    p.add_argument("--base-model", default=None, help="HF dir or hub id (default: the embedded SmolLM2)")
    add_config_args(p, AdapterTrainConfig)
    add_config_args(p, SplitConfig, skip=("seed",))


def _train_adapter(ns: argparse.Namespace) -> None:
    from dlp_lora.config import AdapterTrainConfig, SplitConfig
    from dlp_lora.tasks import task_names
    from dlp_lora.training.pool import train_pool_adapters

    tasks = task_names() if ns.all else ns.task
    split = SplitConfig(train_cap=ns.train_cap, dev_size=ns.dev_size, test_size=ns.test_size)
    manifest = train_pool_adapters(ns.assets, tasks, ns.data_dir, split, config_from_args(AdapterTrainConfig, ns),
                                   ns.base_model)
    for t in tasks:
        rec = manifest.records[t]
        print(f"{t:32s} steps={rec['steps']:4d} loss={rec['final_train_loss']:.3f} dev={rec['dev']}")


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]
COMMANDS: dict[str, Command] = {
    "bench": ("time base vs peft vs fused mixtures (prefill, decode, memory)", _bench_args, _bench),
    "tasks": ("list the task pool and its splits (markdown)", _tasks_args, _tasks),
    "train-adapter": ("train one LoRA per task into an assets folder", _train_adapter_args, _train_adapter),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlp-lora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    ns = parser.parse_args(argv)
    try:
        COMMANDS[ns.command][2](ns)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"dlp-lora {ns.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
