"""Train a router on labelled prompts: AdamW + cross-entropy, early stopping on dev accuracy, then
temperature scaling on dev (so its probabilities are calibrated for top-p selection).

Fully seeded: the same data and configs give bit-identical weights (on the same machine and threads).
For the encoder router the frozen sentence features are computed once per call, so an epoch only
runs the small MLP head.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import RouterConfig, RouterTrainConfig
from ..router import Router
from ..router.calibration import fit_temperature

__all__ = ["train_router", "load_labelled_jsonl", "stratified_split", "calibrate", "train_jsonl_router"]

# Rows per forward pass when computing frozen features or dev accuracy (no gradients, so bigger is fine).
_EVAL_BATCH = 128

# Logits for a batch of example positions (into the train or dev set).
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def load_labelled_jsonl(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(texts, task names) from JSONL rows ``{"text": ..., "task": ...}``; blank lines are skipped."""
    texts: list[str] = []
    tasks: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected an object with 'text' and 'task', got {type(row).__name__}"
                )
            for key in ("text", "task"):
                if not isinstance(row.get(key), str) or not row[key]:
                    raise ValueError(f"{path}:{lineno}: '{key}' must be a non-empty string, got {row.get(key)!r}")
            texts.append(row["text"])
            tasks.append(row["task"])
    if not texts:
        raise ValueError(f"{path}: no labelled rows")
    return texts, tasks


def stratified_split(
    texts: Sequence[str], labels: Sequence[str], dev_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str], list[str], list[str]]:
    """(train_texts, train_labels, dev_texts, dev_labels): a seeded shuffle of each label's rows, of which
    round(dev_fraction * n) (at least 1 when the label has 2 or more rows) go to dev; order within each
    side follows the input. A file sorted by label still gives every label a dev share."""
    if len(texts) != len(labels):
        raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    dev: set[int] = set()
    for lab in sorted(by_label):  # sorted: the draw does not depend on which label comes first
        rows = by_label[lab]
        n_dev = max(1, round(dev_fraction * len(rows))) if len(rows) >= 2 else 0
        dev.update(rng.sample(rows, n_dev))
    train_idx = [i for i in range(len(texts)) if i not in dev]
    dev_idx = sorted(dev)
    return (
        [texts[i] for i in train_idx],
        [labels[i] for i in train_idx],
        [texts[i] for i in dev_idx],
        [labels[i] for i in dev_idx],
    )


def _label_ids(texts: Sequence[str], labels: Sequence[str], task_names: Sequence[str], split: str) -> torch.Tensor:
    """Class ids (B,) long for task-name labels, checked against the router's class order."""
    if len(texts) != len(labels):
        raise ValueError(f"{split}: {len(texts)} texts but {len(labels)} labels")
    if not texts:
        raise ValueError(f"{split} set is empty; early stopping needs a dev set")
    index = {name: i for i, name in enumerate(task_names)}
    unknown = sorted({str(lab) for lab in labels if lab not in index})
    if unknown:
        raise ValueError(f"{split} labels {unknown} are not among the router's tasks {list(task_names)}")
    return torch.tensor([index[lab] for lab in labels], dtype=torch.long)


def _frozen_features(router: Router, ids: list[list[int]], progress: bool = True) -> torch.Tensor:
    """Pooled encoder features (B, D) for every example, computed once in eval mode."""
    router.eval()
    starts = tqdm(range(0, len(ids), _EVAL_BATCH), desc="encoder features", unit="batch", disable=not progress)
    with torch.no_grad():
        return torch.cat([router.features(*router.collate(ids[i : i + _EVAL_BATCH])) for i in starts])


def _logits_fn(router: Router, texts: Sequence[str], progress: bool = True) -> LogitsFn:
    """Tokenise once; returns positions (b,) -> logits (b, N) (head-only over cached features for encoders)."""
    ids = router.token_ids(texts)
    if router.encoder is not None:
        feats = _frozen_features(router, ids, progress)
        return lambda pos: router.head(feats[pos])
    return lambda pos: router(*router.collate([ids[i] for i in pos.tolist()]))


def _evaluate(router: Router, logits: LogitsFn, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over a labelled set, in eval mode."""
    router.eval()
    with torch.no_grad():
        out = torch.cat([logits(pos) for pos in torch.arange(len(labels)).split(_EVAL_BATCH)])
    return float((out.argmax(dim=-1) == labels).float().mean()), float(nn.functional.cross_entropy(out, labels))


def _run_epoch(
    router: Router,
    logits: LogitsFn,
    labels: torch.Tensor,
    opt: torch.optim.Optimizer,
    batch_size: int,
    gen: torch.Generator,
) -> float:
    """One pass in seeded random order; returns the mean training loss."""
    router.train()
    loss_fn = nn.CrossEntropyLoss()
    total, seen = 0.0, 0
    for pos in torch.randperm(len(labels), generator=gen).split(batch_size):
        loss = loss_fn(logits(pos), labels[pos])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, seen = total + float(loss.detach()) * len(pos), seen + len(pos)
    return total / seen


def train_router(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    dev_texts: Sequence[str],
    dev_labels: Sequence[str],
    router_cfg: RouterConfig,
    train_cfg: RouterTrainConfig,
    progress: bool = True,
) -> tuple[Router, dict]:
    """Train a new router; labels are task names in ``router_cfg.task_names``.

    Early stopping keeps the epoch with the best dev accuracy (ties: lowest dev loss) and stops after
    ``patience`` epochs without a better one.

    The best weights are then calibrated: the temperature that minimises dev cross-entropy is stored in
    ``router.cfg.temperature`` (saved with the router, applied by ``predict_proba``).

    Returns the router (eval mode, best weights restored) and a history dict: ``epochs`` (list of
    {epoch, loss, dev_acc, dev_loss}), ``best_epoch``, ``best_dev_acc``, ``best_dev_loss``,
    ``stopped_early``, ``temperature``, ``seconds``, ``trainable_params``.
    """
    start = time.perf_counter()
    y_train = _label_ids(train_texts, train_labels, router_cfg.task_names, "train")
    y_dev = _label_ids(dev_texts, dev_labels, router_cfg.task_names, "dev")
    # fork_rng: seed init and dropout without leaving the caller's global RNG changed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(train_cfg.seed)
        router = Router(router_cfg)
        gen = torch.Generator().manual_seed(train_cfg.seed)
        dev_logits = _logits_fn(router, dev_texts, progress)
        history = _fit(
            router, _logits_fn(router, train_texts, progress), y_train, dev_logits, y_dev, train_cfg, gen, progress
        )
        history["temperature"] = _calibrate(router, dev_logits, y_dev)
    history["seconds"] = time.perf_counter() - start
    history["trainable_params"] = router.num_parameters(trainable_only=True)
    return router.eval(), history


def _calibrate(router: Router, dev_logits: LogitsFn, y_dev: torch.Tensor) -> float:
    """Fit the temperature on dev logits and store it in router.cfg; returns it."""
    router.eval()
    with torch.no_grad():
        out = torch.cat([dev_logits(pos) for pos in torch.arange(len(y_dev)).split(_EVAL_BATCH)])
    router.cfg = replace(router.cfg, temperature=fit_temperature(out, y_dev))
    return router.cfg.temperature


def calibrate(router: Router, dev_texts: Sequence[str], dev_labels: Sequence[str]) -> float:
    """Refit a trained router's temperature on labelled prompts (task names); stored in router.cfg."""
    y_dev = _label_ids(dev_texts, dev_labels, router.task_names, "dev")
    return _calibrate(router, _logits_fn(router, dev_texts, progress=False), y_dev)


def train_jsonl_router(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    router_cfg: RouterConfig,
    train_cfg: RouterTrainConfig,
    dev_path: str | os.PathLike | None = None,
    dev_fraction: float = 0.1,
    progress: bool = True,
) -> dict:
    """Train a router on a labelled JSONL file and save it; classes in order of first appearance.

    Dev: `dev_path` when given, else a seeded stratified `dev_fraction` of the file (seed train_cfg.seed).
    Returns the history of :func:`train_router` with ``out_dir``.
    """
    texts, labels = load_labelled_jsonl(path)
    if dev_path is not None:
        dev_texts, dev_labels = load_labelled_jsonl(dev_path)
    else:
        texts, labels, dev_texts, dev_labels = stratified_split(texts, labels, dev_fraction, train_cfg.seed)
    cfg = replace(router_cfg, task_names=tuple(dict.fromkeys(labels)))
    router, history = train_router(texts, labels, dev_texts, dev_labels, cfg, train_cfg, progress)
    router.save(out_dir)
    return {**history, "out_dir": str(Path(out_dir))}


def _fit(
    router: Router,
    train_logits: LogitsFn,
    y_train: torch.Tensor,
    dev_logits: LogitsFn,
    y_dev: torch.Tensor,
    cfg: RouterTrainConfig,
    gen: torch.Generator,
    progress: bool,
) -> dict:
    """The epoch loop with early stopping; leaves the best weights in router."""
    params = [p for p in router.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    best: tuple[float, float] = (-1.0, 0.0)  # (dev accuracy, -dev loss); epoch 1 always improves on it
    best_epoch = 0
    best_state: dict[str, torch.Tensor] = {}
    epochs: list[dict] = []
    bar = tqdm(range(1, cfg.epochs + 1), desc="router", unit="epoch", disable=not progress)
    for epoch in bar:
        loss = _run_epoch(router, train_logits, y_train, opt, cfg.batch_size, gen)
        acc, dev_loss = _evaluate(router, dev_logits, y_dev)
        epochs.append({"epoch": epoch, "loss": loss, "dev_acc": acc, "dev_loss": dev_loss})
        bar.set_postfix(loss=f"{loss:.4f}", dev_acc=f"{acc:.3f}")
        # Dev accuracy saturates early on easy task sets; the lower dev loss then breaks the tie, because
        # top-p selection needs calibrated, confident probabilities and not just the right argmax.
        if (acc, -dev_loss) > best:
            best, best_epoch = (acc, -dev_loss), epoch
            best_state = {k: v.detach().clone() for k, v in router.trainable_state_dict().items()}
        elif epoch - best_epoch >= cfg.patience:
            break
    bar.close()
    router.load_trainable_state_dict(best_state)
    return {
        "epochs": epochs,
        "best_epoch": best_epoch,
        "best_dev_acc": best[0],
        "best_dev_loss": -best[1],
        "stopped_early": len(epochs) < cfg.epochs,
    }
