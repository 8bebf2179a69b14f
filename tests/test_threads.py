"""Thread safety of `routed` (issue 14, item 2): threads sharing one fused model never swap routings."""

from __future__ import annotations

import linecache
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import make_tiny_assets, tiny_pipeline

from dlp_lora import FusedLoRAModel
from dlp_lora.config import GenerationConfig
from dlp_lora.models import load_tokenizer
from dlp_lora.types import Routing

IDS = torch.tensor([[5, 9, 17, 33, 2, 40]])
ROUTINGS = [torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.3, 0.7]]), torch.tensor([[0.2, 0.5, 0.3]])]


def _logits(model, fused, weights) -> torch.Tensor:
    with torch.no_grad(), fused.routed(weights):
        return model(input_ids=IDS).logits


def _waits_on_the_routing_lock(thread: threading.Thread, seconds: float = 10.0) -> bool:
    """True once `thread` stands at the lock acquisition of `FusedLoRAModel.routed` (where it blocks while
    another thread's block holds the lock), found from its live frame: no sleep decides the outcome."""
    code = FusedLoRAModel.routed.__wrapped__.__code__
    end = time.monotonic() + seconds
    while thread.is_alive() and time.monotonic() < end:
        frame = sys._current_frames().get(thread.ident)
        while frame is not None and frame.f_code is not code:
            frame = frame.f_back
        if frame is not None and "self._lock" in linecache.getline(code.co_filename, frame.f_lineno):
            return True
        time.sleep(0.001)
    return False


def test_second_thread_waits_for_the_first_block(tiny_model, adapter_dirs):
    fused = FusedLoRAModel(tiny_model, adapter_dirs)
    want = [_logits(tiny_model, fused, w) for w in ROUTINGS[:2]]
    inside, release = threading.Event(), threading.Event()
    got: dict[str, torch.Tensor] = {}

    def first() -> None:
        with torch.no_grad(), fused.routed(ROUTINGS[0]):
            inside.set()
            release.wait(10)
            got["first"] = tiny_model(input_ids=IDS).logits  # after the second thread tried to route

    def second() -> None:
        got["second"] = _logits(tiny_model, fused, ROUTINGS[1])

    a = threading.Thread(target=first)
    a.start()
    assert inside.wait(10)
    b = threading.Thread(target=second)
    b.start()
    assert _waits_on_the_routing_lock(b), "the second thread never waited for the first one's block"
    assert b.is_alive() and "second" not in got  # blocked on the first block, not failed, not interleaved
    release.set()
    a.join(10), b.join(10)
    torch.testing.assert_close(got["first"], want[0], atol=0, rtol=0)
    torch.testing.assert_close(got["second"], want[1], atol=0, rtol=0)
    assert fused.active_path is None


def test_many_threads_each_get_their_own_mixture(tiny_model, adapter_dirs):
    fused = FusedLoRAModel(tiny_model, adapter_dirs)
    want = [_logits(tiny_model, fused, w) for w in ROUTINGS]
    jobs = [i % len(ROUTINGS) for i in range(24)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: _logits(tiny_model, fused, ROUTINGS[i]), jobs))
    for i, g in zip(jobs, got):
        torch.testing.assert_close(g, want[i], atol=0, rtol=0)


def test_reroute_from_another_thread_refused(tiny_model, adapter_dirs):
    fused = FusedLoRAModel(tiny_model, adapter_dirs)
    errors: list[BaseException] = []

    def intruder() -> None:
        try:
            fused.reroute(ROUTINGS[1])
        except RuntimeError as exc:
            errors.append(exc)

    with fused.routed(ROUTINGS[0]):
        t = threading.Thread(target=intruder)
        t.start(), t.join(10)
        assert fused._slot.active.routing == Routing.from_dense(ROUTINGS[0])
    assert len(errors) == 1 and "thread that opened it" in str(errors[0])


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_pipeline_generate_from_threads_equals_serial(tmp_path, tok):
    dlp = tiny_pipeline(make_tiny_assets(tmp_path / "assets", len(tok)), tok)
    batches = [["What is 3 + 4?"], ["Which planet is largest?", "Name a noble gas."], ["Solve 2x = 6."]]
    routings = [
        Routing.from_dense(torch.tensor([[1.0, 0.0]] * len(b)))
        if i % 2
        else Routing.from_dense(torch.tensor([[0.0, 1.0]] * len(b)))
        for i, b in enumerate(batches)
    ]
    cfg = GenerationConfig(max_new_tokens=6)
    want = [dlp.generate(b, config=cfg, routing=r) for b, r in zip(batches, routings)]
    jobs = list(range(len(batches))) * 3
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda i: dlp.generate(batches[i], config=cfg, routing=routings[i]), jobs))
    for i, g in zip(jobs, got):
        assert [r.text for r in g] == [r.text for r in want[i]]
