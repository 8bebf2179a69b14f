"""The OpenAI-compatible server on a tiny model: wire format, streaming, routing overrides, refusals,
the bounded queue, batch invariance under concurrency, metrics, and the official `openai` client.

Batching is made deterministic with `Gate`, a runner that holds each batch until the test releases it:
requests then pile up in the queue in a known state instead of racing the worker.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import make_peft_adapter
from dlp_lora.assets import Manifest
from dlp_lora.config import GenerationConfig, RouterConfig, ServerConfig
from dlp_lora.models import load_tokenizer
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.router import Router
from dlp_lora.server import create_app
from dlp_lora.server.runner import PipelineRunner
from dlp_lora.server.schemas import CompletionRequest

ADAPTERS = ("maths", "science", "code")
PROMPTS = ["What is 3 + 4?", "Name a noble gas.", "Sort: pear apple", "Translate 'cat' to French.",
           "Is 7 prime?", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> DLPLoRA:
    """A complete assets folder (tiny Llama with the real tokenizer, 3 random adapters, untrained router),
    loaded the way `dlp-lora serve` loads one."""
    root = tmp_path_factory.mktemp("assets")
    tok = load_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=2, bos_token_id=1, eos_token_id=2)).eval()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, name in enumerate(ADAPTERS):
        make_peft_adapter(root / "adapters" / name, seed=i + 1, base=model)
    torch.manual_seed(0)
    Router(RouterConfig(task_names=ADAPTERS, embed_dim=8, hidden_dim=16)).save(root / "router")
    Manifest(base_model=str(root / "base"), tasks=list(ADAPTERS),
             adapters={a: f"adapters/{a}" for a in ADAPTERS}, router="router", selection={"p": 0.9}).save(root)
    return DLPLoRA.from_assets(root)


def _cfg(**kw) -> ServerConfig:
    return ServerConfig(**{"max_prompt_tokens": 96, "max_tokens_limit": 32, "default_max_tokens": 6,
                           "batch_window_ms": 5.0, "model_name": "tiny-base", **kw})


class Gate:
    """A runner that records batch sizes and holds every batch until `release` is set."""

    def __init__(self, pipe: DLPLoRA) -> None:
        self.inner = PipelineRunner(pipe)
        self.sizes: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, jobs) -> None:
        self.sizes.append(len(jobs))
        self.entered.set()
        assert self.release.wait(30), "the test never released the batch"
        self.inner(jobs)


def _wait_for(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def _alone(pipe: DLPLoRA, text: str, max_tokens: int, mixture=None, stop=()):
    """What the pipeline answers for this request on its own: the reference every server answer must match."""
    routing = pipe.routing_for([mixture]) if mixture is not None else None
    return pipe.generate([text], config=GenerationConfig(max_new_tokens=max_tokens, stop=tuple(stop)),
                         routing=routing)[0]


def _sse(client: TestClient, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def _streamed_text(chunks: list[dict], chat: bool) -> str:
    if chat:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


# ---- wire format --------------------------------------------------------------------------------

def test_completion_and_chat_match_the_pipeline(pipe):
    ref = _alone(pipe, PROMPTS[0], 6)
    with TestClient(create_app(pipe, _cfg())) as client:
        r = client.post("/v1/completions", json={"model": "tiny-base", "prompt": [PROMPTS[0]], "max_tokens": 6})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["model"] == "tiny-base"
        assert body["choices"][0]["text"] == ref.text and body["choices"][0]["finish_reason"] == ref.finish_reason
        assert body["usage"] == {"prompt_tokens": ref.prompt_tokens, "completion_tokens": ref.completion_tokens,
                                 "total_tokens": ref.prompt_tokens + ref.completion_tokens}
        assert body["routing"]["adapters"] == ref.adapters
        assert body["routing"]["weights"] == pytest.approx(ref.weights, abs=1e-5)
        chat = client.post("/v1/chat/completions", json={"messages": [
            {"role": "system", "content": "be brief"}, {"role": "user", "content": "earlier turn"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}]},
        ], "temperature": 0})
        assert chat.status_code == 200, chat.text
        msg = chat.json()["choices"][0]["message"]
        assert chat.json()["object"] == "chat.completion" and msg == {"role": "assistant", "content": ref.text}


def test_streaming_concatenates_to_the_non_streaming_text(pipe):
    stop = _alone(pipe, PROMPTS[1], 12).text[6:9]  # a stop string the answer is known to contain
    finals = []
    with TestClient(create_app(pipe, _cfg())) as client:
        for path, body, chat in [
            ("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 12}, False),
            ("/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 12, "stop": stop}, False),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[2]}], "max_tokens": 9}, True),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": 12,
                                      "stop": [stop, "\n\n"], "adapters": ["code"]}, True),
        ]:
            whole = client.post(path, json=body).json()
            chunks = _sse(client, path, {**body, "stream_options": {"include_usage": True}})
            text = whole["choices"][0]["message"]["content"] if chat else whole["choices"][0]["text"]
            assert _streamed_text(chunks, chat) == text
            assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
            assert all(c["routing"] == whole["routing"] for c in chunks)
            if chat:
                assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            finals.append((text, whole["choices"][0]["finish_reason"]))
    assert finals[1] == (_alone(pipe, PROMPTS[1], 12, stop=[stop]).text, "stop") and stop not in finals[1][0]


def test_routing_override_by_adapters_weights_and_model(pipe):
    text = PROMPTS[3]
    refs = {"one": _alone(pipe, text, 5, {"maths": 1.0}),
            "mix": _alone(pipe, text, 5, {"maths": 0.25, "science": 0.75}),
            "equal": _alone(pipe, text, 5, {"maths": 0.5, "code": 0.5})}
    with TestClient(create_app(pipe, _cfg())) as client:
        def ask(**extra):
            r = client.post("/v1/completions", json={"prompt": text, "max_tokens": 5, **extra})
            assert r.status_code == 200, r.text
            return r.json()

        one = ask(adapters=["maths"])
        assert one["routing"] == {"adapters": ["maths"], "weights": [1.0]}
        assert one["choices"][0]["text"] == refs["one"].text
        by_model = ask(model="maths")
        assert (by_model["choices"], by_model["routing"]) == (one["choices"], one["routing"])
        assert by_model["model"] == "maths"
        mix = ask(adapters=["maths", "science"], weights=[0.25, 0.75])
        assert mix["routing"] == {"adapters": ["science", "maths"], "weights": [0.75, 0.25]}
        assert mix["choices"][0]["text"] == refs["mix"].text
        equal = ask(adapters=["maths", "code"], model="science")  # explicit adapters win over model
        assert equal["routing"] == {"adapters": ["maths", "code"], "weights": [0.5, 0.5]}
        assert equal["choices"][0]["text"] == refs["equal"].text


# ---- refusals -------------------------------------------------------------------------------------

BAD = [
    ("/v1/completions", {"prompt": "   "}, "prompt is empty"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "list of 2"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "lots"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 33},
     "max_tokens=33 is over this server's limit max_tokens_limit=32"),
    ("/v1/completions", {"prompt": "word " * 200}, "max_prompt_tokens=96"),
    ("/v1/completions", {"prompt": "hi", "adapters": ["nope"]},
     "unknown adapter 'nope'; known adapters: maths, science, code"),
    ("/v1/completions", {"prompt": "hi", "adapters": ["maths"], "weights": [1, 2]},
     "weights has 2 values for 1 adapters"),
    ("/v1/completions", {"prompt": "hi", "adapters": ["maths"], "weights": [-1]}, "weights.0"),
    ("/v1/completions", {"prompt": "hi", "weights": [1.0]}, "weights needs adapters"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n=2 is not supported"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop strings must be non-empty"),
    ("/v1/completions", {"max_tokens": 4}, "prompt: Field required"),
    ("/v1/completions", [1, 2], "request body"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": "x"}]}, "no user message"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}]}, "messages: the prompt is empty"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/completions", {"prompt": "hi", "routing_granularity": "token"}, "routing_granularity"),
    ("/v1/completions", {"prompt": "hi", "adapters": ["maths"], "routing_granularity": "sentence"},
     "cannot be combined with explicit adapters"),
    ("/v1/completions", {"prompt": "hi", "model": "maths", "routing_granularity": "segment"}, "needs the router"),
    ("/v1/completions", {"prompt": "hi", "segment_marker": ""}, "segment_marker"),
]


@pytest.fixture
def client(pipe):
    # One server per test: leaving the context joins its worker, so no later test shares the pipeline with it.
    with TestClient(create_app(pipe, _cfg())) as c:
        yield c


@pytest.mark.parametrize("path,body,needle", BAD, ids=[f"{i}:{b}"[:40] for i, (_, b, _) in enumerate(BAD)])
def test_bad_requests_are_400_naming_the_problem(client, path, body, needle):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


RAW = [
    (b'{"prompt": "hi",', "not valid JSON"),
    (b'', "request body: Field required"),
    (b'{"prompt": "\\ud800 hi"}', "prompt is not valid Unicode text"),
    (b'{"prompt": "hi", "adapters": ["\\udc00"]}', "adapters.0 is not valid Unicode text"),
    (b'{"prompt": "hi", "temperature": 0.5, "seed": 100000000000000000000000000}', "seed"),
    (b'{"prompt": "hi", "adapters": ["maths"], "weights": [1e308]}', "weights.0"),
    (b'{"prompt": "hi", "top_p": NaN}', "top_p: Input should be a finite number"),
    (b'{"prompt": "hi", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}', "limit is 16"),
]


@pytest.mark.parametrize("raw,needle", RAW, ids=[str(i) for i in range(len(RAW))])
def test_malformed_bodies_are_400_never_500(client, raw, needle):
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_unknown_routes_and_near_zero_temperature(client):
    tiny = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 1e-45})
    greedy = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    assert tiny.status_code == 200 and tiny.json()["choices"] == greedy.json()["choices"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/v1/completions").status_code == 405


def test_internal_errors_are_a_generic_500(pipe):
    def broken(jobs):
        raise RuntimeError("secret internal detail /home/x")

    with TestClient(create_app(pipe, _cfg(), runner=broken)) as client:
        for stream in (False, True):
            r = client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
            assert r.status_code == 500 and r.json()["error"]["message"] == "internal server error"
            assert "secret" not in r.text and "Traceback" not in r.text
        assert client.get("/health").status_code == 200  # the worker survived
    unstarted = TestClient(create_app(pipe, _cfg()))  # no lifespan: the worker never started
    assert unstarted.post("/v1/completions", json={"prompt": "hi"}).status_code == 503


def test_full_queue_is_429(pipe):
    gate = Gate(pipe)
    app = create_app(pipe, _cfg(max_queue=1), runner=gate)
    scheduler = app.state.server.scheduler
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.post, "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2})
        assert gate.entered.wait(20)  # the worker holds the first batch
        waiting = pool.submit(client.post, "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 2})
        _wait_for(lambda: scheduler.queue_depth == 1)
        refused = client.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 2})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full" and "max_queue=1" in refused.json()["error"]["message"]
        gate.release.set()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
        assert 'status="429"' in client.get("/metrics").text


# ---- batching -------------------------------------------------------------------------------------

def test_concurrent_requests_batch_together_and_match_solo_runs(pipe):
    """Six greedy requests (router-chosen and explicit mixtures, different max_tokens, a stop string, one
    streaming) ride in one batch; each answer equals the pipeline's answer for that request alone."""
    mixes = [None, {"maths": 1.0}, {"science": 0.3, "code": 0.7}, None, {"code": 1.0}, {"maths": 0.5, "science": 0.5}]
    lengths = [3, 8, 5, 8, 1, 6]
    stop = _alone(pipe, PROMPTS[3], 8).text[4:6]
    stops = [(), (), (), (stop,), (), ()]
    refs = [_alone(pipe, p, m, mix, s) for p, m, mix, s in zip(PROMPTS, lengths, mixes, stops)]
    sampled = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0.8, "seed": 7}
    gate = Gate(pipe)
    app = create_app(pipe, _cfg(max_batch_size=8), runner=gate)

    def body(i: int) -> dict:
        extra = {"adapters": list(mixes[i]), "weights": list(mixes[i].values())} if mixes[i] else {}
        return {"prompt": PROMPTS[i], "max_tokens": lengths[i], "stop": list(stops[i]) or None, **extra}

    with TestClient(app) as client, ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(client.post, "/v1/completions", json={"prompt": "hold", "max_tokens": 1})
        assert gate.entered.wait(20)
        futures = [pool.submit(_sse, client, "/v1/completions", body(0))]
        futures += [pool.submit(client.post, "/v1/completions", json=body(i)) for i in range(1, 6)]
        seeded = pool.submit(client.post, "/v1/completions", json=sampled)
        _wait_for(lambda: app.state.server.scheduler.queue_depth == 7)
        gate.release.set()
        assert blocker.result().status_code == 200
        answers = [futures[0].result()] + [f.result().json() for f in futures[1:]]
        again = client.post("/v1/completions", json=sampled).json()
    assert sorted(gate.sizes) == [1, 1, 1, 6]  # blocker, greedy six, seeded sampling alone (twice)
    assert seeded.result().json()["choices"][0]["text"] == again["choices"][0]["text"]
    for i, (ref, ans) in enumerate(zip(refs, answers)):
        if i == 0:
            text, finish = _streamed_text(ans, False), ans[-1]["choices"][0]["finish_reason"]
            routing = ans[-1]["routing"]
        else:
            text, finish, routing = ans["choices"][0]["text"], ans["choices"][0]["finish_reason"], ans["routing"]
            assert ans["usage"]["completion_tokens"] == ref.completion_tokens
        assert (text, finish, routing["adapters"]) == (ref.text, ref.finish_reason, ref.adapters), i
        assert routing["weights"] == pytest.approx(ref.weights, abs=1e-5)


def test_abandoned_requests_are_dropped_or_cut_short(pipe):
    """A client that leaves while waiting never costs a batch row; one that leaves mid-batch frees its row
    at the next step."""
    ref = _alone(pipe, PROMPTS[2], 3)  # references first: the pipeline belongs to the server's worker later
    gate = Gate(pipe)
    app = create_app(pipe, _cfg(), runner=gate)
    state = app.state.server
    with TestClient(app):
        running = state.job(PROMPTS[0], CompletionRequest(prompt=PROMPTS[0], max_tokens=30), "prompt")
        state.scheduler.submit(running)
        assert gate.entered.wait(20)
        waiting = state.job(PROMPTS[1], CompletionRequest(prompt=PROMPTS[1], max_tokens=3), "prompt")
        kept = state.job(PROMPTS[2], CompletionRequest(prompt=PROMPTS[2], max_tokens=3), "prompt")
        state.scheduler.submit(waiting)
        state.scheduler.submit(kept)
        waiting.abandon()
        running.abandon()
        gate.release.set()
        assert kept.future.result(20).text == ref.text
        assert running.future.result(20).completion_tokens == 1 and waiting.future.cancelled()
    assert gate.sizes == [1, 1]


# ---- models, health, metrics --------------------------------------------------------------------

def test_models_health_and_metrics(pipe):
    with TestClient(create_app(pipe, _cfg())) as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids == ["tiny-base", *ADAPTERS]
        assert client.get("/health").json() == {"status": "ok", "queue_depth": 0, "adapters": 3}
        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "adapters": ["science"]}).json()
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        client.post("/v1/completions", json={"prompt": "hi", "n": 3})
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = set(r.text.splitlines())
    assert 'dlp_lora_requests_total{endpoint="/v1/completions",status="200"} 1' in lines
    assert 'dlp_lora_requests_total{endpoint="/v1/completions",status="400"} 1' in lines
    assert 'dlp_lora_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in lines
    selected = {ln.split()[0]: int(ln.split()[1]) for ln in lines if ln.startswith("dlp_lora_adapter_selected_total{")}
    assert set(selected) == {f'dlp_lora_adapter_selected_total{{adapter="{a}"}}' for a in ADAPTERS}
    assert selected['dlp_lora_adapter_selected_total{adapter="science"}'] >= 1
    assert "dlp_lora_queue_depth 0" in lines and "dlp_lora_batch_size_count 2" in lines
    assert 'dlp_lora_batch_size_bucket{le="1"} 2' in lines
    assert 'dlp_lora_request_latency_seconds_count{endpoint="/v1/completions"} 1' in lines
    prompt_total = next(ln for ln in lines if ln.startswith("dlp_lora_prompt_tokens_total "))
    assert int(prompt_total.split()[1]) >= ok["usage"]["prompt_tokens"]
    assert any(ln.startswith("dlp_lora_completion_tokens_total ") and int(ln.split()[1]) >= 3 for ln in lines)


# ---- the official client against a live server ---------------------------------------------------

def test_openai_client_against_live_uvicorn(pipe):
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    # References first: a request is answered as soon as its row ends, possibly before the worker has left
    # the batch, so the test must not touch the pipeline while the server runs.
    plain, science = _alone(pipe, PROMPTS[4], 6), _alone(pipe, PROMPTS[5], 6, {"science": 1.0})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, _cfg()), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()] == ["tiny-base", *ADAPTERS]
        done = client.completions.create(model="tiny-base", prompt=PROMPTS[4], max_tokens=6, temperature=0)
        assert done.choices[0].text == plain.text and done.usage.completion_tokens == plain.completion_tokens
        chat = client.chat.completions.create(model="science", max_tokens=6,
                                              messages=[{"role": "user", "content": PROMPTS[5]}])
        assert chat.choices[0].message.content == science.text
        assert chat.model_extra["routing"] == {"adapters": ["science"], "weights": [1.0]}
        stream = client.chat.completions.create(model="tiny-base", max_tokens=6, stream=True,
                                                messages=[{"role": "user", "content": PROMPTS[5]}],
                                                extra_body={"adapters": ["science"]})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
        text_stream = client.completions.create(model="tiny-base", prompt=PROMPTS[4], max_tokens=6, stream=True)
        assert "".join(c.choices[0].text for c in text_stream) == done.choices[0].text
        with pytest.raises(openai.BadRequestError, match="unknown adapter 'nope'"):
            client.completions.create(model="tiny-base", prompt="hi", extra_body={"adapters": ["nope"]})
    finally:
        server.should_exit = True
        thread.join(15)


def test_routing_granularity_in_the_request_body(pipe):
    """`segment` and `sentence` requests get what the pipeline gives that granularity, switches included."""
    import dataclasses
    import string

    from dlp_lora.config import RoutingConfig

    prompt = "Sort: pear apple ## What is 3 + 4?"
    busy = RoutingConfig(sentence_ends=tuple(string.ascii_letters + string.punctuation), min_sentence_tokens=2)
    saved, pipe.routing_config = pipe.routing_config, busy  # the server's default settings (granularity prompt)
    try:
        with TestClient(create_app(pipe, _cfg())) as client:
            for granularity in ("segment", "sentence"):
                want = pipe.generate([prompt], config=GenerationConfig(max_new_tokens=12), routing_config=dataclasses.replace(
                    busy, granularity=granularity, segment_marker="##"))[0]
                r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "segment_marker": "##",
                                                         "routing_granularity": granularity})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["choices"][0]["text"] == want.text and body["routing"]["adapters"] == want.adapters
                assert body["routing"].get("switches", []) == want.switches
                assert bool(want.switches) == (granularity == "sentence")
    finally:
        pipe.routing_config = saved
