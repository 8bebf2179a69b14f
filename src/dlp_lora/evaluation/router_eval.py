"""The router report of an assets folder (or a router directory) on its format-shift test set.

Loads the router, renders every held-out example of its tasks in every rendering (plus out-of-pool
prompts when it has a `none` class), and writes the report of `router_report` (optionally beside other
routers evaluated on the same prompts).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..assets import Manifest
from ..config import RouterDataConfig, SelectionConfig, SplitConfig
from ..router import Router
from ..tasks.out_of_pool import NONE, is_unseen_source
from ..tasks.renderings import HELD_OUT_RENDERINGS
from ..tasks.router_prompts import manifest_task, pool_test_prompts, task_classes
from .router_report import comparison_markdown, router_report

__all__ = ["router_report_for"]

_ARC = ("arc_easy", "arc_challenge")


def router_report_for(
    assets: str | os.PathLike | None,
    router_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    split: str = "test",
    data_dir: str | os.PathLike | None = None,
    split_cfg: SplitConfig = SplitConfig(),
    selection: dict[str, Any] | None = None,
    same_task: Sequence[Sequence[str]] | None = None,
    compare: Sequence[str | os.PathLike] = (),
    latency: bool = True,
    command: str = "",
) -> dict:
    """Report on the router of `assets` (or on `router_dir` alone, whose classes must be registry tasks).

    selection: SelectionConfig fields overriding the manifest's defaults (a bare router: the library's).
    same_task: indistinguishable groups (default: ARC-Easy and ARC-Challenge when both are routed).
    """
    gated: list[str] = []
    if router_dir is not None:
        router = Router.load(router_dir)
        tasks: list = [t for t in router.task_names if t != NONE]
        base = SelectionConfig()
    else:
        if assets is None:
            raise ValueError("pass an assets folder or a router directory")
        manifest = Manifest.load(assets)
        router = Router.load(Path(assets) / (manifest.router or "router"), expected_tasks=manifest.tasks)
        tasks = [manifest_task(manifest, t, assets) for t in task_classes(manifest)]
        base = SelectionConfig(**manifest.selection)
        gated = [t for t in task_classes(manifest) if manifest.adapters.get(t) is None]
    chosen = replace(base, **(selection or {}))
    groups = list(same_task) if same_task is not None else [g for g in (_ARC,) if set(g) <= set(router.task_names)]
    prompts = pool_test_prompts(
        tasks, data_dir, split_cfg, RouterDataConfig(none_class=NONE in router.task_names), split
    )
    # Only out-of-pool sources can be unseen (an in-pool task's name may hash into the unseen quarter too).
    unseen = sorted({s for s, lab in zip(prompts.sources, prompts.labels) if lab == NONE and is_unseen_source(s)})
    report = router_report(
        router,
        prompts.texts,
        prompts.labels,
        out_dir,
        selection=chosen,
        same_task=groups,
        renderings=prompts.renderings,
        sources=prompts.sources,
        held_out=HELD_OUT_RENDERINGS,
        unseen_sources=unseen,
        command=command,
        latency=latency,
        base_served=gated,
    )
    if compare:
        reports = [("this router", report)]
        for i, other_dir in enumerate(compare):
            other = Router.load(other_dir)
            rows = [j for j, lab in enumerate(prompts.labels) if lab in other.task_names]
            pick = lambda xs: [xs[j] for j in rows]  # noqa: E731
            reports.append(
                (
                    str(other_dir),
                    router_report(
                        other,
                        pick(prompts.texts),
                        pick(prompts.labels),
                        Path(out_dir) / f"compare-{i}",
                        selection=chosen,
                        same_task=[g for g in groups if set(g) <= set(other.task_names)],
                        renderings=pick(prompts.renderings),
                        sources=pick(prompts.sources),
                        held_out=HELD_OUT_RENDERINGS,
                        latency=latency,
                    ),
                )
            )
        with open(Path(out_dir) / "report.md", "a") as fh:
            fh.write("\n" + comparison_markdown(reports))
    return report
