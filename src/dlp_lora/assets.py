"""The assets manifest: which base model, which adapters in which order, which router, and how each was made.

Layout:
    <root>/manifest.json, <root>/adapters/<task>/ (PEFT dirs), <root>/router/ (router weights + config.json)
Router class i is adapter i; `Manifest.check` enforces it so a mismatch can never be silent. A class may map
to no adapter (null): the dev gate found the task's adapter no better than the base model, so routing to
it means "no adapter" (its weight falls on nothing). A class may instead be served by another mixture
(`serve`: e.g. the shared `multitask` generalist, or its specialist on top of the generalist), which the
gate chose for it (`training.choice`); routing to it then puts its weight on that mixture.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_ASSETS = "assets/smollm2-135m-26tasks"
"""The bundled assets folder, relative to the repository root (the CLI's default)."""

__all__ = ["DEFAULT_ASSETS", "Manifest", "MANIFEST_FILE"]

MANIFEST_FILE = "manifest.json"
_FORMAT = 1


@dataclass
class Manifest:
    """Contents of manifest.json. Paths are relative to the assets root."""

    base_model: str
    tasks: list[str] = field(default_factory=list)
    """Task names in router class order; adapters[i] serves tasks[i]."""
    adapters: dict[str, str | None] = field(default_factory=dict)
    """Task name -> adapter directory (relative), or None where the base model serves the task (dev gate)."""
    router: str | None = None
    """Router directory (relative), or None before one is trained."""
    baselines: dict[str, str] = field(default_factory=dict)
    """Adapters outside the router's classes, name -> directory (relative): e.g. the `multitask` LoRA
    trained on every task's data, which evaluation compares against. Loaded after the routed adapters."""
    selection: dict[str, Any] = field(default_factory=dict)
    """SelectionConfig defaults for this asset set."""
    serve: dict[str, dict[str, float]] = field(default_factory=dict)
    """Classes served by something other than their own adapter alone: class -> {adapter: weight}, adapter
    names being tasks with an adapter directory or baselines ({} : the base model). A class not listed is
    served by its own adapter at weight 1, or by the base model where it has none."""
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per artifact (task name or 'router'): data source, split sizes, steps, seed, metrics, seconds."""

    @classmethod
    def load(cls, root: str | Path) -> Manifest:
        path = Path(root) / MANIFEST_FILE
        if not path.exists():
            raise FileNotFoundError(f"expected an assets folder with {MANIFEST_FILE}, found none at {path}")
        data = json.loads(path.read_text())
        if data.pop("format", None) != _FORMAT:
            raise ValueError(f"{path}: expected manifest format {_FORMAT}")
        return cls(**data)

    def save(self, root: str | Path) -> None:
        path = Path(root) / MANIFEST_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"format": _FORMAT, **asdict(self)}, indent=2) + "\n")
        tmp.replace(path)  # atomic, so an interrupted training run never leaves half a manifest

    def check(self, root: str | Path) -> None:
        """Strict consistency: every task has an adapter directory on disk and nothing is extra."""
        root = Path(root)
        if set(self.adapters) != set(self.tasks):
            raise ValueError(f"manifest tasks {sorted(self.tasks)} and adapters {sorted(self.adapters)} differ")
        for task in self.deployed:
            d = root / self.adapters[task]  # type: ignore[operator]
            if not (d / "adapter_config.json").exists():
                raise FileNotFoundError(f"manifest names adapter {task!r} at {d}, but it has no adapter_config.json")
        clash = sorted(set(self.baselines) & set(self.tasks))
        if clash:
            raise ValueError(f"baseline adapters {clash} share names with tasks")
        for name, rel in self.baselines.items():
            if not (root / rel / "adapter_config.json").exists():
                raise FileNotFoundError(
                    f"manifest names baseline {name!r} at {root / rel}, but it has no adapter_config.json"
                )
        for task, mix in self.serve.items():
            unknown = [n for n in mix if n not in self.deployed and n not in self.baselines]
            if task not in self.tasks or unknown or any(w < 0 for w in mix.values()):
                raise ValueError(
                    f"manifest serves {task!r} with {mix}: expected a task of the router and "
                    f"non-negative weights over adapters {self.deployed + list(self.baselines)}"
                )
        if self.router is not None and not (root / self.router / "config.json").exists():
            raise FileNotFoundError(f"manifest names a router at {root / self.router}, but it has no config.json")

    @property
    def deployed(self) -> list[str]:
        """Tasks served by their own adapter, in router class order (the others get the base model)."""
        return [t for t in self.tasks if self.adapters.get(t) is not None]

    def served(self, task: str) -> dict[str, float]:
        """The mixture that serves `task`'s prompts: its `serve` entry, else its own adapter, else {} (base)."""
        if task in self.serve:
            return dict(self.serve[task])
        return {task: 1.0} if self.adapters.get(task) is not None else {}

    def adapter_paths(self, root: str | Path) -> dict[str, Path | None]:
        """Task -> absolute adapter dir (None: the base model serves it), in router class order."""
        return {t: None if self.adapters[t] is None else Path(root) / self.adapters[t] for t in self.tasks}

    def baseline_paths(self, root: str | Path) -> dict[str, Path]:
        """Baseline name -> absolute adapter dir."""
        return {n: Path(root) / rel for n, rel in self.baselines.items()}
