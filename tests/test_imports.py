"""Imports flow one way (docs/design.md): walk every module's own imports and check the layering rules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dlp_lora"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every dlp_lora module a file imports, relative imports resolved."""
    tree = ast.parse(path.read_text())
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dlp_lora")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.startswith("dlp_lora"):
                out.add(base)
    return out


GRAPH = {_module_name(p): _imports(p) for p in SRC.rglob("*.py")}


def _area(module: str) -> str:
    """Top-level area of a module: 'types', 'fusion', 'router', ..."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_graph_is_not_empty():
    assert {"dlp_lora.types", "dlp_lora.fusion.inject", "dlp_lora.router.model", "dlp_lora.pipeline"} <= set(GRAPH)
    assert "dlp_lora.adapters.bank" in GRAPH["dlp_lora.fusion.inject"]


@pytest.mark.parametrize("leaf", ["types", "config"])
def test_leaves_import_nothing_of_ours(leaf):
    """`types` and the `config` package (its modules may import one another) import nothing else of ours."""
    modules = [m for m in GRAPH if m == f"dlp_lora.{leaf}" or m.startswith(f"dlp_lora.{leaf}.")]
    assert modules
    for module in modules:
        assert {d for d in GRAPH[module] if _area(d) != leaf} == set(), module


def test_router_and_fusion_never_import_each_other():
    for module, deps in GRAPH.items():
        areas = {_area(d) for d in deps}
        if _area(module) == "router":
            assert "fusion" not in areas, module
        if _area(module) == "fusion":
            assert "router" not in areas, module


def test_only_pipeline_composes_router_and_fusion():
    # The package root only re-exports the public API (its __all__); it composes nothing.
    both = [m for m, deps in GRAPH.items() if m != "dlp_lora" and {"router", "fusion"} <= {_area(d) for d in deps}]
    assert both == ["dlp_lora.pipeline"]


@pytest.mark.parametrize("top", ["cli", "server", "training"])
def test_entry_points_are_not_imported_from_below(top):
    # The CLI is the top of the stack: it may call into server and training; nothing else may.
    offenders = [m for m, deps in GRAPH.items() if _area(m) not in (top, "cli") and any(_area(d) == top for d in deps)]
    assert offenders == []


# Heavy libraries `dlp-lora --help` must not load: they take seconds to import (issue 14, item 4).
HEAVY = ("torch", "transformers", "numpy", "safetensors", "peft")


def _modules_loaded_by(code: str) -> set[str]:
    """Top-level modules a fresh interpreter has loaded after running `code` (src/ first on the path)."""
    import json
    import subprocess
    import sys

    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    env = {"PYTHONPATH": str(SRC.parent), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_of_every_command_imports_no_heavy_library():
    # main() builds every subcommand's parser, so this covers `dlp-lora <any command> --help` too.
    code = (
        "import contextlib, io\nfrom dlp_lora.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "for c in ('evaluate', 'serve', 'generate', 'export', 'bench'):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main([c, '--help'])"
    )
    loaded = _modules_loaded_by(code)
    assert "dlp_lora" in loaded
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_package_exports_are_lazy_and_resolve():
    assert _modules_loaded_by("import dlp_lora").isdisjoint(HEAVY)
    import dlp_lora
    from dlp_lora.fusion.inject import FusedLoRAModel
    from dlp_lora.pipeline import DLPLoRA

    assert dlp_lora.FusedLoRAModel is FusedLoRAModel and dlp_lora.DLPLoRA is DLPLoRA
    for name in dlp_lora.__all__:  # every advertised export really exists
        assert getattr(dlp_lora, name) is not None
    assert set(dlp_lora.__all__) <= set(dir(dlp_lora))
    with pytest.raises(AttributeError, match="no attribute 'Nope'.*exports"):
        dlp_lora.Nope  # noqa: B018 (the attribute access is what raises)


def test_nothing_imports_the_ray_deployment():
    # server/ray.py needs the optional `ray` extra: only the CLI may reach it (inside `serve --ray`).
    offenders = [m for m, deps in GRAPH.items() if m != "dlp_lora.cli" and "dlp_lora.server.ray" in deps]
    assert "dlp_lora.server.ray" in GRAPH and offenders == []


def test_the_ray_deployment_reuses_the_app():
    # docs/design.md: scale-out serves the same FastAPI app, no second serving stack.
    assert "dlp_lora.server.app" in GRAPH["dlp_lora.server.ray"]
