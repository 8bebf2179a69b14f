"""The playground page at `/`, in a real headless browser (Debian's chromium, `make browser`): the page
loads, a prompt is sent, the router's bars, the mixture and the streamed answer appear. Driven over the
Chrome DevTools protocol; skipped with the reason when no chromium is installed."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import threading
import time
from urllib.parse import quote

import httpx
import pytest

from dlp_lora.server import create_app
from test_server import ADAPTERS, _alone, _cfg, _wait_for, pipe, assets  # noqa: F401  (fixtures)

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
        self.ws.send(json.dumps({"id": self.next_id, "method": "Runtime.evaluate",
                                 "params": {"expression": expression, "returnByValue": True}}))
        while True:
            msg = json.loads(self.ws.recv(30))
            if msg.get("id") == self.next_id:
                return msg["result"]["result"].get("value")


@pytest.fixture
def browser(tmp_path):
    debug = _port()
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             f"--remote-debugging-port={debug}", f"--user-data-dir={tmp_path}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def test_playground_shows_bars_mixture_and_streamed_answer(pipe, browser):
    uvicorn = pytest.importorskip("uvicorn")
    prompt = "What is 3 + 4?"
    ref = _alone(pipe, prompt, 6)  # greedy, router-chosen: what the page must show
    port = _port()
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, _cfg()), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started, 60)
        tab = next(t for t in _targets(browser) if t["type"] == "page")
        page = _Page(tab["webSocketDebuggerUrl"])
        page.eval(f"location.href = 'http://127.0.0.1:{port}/?send=1&max_tokens=6&prompt={quote(prompt)}'")
        _wait_for(lambda: page.eval("document.getElementById('answer') && "
                                    "document.getElementById('answer').dataset.finish || null") is not None, 60)
        bars = page.eval("[...document.querySelectorAll('#bars .bar')].map(b => [b.dataset.task, "
                         "b.classList.contains('chosen')])")
        answer = page.eval("document.getElementById('answer').textContent")
        mixture = page.eval("document.getElementById('mixture').textContent")
        error = page.eval("document.getElementById('error').textContent")
    finally:
        server.should_exit = True
        thread.join(15)
    assert error == "" and answer == ref.text
    assert sorted(task for task, _ in bars) == sorted(ADAPTERS)
    assert sorted(task for task, chosen in bars if chosen) == sorted(ref.adapters)
    assert re.findall(r"[a-z]+", mixture) == ref.adapters
