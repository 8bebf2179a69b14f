"""Ray Serve scale-out on a local Ray cluster started here: 2 replicas of a tiny model (assets on disk).

Greedy answers equal the single-process app's, requests reach both replicas, and a replica killed under
load fails only the requests it held (clients resend them; Ray Serve replaces the replica). One cluster
per module.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

ray = pytest.importorskip("ray", reason="the optional `ray` extra is not installed")
serve = pytest.importorskip("ray.serve")

from conftest import make_tiny_assets  # noqa: E402

import dlp_lora.server.ray as ray_deployment  # noqa: E402
from dlp_lora.config import DeviceConfig, RayServeConfig, RoutingConfig, ServerConfig  # noqa: E402
from dlp_lora.models import load_tokenizer  # noqa: E402
from dlp_lora.pipeline import DLPLoRA  # noqa: E402
from dlp_lora.server import create_app  # noqa: E402
from dlp_lora.server.ray import (  # noqa: E402
    APP_NAME,
    REPLICA_HEADER,
    app_builder,
    deployment,
    deployment_options,  # noqa: E402
    replica_spec,
)

ADAPTERS = ("maths", "science", "code")
PROMPTS = [
    "What is 3 + 4?",
    "Name a noble gas.",
    "Sort: pear apple",
    "Translate 'cat' to French.",
    "Is 7 prime?",
    "Write a haiku about rain.",
]
CFG = ServerConfig(
    max_prompt_tokens=96, max_tokens_limit=32, default_max_tokens=8, batch_window_ms=5.0, model_name="tiny-base"
)
# Ray on a busy 2-core machine: no dashboard, no usage report, a small object store, quiet workers.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_SERVE_ENABLE_TASK_EVENTS": "0",
    # Serve kills a proxy that is not ready within 5 s (its default): on 2 busy cores (the suite beside a
    # training job) the proxy's start alone took longer, and the module's setup failed with ActorDiedError.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
}


def _build_assets(root: Path) -> Path:
    """A complete assets folder a replica can load by path: tiny Llama + real tokenizer, 3 random
    adapters, an untrained router."""
    tok = load_tokenizer()
    return make_tiny_assets(root, len(tok), ADAPTERS, tokenizer=tok)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return _build_assets(tmp_path_factory.mktemp("ray-assets"))


@pytest.fixture(scope="module")
def cluster(assets):
    """The base URL of 2 Ray Serve replicas of the app on a local cluster; torn down after the module."""
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    port = _free_port()
    # Replicas are worker processes started with this environment, so they import this checkout's code.
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(
            deployment(assets, CFG, RayServeConfig(replicas=2, max_ongoing_requests=8)), name=APP_NAME, route_prefix="/"
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _ask(
    http: httpx.Client, url: str, prompt: str, max_tokens: int = 8, attempts: int = 8, retries: list | None = None
) -> httpx.Response:
    """A greedy completion, retried on transport errors and 5xx (what a client of a replicated service
    does; greedy requests are idempotent). Each failed attempt is appended to `retries`."""
    for attempt in range(attempts):
        try:
            r = http.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
            if r.status_code < 500:
                return r
            failure = f"{r.status_code} {r.text[:80]}"
        except httpx.TransportError as exc:
            failure = repr(exc)
        if retries is not None:
            retries.append(failure)
        time.sleep(0.2 * (attempt + 1))
    raise AssertionError(f"no answer to {prompt!r} after {attempts} attempts")


def test_deployment_options_fixed_and_autoscaling():
    fixed = deployment_options(RayServeConfig(replicas=3, max_ongoing_requests=5, max_queued_requests=7))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert (fixed["max_ongoing_requests"], fixed["max_queued_requests"]) == (5, 7)
    auto = deployment_options(RayServeConfig(replicas=1, max_replicas=4, target_ongoing_requests=2))
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2}
    assert "num_replicas" not in auto
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0}
    assert deployment_options(RayServeConfig(gpus_per_replica=0.5))["ray_actor_options"] == {
        "num_cpus": 1.0,
        "num_gpus": 0.5,
    }


BF16 = DeviceConfig(device="cpu", dtype="bfloat16")


def test_each_replica_loads_its_pipeline_on_the_given_device(assets):
    """The spec every replica is built from carries the DeviceConfig; what a replica loads from it (its own
    DLPLoRA) is on that device in that dtype, the adapters in float32 over it."""
    spec = replica_spec(assets, CFG, RayServeConfig(), device=BF16)
    assert spec.device == BF16 and spec.assets == str(assets.resolve())
    dlp = spec.load()
    assert {p.dtype for p in dlp.model.parameters()} == {torch.bfloat16} and dlp.device == torch.device("cpu")
    assert all(s.A.dtype == torch.float32 for s in dlp.fused.bank.modules.values())
    assert replica_spec(assets, CFG, RayServeConfig()).device == DeviceConfig()  # auto, float32 by default


def test_device_reaches_the_replicas_from_cli_builder_and_deployment(assets, monkeypatch):
    """`serve --ray --device/--dtype/--granularity`, `app_builder` args and `deployment(device=...)` all
    build the replicas' spec with that device and routing (the builder each replica runs loads `spec.load()`)."""
    from dlp_lora.cli import main

    specs, served = [], []
    monkeypatch.setattr(
        ray_deployment, "replica_spec", lambda *a, **kw: specs.append(replica_spec(*a, **kw)) or specs[-1]
    )
    monkeypatch.setattr(ray_deployment, "serve_ray", lambda *a, **kw: served.append(a[-2:]))
    assert (
        main(
            [
                "serve",
                "--assets",
                str(assets),
                "--ray",
                "--device",
                "cpu",
                "--dtype",
                "bfloat16",
                "--granularity",
                "sentence",
            ]
        )
        == 0
    )
    assert served == [(BF16, RoutingConfig(granularity="sentence"))]
    assert isinstance(
        app_builder(
            {
                "assets": str(assets),
                "device": "cpu",
                "dtype": "bfloat16",
                "granularity": "segment",
                "window_chars": "200",
            }
        ),
        serve.Application,
    )
    assert isinstance(deployment(assets, CFG, RayServeConfig(), device=BF16), serve.Application)
    assert [s.device for s in specs] == [BF16, BF16]
    assert [s.routing for s in specs] == [RoutingConfig(granularity="segment", window_chars=200), RoutingConfig()]
    with pytest.raises(ValueError, match="DeviceConfig\ndtype"):
        app_builder({"assets": str(assets), "dtype": "fp8"})
    with pytest.raises(ValueError, match="device must be auto"):
        app_builder({"assets": str(assets), "device": "gpu"})


def test_cuda_replicas_must_reserve_gpus(assets):
    with pytest.raises(ValueError, match="needs gpus_per_replica > 0"):
        replica_spec(assets, CFG, RayServeConfig(), device=DeviceConfig(device="cuda"))
    if not torch.cuda.is_available():  # with a reservation the spec is fine; the replica's load says no CUDA
        spec = replica_spec(assets, CFG, RayServeConfig(gpus_per_replica=1), device=DeviceConfig(device="cuda"))
        with pytest.raises(ValueError, match="CUDA is not available"):
            spec.load()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"replicas": 0}, "replicas must be >= 1"),
        ({"replicas": 3, "max_replicas": 2}, "max_replicas must be >= replicas=3"),
        ({"max_ongoing_requests": 0}, "max_ongoing_requests"),
        ({"max_queued_requests": 0}, "max_queued_requests"),
        ({"cpus_per_replica": 0}, "cpus_per_replica"),
        ({"gpus_per_replica": -1}, "gpus_per_replica"),
    ],
)
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        RayServeConfig(**kw)


def test_missing_assets_fail_before_deploying(tmp_path):
    with pytest.raises(FileNotFoundError):
        deployment(tmp_path / "nowhere", CFG, RayServeConfig())


def test_app_builder_takes_config_fields_by_name(assets):
    assert isinstance(app_builder({"assets": str(assets), "replicas": 2, "max_tokens_limit": 128}), serve.Application)
    with pytest.raises(ValueError, match="unknown replica"):
        app_builder({"assets": str(assets), "replica": 2})
    with pytest.raises(ValueError, match="no assets"):
        app_builder({"replicas": 2})
    with pytest.raises(ValueError, match="replicas must be >= 1"):
        app_builder({"assets": str(assets), "replicas": 0})


def test_app_builder_takes_serve_run_strings(assets):
    """`serve run dlp_lora.server.ray:app_builder assets=... replicas=2` passes every value as a string."""
    app = app_builder({"assets": str(assets), "replicas": "2", "cpus_per_replica": "0.5", "max_batch_size": "4"})
    assert isinstance(app, serve.Application)
    with pytest.raises(ValueError, match="replicas"):
        app_builder({"assets": str(assets), "replicas": "two"})


def test_kuberay_example_is_a_valid_serve_config(assets):
    """deploy/kuberay/rayservice.yaml: Ray Serve accepts its config, `app_builder` its args, and the image
    deploy/Dockerfile builds from carries the Ray version the RayService names."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    root = Path(__file__).resolve().parents[1] / "deploy"
    spec = yaml.safe_load((root / "kuberay" / "rayservice.yaml").read_text())["spec"]
    (app,) = ServeDeploySchema(**yaml.safe_load(spec["serveConfigV2"])).applications
    assert app.import_path == "dlp_lora.server.ray:app_builder"
    assert isinstance(app_builder({**app.args, "assets": str(assets)}), serve.Application)
    base_image = next(ln for ln in (root / "Dockerfile").read_text().splitlines() if ln.startswith("FROM "))
    assert f"rayproject/ray:{spec['rayClusterConfig']['rayVersion']}-" in base_image


def test_greedy_answers_equal_the_single_process_server(cluster, assets):
    with TestClient(create_app(DLPLoRA.from_assets(assets), CFG)) as local, httpx.Client(timeout=120) as http:
        for prompt in PROMPTS:
            body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
            want = local.post("/v1/completions", json=body).json()
            got = _ask(http, cluster, prompt)
            assert got.status_code == 200, got.text
            got = got.json()
            assert got["choices"][0]["text"]  # not vacuous: the tiny model says something
            assert {k: v for k, v in got.items() if k not in ("id", "created")} == {
                k: v for k, v in want.items() if k not in ("id", "created")
            }


def _replicas_answering(url: str) -> set[str]:
    """Replica ids that answered one concurrent round of requests (Ray's router spreads a round over the
    replicas by their queue lengths)."""
    replies: list[httpx.Response] = []
    with httpx.Client(timeout=60) as http:
        threads = [threading.Thread(target=lambda p=p: replies.append(_ask(http, url, p))) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {r.headers[REPLICA_HEADER] for r in replies if r.status_code == 200}


def test_requests_reach_both_replicas(cluster):
    assert httpx.get(f"{cluster}/health", timeout=60).status_code == 200
    seen: set[str] = set()
    for _ in range(5):
        seen |= _replicas_answering(cluster)
        if len(seen) == 2:
            break
    assert len(seen) == 2, seen
    assert all(s.startswith(f"SERVE_REPLICA::{APP_NAME}#DLPLoRA#") for s in seen), seen


def _kill_a_busy_replica(seconds: float = 60.0) -> str:
    """Kill a replica of the app at a moment it reports 2+ requests in flight (a replica picked blindly
    may have just answered and hold none); return its actor name (what REPLICA_HEADER carries)."""
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#")
    ]
    replicas = {name: ray.get_actor(name, namespace="serve") for name in names}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, actor in replicas.items():
            if ray.get(actor.get_num_ongoing_requests.remote()) >= 2:
                ray.kill(actor, no_restart=True)
                return name
    raise AssertionError(f"no replica of {names} had 2 requests in flight within {seconds} s")


def test_killed_replica_fails_only_the_requests_it_held(cluster):
    """8 client threads x 6 requests; a replica is killed while it serves some of them. Only requests that
    replica held can fail (at most its `max_ongoing_requests`, 8): every other request is answered on the
    first attempt, and a failed one is answered when the client sends it again (greedy requests are
    idempotent), by the surviving replica. Ray's router may also re-route a request whose slot it had only
    reserved on the victim, so a kill may cost no client a retry: the victim held 2+ requests when it was
    killed (`_kill_a_busy_replica`), and answered none after."""
    answers, retried, lock = [], [], threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            for j in range(6):
                failures: list = []
                r = _ask(http, cluster, PROMPTS[(i + j) % len(PROMPTS)], max_tokens=24, retries=failures)
                with lock:
                    answers.append((r.status_code, r.headers.get(REPLICA_HEADER)))
                    if failures:
                        retried.append(failures)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    victim = _kill_a_busy_replica()
    with lock:
        answered_before_kill = len(answers)
    assert answered_before_kill < 48, "the load finished before the kill: make it longer"
    for t in threads:
        t.join(300)
        assert not t.is_alive()
    assert [status for status, _ in answers] == [200] * 48, answers
    replicas = [replica for _, replica in answers]
    assert victim not in replicas[answered_before_kill + 8 :], f"the killed {victim} answered later: {replicas}"
    # Requests the victim held when it died failed, and only they (Ray may re-route some transparently).
    assert len(retried) <= 8, f"{len(retried)} requests needed a retry, more than the victim could hold: {retried}"
    # Ray Serve replaces the victim: two replicas answer again, neither of them the victim.
    end, seen = time.monotonic() + 180, set()
    while len(seen) < 2:
        assert time.monotonic() < end, f"no second replica after the kill; answering: {seen}"
        seen |= _replicas_answering(cluster)
        assert victim not in seen
        time.sleep(0.5)
