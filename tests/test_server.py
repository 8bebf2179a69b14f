"""The OpenAI-compatible server on a tiny model: wire format, streaming, routing overrides, refusals,
the bounded queue, batch invariance under concurrency, metrics, and the official `openai` client.

Batching is made deterministic with `Gate`, a runner that holds each batch until the test releases it:
requests then pile up in the queue in a known state instead of racing the worker.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from conftest import make_peft_adapter, make_tiny_assets, tiny_vocab_model
from fastapi.testclient import TestClient

from dlp_lora.chat import chat_prompt, encode_prompts, prompt_ids
from dlp_lora.config import FusionConfig, GenerationConfig, RoutingConfig, SelectionConfig, ServerConfig
from dlp_lora.granularity import scoring_text
from dlp_lora.models import load_tokenizer
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.server import create_app
from dlp_lora.server.runner import PipelineRunner
from dlp_lora.server.schemas import CompletionRequest

ADAPTERS = ("maths", "science", "code")
PROMPTS = [
    "What is 3 + 4?",
    "Name a noble gas.",
    "Sort: pear apple",
    "Translate 'cat' to French.",
    "Is 7 prime?",
    "Write a haiku about rain.",
]


def server_assets(tmp_path_factory) -> Path:
    """A complete assets folder (tiny Llama with the real tokenizer, 3 random adapters, untrained router),
    and beside it `extra`, one more adapter for the runtime loading tests."""
    root = tmp_path_factory.mktemp("assets")
    tok = load_tokenizer()
    make_tiny_assets(root, len(tok), ADAPTERS, tokenizer=tok)
    make_peft_adapter(root / "extra", seed=11, base=tiny_vocab_model(len(tok)))
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return server_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(assets) -> DLPLoRA:
    """The assets folder loaded the way `dlp-lora serve` loads one."""
    return DLPLoRA.from_assets(assets)


def _cfg(**kw) -> ServerConfig:
    return ServerConfig(
        **{
            "max_prompt_tokens": 96,
            "max_tokens_limit": 32,
            "default_max_tokens": 6,
            "batch_window_ms": 5.0,
            "model_name": "tiny-base",
            **kw,
        }
    )


class Gate:
    """A StepRunner that records how many jobs each admission brings and holds every admission until
    `release` is set: requests then pile up in the queue in a known state instead of racing the worker."""

    def __init__(self, pipe: DLPLoRA) -> None:
        self.inner = PipelineRunner(pipe)
        self.sizes: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()

    @property
    def running(self) -> int:
        return self.inner.running

    @property
    def active_adapters(self) -> set[str]:
        return self.inner.active_adapters

    def admit(self, jobs) -> None:
        self.sizes.append(len(jobs))
        self.entered.set()
        assert self.release.wait(30), "the test never released the batch"
        self.inner.admit(jobs)

    def step(self) -> None:
        self.inner.step()

    def abort(self, error) -> None:
        self.inner.abort(error)

    def holds(self, job) -> bool:
        return self.inner.holds(job)

    def pause(self) -> None:
        self.inner.pause()


def _wait_for(cond, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def _alone(pipe: DLPLoRA, text: str, max_tokens: int, mixture=None, stop=()):
    """What the pipeline answers for this request on its own (the chat template around `text`, as the chat
    endpoint and `_templated` completions send it): the reference every server answer must match."""
    routing = pipe.routing_for([mixture]) if mixture is not None else None
    return pipe.generate([text], config=GenerationConfig(max_new_tokens=max_tokens, stop=tuple(stop)), routing=routing)[
        0
    ]


def _templated(pipe: DLPLoRA, text: str) -> str:
    """The completion prompt that tokenizes like the pipeline's chat prompt for `text`."""
    return chat_prompt(pipe.tokenizer, text)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


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
        r = client.post("/v1/chat/completions", json={"messages": _user(PROMPTS[0]), "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == "dlp-lora"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": ref.text}
        assert body["choices"][0]["finish_reason"] == ref.finish_reason
        assert body["usage"] == {
            "prompt_tokens": ref.prompt_tokens,
            "completion_tokens": ref.completion_tokens,
            "total_tokens": ref.prompt_tokens + ref.completion_tokens,
        }
        assert body["routing"]["adapters"] == ref.adapters
        assert body["routing"]["weights"] == pytest.approx(ref.weights, abs=1e-5)
        # A completion prompt is used as given: the chat template written out gives the same answer.
        mix = {"maths": 1.0}
        done = client.post(
            "/v1/completions",
            json={"prompt": _templated(pipe, PROMPTS[0]), "max_tokens": 6, "temperature": 0, "model": "maths"},
        ).json()
        assert done["object"] == "text_completion" and done["model"] == "maths"
        assert done["choices"][0]["text"] == _alone(pipe, PROMPTS[0], 6, mix).text


def test_chat_uses_the_whole_conversation(pipe):
    """System prompt and history reach the model through the chat template (they used to be dropped)."""
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "earlier turn"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}]},
    ]
    template = pipe.tokenizer.apply_chat_template(
        [{**m, "content": m["content"] if isinstance(m["content"], str) else PROMPTS[0]} for m in messages],
        tokenize=False,
        add_generation_prompt=True,
    )
    with TestClient(create_app(pipe, _cfg())) as client:
        chat = client.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0, "adapters": ["code"]}
        ).json()
        same = client.post(
            "/v1/completions", json={"prompt": template, "max_tokens": 6, "temperature": 0, "adapters": ["code"]}
        ).json()
        alone = client.post(
            "/v1/chat/completions",
            json={"messages": _user(PROMPTS[0]), "max_tokens": 6, "temperature": 0, "adapters": ["code"]},
        ).json()
        tokens = client.post("/tokenize", json={"messages": messages}).json()
    assert chat["choices"][0]["message"]["content"] == same["choices"][0]["text"]
    assert chat["usage"]["prompt_tokens"] == same["usage"]["prompt_tokens"] == tokens["count"]
    assert chat["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"]
    assert "be brief" in template and "earlier turn" in template


def test_prompt_lists_token_ids_n_and_seeds(pipe):
    ids = pipe.tokenizer(PROMPTS[1])["input_ids"]
    with TestClient(create_app(pipe, _cfg())) as client:

        def ask(**body):
            r = client.post("/v1/completions", json={"max_tokens": 4, "temperature": 0, "model": "science", **body})
            assert r.status_code == 200, r.text
            return r.json()

        one = ask(prompt=PROMPTS[1])
        assert ask(prompt=ids)["choices"][0]["text"] == one["choices"][0]["text"]
        many = ask(prompt=[PROMPTS[1], PROMPTS[2], PROMPTS[1]])
        assert [c["index"] for c in many["choices"]] == [0, 1, 2]
        assert many["choices"][0]["text"] == many["choices"][2]["text"] == one["choices"][0]["text"]
        assert ask(prompt=[ids, ids])["choices"][1]["text"] == one["choices"][0]["text"]
        sampled = {"prompt": [PROMPTS[1], PROMPTS[2]], "n": 2, "temperature": 1.0, "seed": 2**64 - 1}
        a, b = ask(**sampled), ask(**sampled)
        assert len(a["choices"]) == 4 and a["choices"] == b["choices"]  # seeded: reproducible, any 64-bit seed
        assert a["usage"]["prompt_tokens"] == many["usage"]["prompt_tokens"] - one["usage"]["prompt_tokens"]
        assert ask(prompt="hi", seed=-(2**63), temperature=0.5)["choices"][0]["finish_reason"] in ("stop", "length")


def test_echo_logprobs_equal_option_logprobs(pipe):
    """lm-evaluation-harness's log-likelihood request: prompt + continuation as token ids, echo, max_tokens 0."""
    options = [" Paris", " a noble gas", " 42"]
    want = pipe.option_logprobs([PROMPTS[1]], [options], pipe.routing_for([{"science": 1.0}]))[0]
    ctx = pipe.tokenizer(chat_prompt(pipe.tokenizer, PROMPTS[1]), add_special_tokens=False)["input_ids"]
    conts = [pipe.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    with TestClient(create_app(pipe, _cfg())) as client:
        r = client.post(
            "/v1/completions",
            json={
                "model": "science",
                "prompt": [ctx + c for c in conts],
                "max_tokens": 0,
                "echo": True,
                "logprobs": 2,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
        # One request per option, as lm-eval sends them: the later ones reuse the first one's context.
        alone = [
            client.post(
                "/v1/completions",
                json={"model": "science", "prompt": ctx + c, "max_tokens": 1, "echo": True, "logprobs": 1},
            ).json()["choices"][0]
            for c in conts
        ]
        prefixes = client.app.state.server.runner.prefixes
        assert prefixes.hits >= len(conts) and prefixes.reused_tokens >= len(conts) * len(ctx)
        metrics = client.get("/metrics").text
        assert f"vllm:prefix_cache_hits_total {float(prefixes.reused_tokens)}" in metrics
        assert f"vllm:prefix_cache_queries_total {float(prefixes.queried_tokens)}" in metrics
        gen = client.post(
            "/v1/completions",
            json={"model": "science", "prompt": ctx, "max_tokens": 3, "logprobs": 5, "temperature": 0},
        ).json()["choices"][0]
    for choice, cont, lp in zip(alone, conts, want):
        assert sum(choice["logprobs"]["token_logprobs"][-len(cont) - 1 : -1]) == pytest.approx(lp, abs=1e-4)
    for choice, cont, lp in zip(r.json()["choices"], conts, want):
        got = choice["logprobs"]
        assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
        assert len(got["tokens"]) == len(ctx) + len(cont) and choice["text"] == pipe.tokenizer.decode(ctx + cont)
        assert sum(got["token_logprobs"][-len(cont) :]) == pytest.approx(lp, abs=1e-4)
        assert got["text_offset"][0] == 0 and got["text_offset"] == sorted(got["text_offset"])
        assert all(len(t) <= 3 for t in got["top_logprobs"][1:])  # 2 alternatives + the chosen token
    assert len(gen["logprobs"]["tokens"]) == 3 and gen["text"] == "".join(gen["logprobs"]["tokens"])
    assert all(
        max(t.values()) == pytest.approx(v)
        for t, v in zip(gen["logprobs"]["top_logprobs"], gen["logprobs"]["token_logprobs"])
    )  # greedy


def test_streaming_concatenates_to_the_non_streaming_text(pipe):
    stop = _alone(pipe, PROMPTS[1], 12).text[6:9]  # a stop string the answer is known to contain
    finals = []
    with TestClient(create_app(pipe, _cfg())) as client:
        for path, body, chat in [
            ("/v1/chat/completions", {"messages": _user(PROMPTS[1]), "max_tokens": 12}, True),
            ("/v1/chat/completions", {"messages": _user(PROMPTS[1]), "max_tokens": 12, "stop": stop}, True),
            ("/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 9}, False),
            (
                "/v1/chat/completions",
                {"messages": _user(PROMPTS[1]), "max_tokens": 12, "stop": [stop, "\n\n"], "adapters": ["code"]},
                True,
            ),
        ]:
            body = {"temperature": 0, **body}
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


def test_models_by_name_and_routing_override(pipe):
    text = PROMPTS[3]
    refs = {
        "one": _alone(pipe, text, 5, {"maths": 1.0}),
        "base": _alone(pipe, text, 5, {}),
        "mix": _alone(pipe, text, 5, {"maths": 0.25, "science": 0.75}),
        "equal": _alone(pipe, text, 5, {"maths": 0.5, "code": 0.5}),
        "routed": _alone(pipe, text, 5),
    }
    with TestClient(create_app(pipe, _cfg())) as client:

        def ask(**extra):
            r = client.post(
                "/v1/chat/completions", json={"messages": _user(text), "max_tokens": 5, "temperature": 0, **extra}
            )
            assert r.status_code == 200, r.text
            return r.json()

        def answer(body):
            return body["choices"][0]["message"]["content"]

        one = ask(adapters=["maths"])
        assert one["routing"] == {"adapters": ["maths"], "weights": [1.0]} and answer(one) == refs["one"].text
        by_model = ask(model="maths")
        assert (by_model["choices"], by_model["routing"], by_model["model"]) == (
            one["choices"],
            one["routing"],
            "maths",
        )
        base = ask(model="tiny-base")  # the base model's id: no adapter at all
        assert base["routing"] == {"adapters": [], "weights": []} and answer(base) == refs["base"].text
        assert answer(ask(model="dlp-lora")) == answer(ask()) == refs["routed"].text
        mix = ask(adapters=["maths", "science"], weights=[0.25, 0.75])
        assert mix["routing"] == {"adapters": ["science", "maths"], "weights": [0.75, 0.25]}
        assert answer(mix) == refs["mix"].text
        equal = ask(adapters=["maths", "code"], model="science")  # explicit adapters win over model
        assert equal["routing"] == {"adapters": ["maths", "code"], "weights": [0.5, 0.5]}
        assert answer(equal) == refs["equal"].text
        missing = client.post("/v1/completions", json={"prompt": "hi", "model": "gpt-4"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_runtime_adapters_load_serve_and_unload(pipe, assets, tmp_path):
    extra = assets / "extra"
    ref = _alone(pipe, PROMPTS[0], 5, {"code": 1.0})
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text((extra / "adapter_config.json").read_text())
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"not safetensors")
    with TestClient(create_app(pipe, _cfg())) as client:  # off by default, as in vLLM
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(extra)}).status_code == 404
    with TestClient(create_app(pipe, _cfg(allow_runtime_adapters=True))) as client:

        def ask(model: str):
            return client.post(
                "/v1/chat/completions",
                json={"messages": _user(PROMPTS[0]), "max_tokens": 5, "temperature": 0, "model": model},
            )

        for path in ("/nope", str(tmp_path / "pickled")):
            bad = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path", bad.text
        taken = client.post("/v1/load_lora_adapter", json={"lora_name": "code", "lora_path": str(extra)})
        assert taken.status_code == 400 and "already served" in taken.json()["error"]["message"]
        assert (
            client.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": str(extra)}).status_code
            == 200
        )
        assert "extra" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        served = ask("extra")
        assert served.status_code == 200 and served.json()["routing"]["adapters"] == ["extra"]
        assert ask("code").json()["choices"][0]["message"]["content"] == ref.text  # the bank's others unchanged
        assert 'dlp_lora_adapter_selected_total{adapter="extra"} 1.0' in client.get("/metrics").text
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200
        assert ask("extra").status_code == 404
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 400
        assert ask("code").json()["choices"][0]["message"]["content"] == ref.text

        # A router class's adapter: unloaded, its class goes to the base model (as the dev gate leaves it);
        # loaded again under the class's name, it is routed again.
        def route(prompt: str) -> dict:
            return client.post("/v1/route", json={"prompt": prompt}).json()

        prompt = next(p for p in PROMPTS if "code" in route(p)["adapters"])
        before = route(prompt)
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "code"}).status_code == 200
        after = route(prompt)
        assert after["base_served"] == ["code"] and after["probabilities"] == before["probabilities"]
        assert "code" not in after["adapters"] and ask("code").status_code == 404
        assert "task 'code' has no deployed adapter" in ask("code").json()["error"]["message"]
        back = client.post(
            "/v1/load_lora_adapter", json={"lora_name": "code", "lora_path": str(assets / "adapters" / "code")}
        )
        assert back.status_code == 200 and "routed" in back.text
        assert route(prompt) == before
        assert ask("code").json()["choices"][0]["message"]["content"] == ref.text
    assert pipe.adapter_names == list(ADAPTERS)


def test_tokenize_and_detokenize(client, pipe):
    r = client.post("/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert r["tokens"] == pipe.tokenizer(PROMPTS[0])["input_ids"] and r["count"] == len(r["tokens"])
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": PROMPTS[0]}
    bad = client.post("/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and "out of range" in bad.json()["error"]["message"]


# ---- refusals -------------------------------------------------------------------------------------

BAD = [
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, "out of range"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "lots"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens=0 asks for nothing"),
    (
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 33},
        "max_tokens=33 is over this server's limit max_tokens_limit=32",
    ),
    ("/v1/completions", {"prompt": "word " * 200}, "max_prompt_tokens=96"),
    (
        "/v1/completions",
        {"prompt": "hi", "adapters": ["nope"]},
        "unknown adapter 'nope'; known adapters: maths, science, code",
    ),
    (
        "/v1/completions",
        {"prompt": "hi", "adapters": ["maths"], "weights": [1, 2]},
        "weights has 2 values for 1 adapters",
    ),
    ("/v1/completions", {"prompt": "hi", "adapters": ["maths"], "weights": [-1]}, "weights.0"),
    ("/v1/completions", {"prompt": "hi", "weights": [1.0]}, "weights needs adapters"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 2, "stream": True}, "stream=true serves one choice"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"max_tokens": 4}, "prompt: Field required"),
    ("/v1/completions", [1, 2], "request body"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": _user("hi"), "top_logprobs": 2}, "top_logprobs needs logprobs=true"),
    ("/v1/completions", {"prompt": "hi", "routing_granularity": "token"}, "routing_granularity"),
    (
        "/v1/completions",
        {"prompt": "hi", "adapters": ["maths"], "routing_granularity": "segment"},
        "cannot be combined with explicit adapters",
    ),
    ("/v1/completions", {"prompt": "hi", "model": "maths", "routing_granularity": "segment"}, "needs the router"),
    ("/v1/completions", {"prompt": "hi", "segment_marker": ""}, "segment_marker"),
    ("/v1/completions", {"prompt": "hi", "model": "tiny-base", "routing_granularity": "sentence"}, "needs the router"),
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
    (b"", "request body: Field required"),
    (b'{"prompt": "\\ud800 hi"}', "prompt is not valid Unicode text"),
    (b'{"prompt": "hi", "adapters": ["\\udc00"]}', "adapters.0 is not valid Unicode text"),
    (b'{"prompt": "hi", "temperature": 0.5, "seed": 100000000000000000000000000}', "seed"),
    (b'{"prompt": "hi", "adapters": ["maths"], "weights": [1e308]}', "weights.0"),
    (b'{"prompt": "hi", "top_p": NaN}', "top_p: Input should be a finite number"),
    (b'{"prompt": "hi", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}', "stop"),
]


@pytest.mark.parametrize("raw,needle", RAW, ids=[str(i) for i in range(len(RAW))])
def test_malformed_bodies_are_400_never_500(client, raw, needle):
    r = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_openapi_states_limits_and_error_answers(client):
    doc = client.get("/openapi.json").json()
    post = doc["paths"]["/v1/completions"]["post"]
    assert {"400", "429", "503"} <= set(post["responses"])
    params = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert params["n"]["maximum"] == 16 and params["logprobs"]["anyOf"][0]["maximum"] == 20
    assert (
        params["seed"]["anyOf"][0]["maximum"] == pytest.approx(2**64)
        and params["max_tokens"]["anyOf"][0]["maximum"] == 32
    )


def test_unknown_routes_and_near_zero_temperature(client):
    tiny = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 1e-45})
    greedy = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert tiny.status_code == 200 and tiny.json()["choices"] == greedy.json()["choices"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/v1/completions").status_code == 405


class _Broken(Gate):
    def admit(self, jobs) -> None:
        raise RuntimeError("secret internal detail /home/x")


def test_internal_errors_are_a_generic_500(pipe):
    broken = _Broken(pipe)
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
        assert gate.entered.wait(20)  # the worker holds the first admission
        waiting = pool.submit(client.post, "/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 2})
        _wait_for(lambda: scheduler.queue_depth == 1)
        refused = client.post("/v1/completions", json={"prompt": PROMPTS[2], "max_tokens": 2})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full" and "max_queue=1" in refused.json()["error"]["message"]
        assert "vllm:num_requests_waiting 1.0" in client.get("/metrics").text
        gate.release.set()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
        assert 'status="429"' in client.get("/metrics").text


# ---- batching -------------------------------------------------------------------------------------


def test_concurrent_requests_batch_together_and_match_solo_runs(pipe):
    """Seven requests (router-chosen and explicit mixtures, different max_tokens, a stop string, one
    streaming, one seeded sampling) join one running batch; each greedy answer equals the pipeline's
    answer for that request alone, and the seeded one equals itself alone."""
    mixes = [None, {"maths": 1.0}, {"science": 0.3, "code": 0.7}, None, {"code": 1.0}, {"maths": 0.5, "science": 0.5}]
    lengths = [3, 8, 5, 8, 1, 6]
    stop = _alone(pipe, PROMPTS[3], 8).text[4:6]
    stops = [(), (), (), (stop,), (), ()]
    refs = [_alone(pipe, p, m, mix, s) for p, m, mix, s in zip(PROMPTS, lengths, mixes, stops)]
    sampled = {"messages": _user(PROMPTS[0]), "max_tokens": 4, "temperature": 0.8, "seed": 7}
    gate = Gate(pipe)
    app = create_app(pipe, _cfg(max_batch_size=8), runner=gate)

    def body(i: int) -> dict:
        extra = {"adapters": list(mixes[i]), "weights": list(mixes[i].values())} if mixes[i] else {}
        return {
            "messages": _user(PROMPTS[i]),
            "max_tokens": lengths[i],
            "stop": list(stops[i]) or None,
            "temperature": 0,
            **extra,
        }

    with TestClient(app) as client, ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(client.post, "/v1/completions", json={"prompt": "hold", "max_tokens": 1})
        assert gate.entered.wait(20)
        futures = [pool.submit(_sse, client, "/v1/chat/completions", body(0))]
        futures += [pool.submit(client.post, "/v1/chat/completions", json=body(i)) for i in range(1, 6)]
        seeded = pool.submit(client.post, "/v1/chat/completions", json=sampled)
        _wait_for(lambda: app.state.server.scheduler.queue_depth == 7)
        gate.release.set()
        assert blocker.result().status_code == 200
        answers = [futures[0].result()] + [f.result().json() for f in futures[1:]]
        again = client.post("/v1/chat/completions", json=sampled).json()
    assert gate.sizes == [1, 7, 1]  # blocker, the seven together, the seeded one again alone
    assert seeded.result().json()["choices"][0]["message"] == again["choices"][0]["message"]
    for i, (ref, ans) in enumerate(zip(refs, answers)):
        if i == 0:
            text, finish = _streamed_text(ans, True), ans[-1]["choices"][0]["finish_reason"]
            routing = ans[-1]["routing"]
        else:
            text, finish = ans["choices"][0]["message"]["content"], ans["choices"][0]["finish_reason"]
            routing = ans["routing"]
            assert ans["usage"]["completion_tokens"] == ref.completion_tokens
        assert (text, finish, routing["adapters"]) == (ref.text, ref.finish_reason, ref.adapters), i
        assert routing["weights"] == pytest.approx(ref.weights, abs=1e-5)


class _Slow(Gate):
    """Decode steps that take 10 ms, and the batch size at each step."""

    def __init__(self, pipe: DLPLoRA) -> None:
        super().__init__(pipe)
        self.release.set()
        self.steps: list[int] = []

    def step(self) -> None:
        self.steps.append(self.inner.running)
        time.sleep(0.01)
        self.inner.step()


def test_a_short_request_joins_and_leaves_while_a_long_one_runs(pipe):
    """Continuous batching: a request arriving mid-decode joins the running batch and answers before the
    long one ends; both answers equal their solo runs."""
    long_ref, short_ref = _alone(pipe, PROMPTS[4], 30, {"maths": 1.0}), _alone(pipe, PROMPTS[5], 2, {"code": 1.0})
    slow = _Slow(pipe)
    app = create_app(pipe, _cfg(max_batch_size=4), runner=slow)
    order: list[str] = []
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:

        def ask(name: str, text: str, n: int, model: str):
            r = client.post(
                "/v1/chat/completions",
                json={"messages": _user(text), "max_tokens": n, "temperature": 0, "model": model},
            )
            order.append(name)
            return r.json()["choices"][0]

        long = pool.submit(ask, "long", PROMPTS[4], 30, "maths")
        _wait_for(lambda: len(slow.steps) >= 3)
        short = pool.submit(ask, "short", PROMPTS[5], 2, "code")
        assert short.result()["message"]["content"] == short_ref.text
        assert long.result()["message"]["content"] == long_ref.text
    assert order == ["short", "long"] and long_ref.completion_tokens == 30
    assert slow.sizes == [1, 1] and 2 in slow.steps and slow.steps[-1] == 1  # joined, left, long went on


def test_static_batching_holds_a_late_request_until_the_batch_ends(pipe):
    """The old policy, kept for comparison (`batching="static"`): the late request waits for the long one."""
    slow = _Slow(pipe)
    app = create_app(pipe, _cfg(max_batch_size=4, batching="static"), runner=slow)
    order: list[str] = []
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:

        def ask(name: str, n: int):
            client.post(
                "/v1/chat/completions",
                json={"messages": _user(PROMPTS[4]), "max_tokens": n, "temperature": 0, "model": "maths"},
            )
            order.append(name)

        long = pool.submit(ask, "long", 20)
        _wait_for(lambda: len(slow.steps) >= 3)
        short = pool.submit(ask, "short", 2)
        long.result(), short.result()
    assert order == ["long", "short"] and 2 not in slow.steps


def test_abandoned_requests_are_dropped_or_cut_short(pipe):
    """A client that leaves while waiting never costs a batch row; one that leaves mid-batch frees its row
    at the next step."""
    ref = _alone(pipe, PROMPTS[2], 3)  # references first: the pipeline belongs to the server's worker later
    gate = Gate(pipe)
    app = create_app(pipe, _cfg(), runner=gate)
    state = app.state.server

    def job(text: str, n: int):
        req = CompletionRequest(prompt=_templated(pipe, text), max_tokens=n, temperature=0)
        return state.jobs(req, state.completion_prompts(req), [text], None, False)[0]

    with TestClient(app):
        running = job(PROMPTS[0], 30)
        state.scheduler.submit(running)
        assert gate.entered.wait(20)
        waiting, kept = job(PROMPTS[1], 3), job(PROMPTS[2], 3)
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
        assert ids == ["tiny-base", "dlp-lora", *ADAPTERS]
        assert client.get("/health").json() == {"status": "ok", "queue_depth": 0, "running": 0, "adapters": 3}
        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "adapters": ["science"]}).json()
        client.post("/v1/chat/completions", json={"messages": _user("hi"), "max_tokens": 2})
        client.post("/v1/completions", json={"prompt": "hi", "n": 17})
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    lines = set(r.text.splitlines())
    assert 'dlp_lora_requests_total{endpoint="/v1/completions",status="200"} 1.0' in lines
    assert 'dlp_lora_requests_total{endpoint="/v1/completions",status="400"} 1.0' in lines
    assert 'dlp_lora_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in lines
    selected = {
        ln.split()[0]: float(ln.split()[1]) for ln in lines if ln.startswith("dlp_lora_adapter_selected_total{")
    }
    assert set(selected) == {f'dlp_lora_adapter_selected_total{{adapter="{a}"}}' for a in ADAPTERS}
    assert selected['dlp_lora_adapter_selected_total{adapter="science"}'] >= 1
    assert "dlp_lora_queue_depth 0.0" in lines and "dlp_lora_batch_size_count 2.0" in lines
    assert "vllm:num_requests_running 0.0" in lines and "vllm:num_requests_waiting 0.0" in lines
    assert any(ln.startswith('vllm:lora_requests_info{max_lora="3"') for ln in lines)
    assert 'dlp_lora_request_latency_seconds_count{endpoint="/v1/completions"} 1.0' in lines
    prompt_total = next(ln for ln in lines if ln.startswith("dlp_lora_prompt_tokens_total "))
    assert float(prompt_total.split()[1]) >= ok["usage"]["prompt_tokens"]
    assert any(ln.startswith("vllm:generation_tokens_total ") and float(ln.split()[1]) >= 3 for ln in lines)


# ---- the official client against a live server ---------------------------------------------------


def test_openai_client_against_live_uvicorn(pipe):
    openai = pytest.importorskip("openai")
    uvicorn = pytest.importorskip("uvicorn")
    # References first: the pipeline belongs to the server's worker while it runs.
    plain, science = _alone(pipe, PROMPTS[4], 6, {}), _alone(pipe, PROMPTS[5], 6, {"science": 1.0})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, _cfg()), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: server.started)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()] == ["tiny-base", "dlp-lora", *ADAPTERS]
        done = client.completions.create(
            model="tiny-base", prompt=_templated(pipe, PROMPTS[4]), max_tokens=6, temperature=0
        )
        assert done.choices[0].text == plain.text and done.usage.completion_tokens == plain.completion_tokens
        chat = client.chat.completions.create(model="science", max_tokens=6, temperature=0, messages=_user(PROMPTS[5]))
        assert chat.choices[0].message.content == science.text
        assert chat.model_extra["routing"] == {"adapters": ["science"], "weights": [1.0]}
        stream = client.chat.completions.create(
            model="tiny-base",
            max_tokens=6,
            stream=True,
            temperature=0,
            messages=_user(PROMPTS[5]),
            extra_body={"adapters": ["science"]},
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
        scored = client.completions.create(
            model="science", prompt=[[5, 6, 7], [8, 9]], max_tokens=0, echo=True, logprobs=1
        )
        assert len(scored.choices) == 2 and scored.choices[1].logprobs.token_logprobs[0] is None
        with pytest.raises(openai.BadRequestError, match="unknown adapter 'nope'"):
            client.completions.create(model="tiny-base", prompt="hi", extra_body={"adapters": ["nope"]})
    finally:
        server.should_exit = True
        thread.join(15)


def test_routing_granularity_in_the_request_body(pipe):
    """`segment` routes on the prompt's last segment (only the router's text changes) and answers what the
    pipeline gives that granularity, without `switches` in its routing."""

    prompt = "Sort: pear apple ## What is 3 + 4?"
    want = pipe.generate(
        [prompt],
        config=GenerationConfig(max_new_tokens=12),
        routing_config=RoutingConfig(granularity="segment", segment_marker="##"),
    )[0]
    last = pipe.route(["What is 3 + 4?"])
    with TestClient(create_app(pipe, _cfg())) as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "messages": _user(prompt),
                "max_tokens": 12,
                "temperature": 0,
                "segment_marker": "##",
                "routing_granularity": "segment",
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == want.text
        assert body["routing"]["adapters"] == want.adapters == [pipe.adapter_names[i] for i, _ in last.row(0)]
        assert body["routing"]["weights"] == pytest.approx(want.weights, abs=1e-5)
        assert "switches" not in body["routing"]
        routed = client.post(
            "/v1/route", json={"prompt": prompt, "routing_granularity": "segment", "segment_marker": "##"}
        ).json()
        alone = client.post("/v1/route", json={"prompt": "What is 3 + 4?"}).json()
        assert routed.pop("text") == alone.pop("text") == "What is 3 + 4?" and routed == alone
        assert routed["adapters"] == body["routing"]["adapters"]


# Nearly every token ends a "sentence" (the server's defaults; requests ask for `sentence`), so the untrained
# router re-routes a row many times during a short answer.
BUSY = RoutingConfig(
    sentence_ends=tuple(string.ascii_letters + string.digits + string.punctuation), min_sentence_tokens=2
)
SENTENCE_PROMPT = "What is 3 + 4?\n\nName a noble gas."


def _busy(assets, path: str = "auto") -> DLPLoRA:
    return DLPLoRA.from_assets(
        assets, selection=SelectionConfig(p=0.99), fusion=FusionConfig(path=path), routing_config=BUSY
    )


def _sentence_ref(pipe: DLPLoRA, text: str, max_tokens: int):
    """The library's answer: `DLPLoRA.generate` with sentence routing, this prompt alone."""
    return pipe.generate(
        [text],
        config=GenerationConfig(max_new_tokens=max_tokens),
        routing_config=dataclasses.replace(BUSY, granularity="sentence"),
    )[0]


def _check_sentence(ref, text: str, routing: dict) -> None:
    """The server's answer and routing are the library's. The first mixture to float rounding: the server
    routes the prompts admitted together in one router batch; each switch is routed on its own window."""
    assert ref.switches, "the library never switched: the test would prove nothing"
    assert (text, routing["adapters"], routing["switches"]) == (ref.text, ref.adapters, ref.switches)
    assert routing["weights"] == pytest.approx(ref.weights, abs=1e-5) and set(routing) == {
        "adapters",
        "weights",
        "switches",
    }


def _switched_logprobs(pipe: DLPLoRA, text: str, routing: dict, steps: int) -> list[float]:
    """The reference for a switching row: greedy decoding alone, each mixture of `routing` (the first, then
    each switch) in its own `routed` block over the same KV cache; the chosen tokens' log-probabilities."""
    mixes = {s["token"]: pipe.routing_for([dict(zip(s["adapters"], s["weights"]))]) for s in routing["switches"]}
    ids, mask = encode_prompts(pipe.tokenizer, [text])
    out_lp = []
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(pipe.fused.routed(pipe.routing_for([dict(zip(routing["adapters"], routing["weights"]))])))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = pipe.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for i in range(steps):
            logp = torch.log_softmax(out.logits[:, -1].float(), -1)
            token = logp.argmax(-1)
            out_lp.append(float(logp[0, token]))
            if i + 1 in mixes:  # the forward on token i samples token i + 1: leave the block, enter the next
                stack.close()
                stack.enter_context(pipe.fused.routed(mixes[i + 1]))
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = pipe.model(
                input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=out.cache, use_cache=True
            )
    return out_lp


@pytest.mark.parametrize("path", ["gathered", "dense", "merged", "auto"])
def test_sentence_routing_alone_equals_the_library(assets, path):
    """A `sentence` request re-routes its row mid-answer: the text and the switches are the library's, and
    each token's log-probability is the block-by-block reference's, on every fusion path (a row alone:
    merged under `auto`, re-merged at each switch); streamed, the chunks concatenate to the same text and
    the closing chunk lists the same switches."""
    pipe = _busy(assets, path)
    ref = _sentence_ref(pipe, SENTENCE_PROMPT, 12)
    body = {"messages": _user(SENTENCE_PROMPT), "max_tokens": 12, "temperature": 0, "routing_granularity": "sentence"}
    with TestClient(create_app(pipe, _cfg())) as client:
        r = client.post("/v1/chat/completions", json={**body, "logprobs": True})
        assert r.status_code == 200, r.text
        ans = r.json()
        _check_sentence(ref, ans["choices"][0]["message"]["content"], ans["routing"])
        got = [t["logprob"] for t in ans["choices"][0]["logprobs"]["content"]]
        want = _switched_logprobs(pipe, SENTENCE_PROMPT, ans["routing"], len(got))
        assert got == pytest.approx(want, abs=1e-5, rel=0)
        assert ans["choices"][0]["routing"] == ans["routing"]
        if path == "auto":
            chunks = _sse(client, "/v1/chat/completions", body)
            _check_sentence(ref, _streamed_text(chunks, True), chunks[-1]["routing"])
            assert chunks[0]["routing"]["switches"] == []  # listed as they happen
            seen = [len(c["routing"]["switches"]) for c in chunks]
            assert seen == sorted(seen) and seen[-1] == len(ref.switches)


def test_server_default_granularity_comes_from_the_pipeline(assets):
    """`dlp-lora serve --granularity sentence` loads the pipeline with that routing config: a routed
    request that names no granularity gets it (and its switches); one asking for `prompt` gets none."""
    pipe = DLPLoRA.from_assets(
        assets, selection=SelectionConfig(p=0.99), routing_config=dataclasses.replace(BUSY, granularity="sentence")
    )
    ref = _sentence_ref(pipe, SENTENCE_PROMPT, 12)
    body = {"messages": _user(SENTENCE_PROMPT), "max_tokens": 12, "temperature": 0}
    with TestClient(create_app(pipe, _cfg())) as client:
        ans = client.post("/v1/chat/completions", json=body).json()
        _check_sentence(ref, ans["choices"][0]["message"]["content"], ans["routing"])
        once = client.post("/v1/chat/completions", json={**body, "routing_granularity": "prompt"}).json()
        assert "switches" not in once["routing"]


class _SlowGate(Gate):
    """A Gate whose decode steps take 20 ms (so a request sent mid-answer joins it), recording the batch size."""

    def __init__(self, pipe: DLPLoRA) -> None:
        super().__init__(pipe)
        self.steps: list[int] = []

    def step(self) -> None:
        self.steps.append(self.inner.running)
        time.sleep(0.02)
        self.inner.step()


@pytest.mark.parametrize("path", ["gathered", "dense", "auto"])
def test_sentence_rows_switch_without_touching_their_neighbours(assets, path):
    """Two `sentence` requests (one streaming) share the continuous batch with prompt-routed ones (router-
    chosen and explicit, different lengths, one joining later): the sentence rows answer and switch as the
    library does alone, and every neighbour answers what it answers alone, without `switches`."""
    pipe = _busy(assets, path)
    sentence = [SENTENCE_PROMPT, PROMPTS[2]]
    refs = [_sentence_ref(pipe, t, 12) for t in sentence]
    mixes, lengths = [None, {"science": 0.3, "code": 0.7}, None], [3, 9, 12]
    alone = [_alone(pipe, p, n, m) for p, n, m in zip(PROMPTS[3:], lengths, mixes)]

    def prompt_routed(i: int) -> dict:
        extra = {"adapters": list(mixes[i]), "weights": list(mixes[i].values())} if mixes[i] else {}
        return {"messages": _user(PROMPTS[3 + i]), "max_tokens": lengths[i], "temperature": 0, **extra}

    gate = _SlowGate(pipe)
    app = create_app(pipe, _cfg(max_batch_size=8), runner=gate)
    with TestClient(app) as client, ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(client.post, "/v1/completions", json={"prompt": "hold", "max_tokens": 1})
        assert gate.entered.wait(20)
        streamed = pool.submit(
            _sse,
            client,
            "/v1/chat/completions",
            {"messages": _user(sentence[0]), "max_tokens": 12, "temperature": 0, "routing_granularity": "sentence"},
        )
        plain = pool.submit(
            client.post,
            "/v1/chat/completions",
            json={
                "messages": _user(sentence[1]),
                "max_tokens": 12,
                "temperature": 0,
                "routing_granularity": "sentence",
                "logprobs": True,
            },
        )
        first = [pool.submit(client.post, "/v1/chat/completions", json=prompt_routed(i)) for i in range(2)]
        _wait_for(lambda: app.state.server.scheduler.queue_depth == 4)
        gate.release.set()
        assert blocker.result().status_code == 200
        _wait_for(lambda: first[0].done())  # the short neighbour has left; the last one joins the running rows
        late = client.post("/v1/chat/completions", json=prompt_routed(2)).json()
        chunks, body = streamed.result(), plain.result().json()
        neighbours = [f.result().json() for f in first] + [late]
    assert gate.sizes[:2] == [1, 4]
    assert (3, 4) in zip(gate.steps, gate.steps[1:]), f"the late request never joined the running rows: {gate.steps}"
    _check_sentence(refs[0], _streamed_text(chunks, True), chunks[-1]["routing"])
    _check_sentence(refs[1], body["choices"][0]["message"]["content"], body["routing"])
    got = [t["logprob"] for t in body["choices"][0]["logprobs"]["content"]]
    # Batched beside other rows, against the reference alone: a log-probability is twice a logit's tolerance.
    assert got == pytest.approx(_switched_logprobs(pipe, sentence[1], body["routing"], len(got)), abs=2e-5, rel=0)
    for ref, ans in zip(alone, neighbours):
        assert ans["choices"][0]["message"]["content"] == ref.text and "switches" not in ans["routing"]
        assert (ans["routing"]["adapters"], ans["usage"]["completion_tokens"]) == (ref.adapters, ref.completion_tokens)


def test_a_window_the_router_refuses_keeps_the_mixture(pipe):
    """Sentence routing never fails a row (or its batch) over a window the router cannot read: the row keeps
    its mixture."""
    from dlp_lora.pipeline import SentenceRerouter

    class Refusing:
        base_served: list[str] = []

        def class_weights(self, texts):
            raise ValueError("prompt 0 has no tokens (whitespace only?)")

    start = pipe.class_weights(["hi"])[0]
    reroute = SentenceRerouter(pipe, "hi", dataclasses.replace(BUSY, granularity="sentence"), start)
    reroute.pipeline = Refusing()
    ids = pipe.tokenizer("ab.", add_special_tokens=False)["input_ids"]
    assert [reroute(t) for t in ids * 2] == [None] * len(ids) * 2


def test_scoring_requests_route_every_option_on_the_question(client):
    """lm-evaluation-harness scores each option as the context with the option appended (echo, max_tokens
    0 or 1): every option of one question gets the mixture of its question, demonstrations in front or
    not; `route_on` overrides what the router reads."""

    def route(text: str) -> tuple[tuple, list]:
        r = client.post("/v1/route", json={"prompt": text}).json()
        return tuple(r["adapters"]), r["weights"]

    def same(got: list[tuple], want: tuple) -> bool:  # weights to 1e-5: the router batched otherwise
        return all(a == want[0] and w == pytest.approx(want[1], abs=1e-5) for a, w in got)

    def scored(prompt, **kw) -> list[tuple]:
        body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0, **kw}
        out = client.post("/v1/completions", json=body).json()
        return [(tuple(c["routing"]["adapters"]), c["routing"]["weights"]) for c in out["choices"]]

    question = "Q: Which gas do plants take in?\nA:"
    options = [" carbon dioxide", " oxygen", " nitrogen: an inert gas", " helium"]
    want = route(question)
    demos = "Q: What is 2 + 2?\nA: 4\n\nQ: Sort: pear apple\nA: apple pear\n\n"
    assert same(scored([question + o for o in options]), want)
    assert same(scored([demos + question + o for o in options]), want)
    assert same(scored([question + o for o in options], max_tokens=1), want)
    # Routed on their whole texts, the options would not all get the question's mixture (else this test
    # would prove nothing about the rule).
    assert not same([route(question + o) for o in options], want)
    other = "Sort the following words: pear apple fig"
    assert same(scored([question + o for o in options], route_on=other), route(other))


def test_a_chat_templated_completion_is_routed_on_its_user_message(client, pipe):
    """A client that applies the chat template itself (lm-evaluation-harness's `--apply_chat_template`)
    sends a raw prompt holding the template: it is routed as the chat endpoint routes, on the last user
    message, whether it generates or scores options appended after the assistant's turn opens."""
    question = "Sort the following words: pear apple fig"
    context = chat_prompt(pipe.tokenizer, question)
    want = client.post("/v1/route", json={"prompt": question}).json()
    options = ["apple fig pear", "fig: pear apple"]
    scored = client.post(
        "/v1/completions", json={"prompt": [context + o for o in options], "max_tokens": 0, "echo": True}
    ).json()["choices"]
    generated = client.post("/v1/completions", json={"prompt": context, "max_tokens": 2}).json()["choices"]
    for c in scored + generated:
        assert c["routing"]["adapters"] == want["adapters"]
        assert c["routing"]["weights"] == pytest.approx(want["weights"], abs=1e-5)
    # Read whole (template, system text and option included), the router would choose otherwise.
    whole = [client.post("/v1/route", json={"prompt": context + o}).json()["weights"] for o in options]
    assert any(w != pytest.approx(want["weights"], abs=1e-5) for w in whole)


def test_library_and_server_score_a_raw_question_alike(client, pipe):
    """`DLPLoRA.option_logprobs(chat=False)` without a routing reads what the server reads of the same
    scoring requests: one mixture per question, the same log-likelihoods."""
    demos = "Q: What is 2 + 2?\nA: 4\n\n"
    context = demos + "Q: Which gas do plants take in?\nA:"
    options = [" carbon dioxide", " oxygen: a gas"]
    want = pipe.option_logprobs([context], [options], chat=False)[0]
    ctx = pipe.tokenizer(context, add_special_tokens=False)["input_ids"]
    conts = [pipe.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
    out = client.post(
        "/v1/completions", json={"prompt": [ctx + c for c in conts], "max_tokens": 0, "echo": True, "logprobs": 0}
    ).json()["choices"]
    routing = pipe.route([scoring_text(context + options[0])])
    assert all(c["routing"]["adapters"] == pipe.mixture(routing.to_dense(len(pipe.adapter_names))[0])[0] for c in out)
    for c, cont, lp in zip(out, conts, want):
        assert sum(c["logprobs"]["token_logprobs"][-len(cont) :]) == pytest.approx(lp, abs=1e-4)


class _Where(_Slow):
    """Runs over compiled slots (dynamo's eager backend: graph capture without a C++ build) and records,
    at each step, whether the running batch was in the slots."""

    def __init__(self, pipe: DLPLoRA, context: int) -> None:
        super().__init__(pipe)
        self.inner = PipelineRunner(pipe, slot_sizes=(1, 2), context=context, backend="eager")
        self.in_slots: list[bool] = []

    def step(self) -> None:
        self.in_slots.append(self.inner.batch is None)
        super().step()


def test_compiled_slots_answer_as_alone_and_a_row_too_long_for_them_runs_eagerly(pipe):
    """`--compile`: requests decode in the static-cache slots; one whose prompt and max_tokens exceed the
    slots' columns arrives mid-decode and the batch goes on eagerly, every answer equal to its solo run."""
    fit, long = PROMPTS[4], PROMPTS[5]
    n_fit, n_long = (len(ids) for ids in prompt_ids(pipe.tokenizer, [fit, long]))
    context = n_fit + 20
    assert n_long + 30 > context
    refs = [_alone(pipe, fit, 20, {"maths": 1.0}), _alone(pipe, long, 30, {"code": 1.0}), _alone(pipe, fit, 4, {})]
    where = _Where(pipe, context)
    app = create_app(pipe, _cfg(max_batch_size=2), runner=where)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:

        def ask(text: str, n: int, model: str) -> str:
            body = {"messages": _user(text), "max_tokens": n, "temperature": 0, "model": model}
            return client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]

        first = pool.submit(ask, fit, 20, "maths")
        _wait_for(lambda: len(where.steps) >= 3)
        second = pool.submit(ask, long, 30, "code")
        answers = [first.result(), second.result(), ask(fit, 4, "tiny-base")]
    assert answers == [r.text for r in refs]
    assert where.in_slots[:3] == [True] * 3 and not where.in_slots[-5] and where.in_slots[-1]


def test_serve_runs_the_worker_on_the_main_thread_and_stops_on_sigterm(assets):
    """`dlp-lora serve` as a user starts it: answers over HTTP (the batching worker on the main thread,
    uvicorn beside it), then SIGTERM shuts both down cleanly."""
    import subprocess
    import sys

    import httpx

    from dlp_lora.bench import free_port, wait_healthy

    port = free_port()
    cmd = [sys.executable, "-m", "dlp_lora.cli", "serve", "--assets", str(assets), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc, 120)
        body = {"messages": _user(PROMPTS[0]), "max_tokens": 3, "temperature": 0}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        proc.terminate()
        assert proc.wait(30) == 0, proc.stderr.read()[-2000:]
    finally:
        proc.kill()
