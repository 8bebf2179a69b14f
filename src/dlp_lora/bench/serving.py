"""Load tests of OpenAI-style servers (ours, llama.cpp's): streamed requests from concurrent clients, and a
tiny assets folder for load tests and fuzzing (the serving machinery without the real model's cost)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Streamed", "build_tiny_assets", "client_load", "pool_prompts", "stream_one"]


@dataclass(frozen=True)
class Streamed:
    """One streamed answer: seconds to its first token and in all, and its tokens (the usage the server
    reported, else the chunks that carried text)."""

    ttft: float
    total: float
    tokens: int

    @property
    def per_token(self) -> float | None:
        """Seconds per token after the first (None for a one-token answer)."""
        return (self.total - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None


def stream_one(http, url: str, path: str, body: dict) -> Streamed:
    """POST `body` (with `stream: true`) to url+path and read the server-sent events to the end; raises on an
    HTTP error or an error event."""
    import httpx

    start = time.perf_counter()
    first, chunks, usage = None, 0, None
    with http.stream("POST", f"{url}{path}", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            raise httpx.HTTPStatusError(f"status {r.status_code}: {r.text[:200]}", request=r.request, response=r)
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise ValueError(chunk["error"].get("message", str(chunk["error"])))
            texts = [c.get("text") or (c.get("delta") or {}).get("content") for c in chunk.get("choices", [])]
            if any(texts):
                chunks += 1
                if first is None:
                    first = time.perf_counter() - start
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return Streamed(total if first is None else first, total, usage if usage is not None else chunks)


def client_load(
    url: str, path: str, bodies: Sequence[dict], clients: int, timeout: float
) -> tuple[list[Streamed], int, float]:
    """Send `bodies` (streamed) from `clients` concurrent client threads, each taking the next body when its
    last answer ended; returns (the answers, errors, wall seconds)."""
    import httpx

    done: list[Streamed] = []
    errors, lock, todo = [0], threading.Lock(), iter(bodies)

    def client() -> None:
        with httpx.Client(timeout=timeout) as http:
            while True:
                with lock:
                    body = next(todo, None)
                if body is None:
                    return
                try:
                    try:
                        answer = stream_one(http, url, path, body)
                    except httpx.RemoteProtocolError:  # a kept-alive connection the server had closed: once more
                        answer = stream_one(http, url, path, body)
                except (httpx.HTTPError, ValueError, KeyError):
                    with lock:
                        errors[0] += 1
                    continue
                with lock:
                    done.append(answer)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done, errors[0], time.perf_counter() - start


def pool_prompts(assets: str | Path, data_dir: str | None, n: int) -> list[str]:
    """n test prompts of an assets folder's pool, round robin over its tasks (a mixed request stream)."""
    from dlp_lora.assets import Manifest
    from dlp_lora.tasks import get_task, load_splits

    tests = {t: load_splits(get_task(t), data_dir).test for t in Manifest.load(assets).tasks if t != "none"}
    names = sorted(tests)
    return [tests[names[i % len(names)]][i // len(names)].prompt for i in range(n)]


def build_tiny_assets(root: Path) -> Path:
    """A complete assets folder on a tiny random Llama with the real tokenizer: 4 random adapters and an
    untrained router. Answers are gibberish; only the serving machinery is exercised."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from dlp_lora.assets import Manifest
    from dlp_lora.config import RouterConfig
    from dlp_lora.models import load_tokenizer
    from dlp_lora.router import Router

    tasks = ("arithmetic", "translation", "sentiment", "trivia")
    tok = load_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tok.pad_token_id,
            bos_token_id=1,
            eos_token_id=tok.eos_token_id,
        )
    ).eval()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, task in enumerate(tasks):
        torch.manual_seed(i + 1)
        peft_model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        peft_model.save_pretrained(root / "adapters" / task, safe_serialization=True)
        model = peft_model.unload()
    Router(RouterConfig(task_names=tasks, embed_dim=8, hidden_dim=16)).save(root / "router")
    Manifest(
        base_model=str(root / "base"),
        tasks=list(tasks),
        adapters={t: f"adapters/{t}" for t in tasks},
        router="router",
        selection={"p": 0.6},
    ).save(root)
    return root
