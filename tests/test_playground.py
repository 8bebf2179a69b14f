"""The playground page at `/`, in a real headless browser (Debian's chromium, `make browser`): the page
loads, a prompt is sent, the router's bars, the mixture, the streamed answer and (under sentence routing)
each mid-answer switch appear. Driven over the
Chrome DevTools protocol; skipped with the reason when no chromium is installed."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
from urllib.parse import quote

import httpx
import pytest
from test_server import ADAPTERS, SENTENCE_PROMPT, _alone, _busy, _cfg, _sentence_ref, _wait_for, server_assets

from dlp_lora.pipeline import DLPLoRA
from dlp_lora.server import create_app


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return server_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(assets) -> DLPLoRA:
    return DLPLoRA.from_assets(assets)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (install it with `make browser`)")
websockets_sync = pytest.importorskip("websockets.sync.client", reason="the websockets package is not installed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Page:
    """One browser tab over the DevTools protocol: evaluate JavaScript, read the result."""

    def __init__(self, ws_url: str) -> None:
        self.ws, self.next_id = websockets_sync.connect(ws_url, max_size=None), 0

    def eval(self, expression: str):
        self.next_id += 1
        self.ws.send(
            json.dumps(
                {
                    "id": self.next_id,
                    "method": "Runtime.evaluate",
                    "params": {"expression": expression, "returnByValue": True},
                }
            )
        )
        while True:
            msg = json.loads(self.ws.recv(30))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    # Evaluated while the page navigated (the polls race `location.href = ...`): Chromium says
                    # "Execution context was destroyed", "Cannot find context" or "Inspected target navigated
                    # or closed", by timing. Nothing to read yet, the caller polls again. Any other DevTools
                    # error is a failure.
                    message = msg["error"].get("message", "").lower()
                    if "context" in message or "navigated" in message:
                        return None
                    raise RuntimeError(f"DevTools refused {expression!r}: {msg['error']}")
                return msg["result"]["result"].get("value")


@pytest.fixture
def browser(tmp_path):
    debug = _port()
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--remote-debugging-port={debug}",
            f"--user-data-dir={tmp_path}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: _targets(debug) is not None, 60)
        yield debug
    finally:
        proc.terminate()
        proc.wait(20)


def _targets(debug: int) -> list | None:
    try:
        return httpx.get(f"http://127.0.0.1:{debug}/json/list", timeout=2).json()
    except (httpx.TransportError, ValueError):
        return None


def _show(pipe, browser, query: str) -> dict:
    """Serve `pipe`, open the page with `query` (which sends a prompt) and read what it shows once the answer
    has finished: the bars (task, chosen), the answer, the mixture, the switch list and the error line."""
    uvicorn = pytest.importorskip("uvicorn")
    port = _port()
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, _cfg()), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started, 60)
        tab = next(t for t in _targets(browser) if t["type"] == "page")
        page = _Page(tab["webSocketDebuggerUrl"])
        page.eval(f"location.href = 'http://127.0.0.1:{port}/?send=1&{query}'")
        _wait_for(
            lambda: (
                page.eval(
                    "document.getElementById('answer') && document.getElementById('answer').dataset.finish || null"
                )
                is not None
            ),
            60,
        )
        return page.eval("""({
            bars: [...document.querySelectorAll('#bars .bar')].map(b => [b.dataset.task, b.classList.contains('chosen')]),
            answer: document.getElementById('answer').textContent,
            mixture: document.getElementById('mixture').textContent,
            switches: [...document.querySelectorAll('#switches li')].map(li => [Number(li.dataset.token), li.textContent]),
            error: document.getElementById('error').textContent })""")
    finally:
        server.should_exit = True
        thread.join(15)


def test_playground_shows_bars_mixture_and_streamed_answer(pipe, browser):
    prompt = "What is 3 + 4?"
    ref = _alone(pipe, prompt, 6)  # greedy, router-chosen: what the page must show
    shown = _show(pipe, browser, f"max_tokens=6&prompt={quote(prompt)}")
    assert shown["error"] == "" and shown["answer"] == ref.text and shown["switches"] == []
    assert sorted(task for task, _ in shown["bars"]) == sorted(ADAPTERS)
    assert sorted(task for task, chosen in shown["bars"] if chosen) == sorted(ref.adapters)
    assert re.findall(r"[a-z]+", shown["mixture"]) == ref.adapters


def test_playground_lists_the_switches_of_sentence_routing(assets, browser):
    """Routing `sentence` chosen on the page: the bars are the last segment's, the answer is the library's
    and every mid-answer switch is listed with its first token and mixture."""
    pipe = _busy(assets)
    ref = _sentence_ref(pipe, SENTENCE_PROMPT, 12)
    shown = _show(pipe, browser, f"max_tokens=12&granularity=sentence&prompt={quote(SENTENCE_PROMPT)}")
    assert shown["error"] == "" and shown["answer"] == ref.text and ref.switches
    assert sorted(task for task, chosen in shown["bars"] if chosen) == sorted(ref.adapters)  # the answer's start
    assert [token for token, _ in shown["switches"]] == [s["token"] for s in ref.switches]
    for (_, text), s in zip(shown["switches"], ref.switches):
        assert re.findall(r"[a-z]+", text.split(":", 1)[1]) == s["adapters"]
