"""Scale-out: the same FastAPI app (`create_app`) as a Ray Serve deployment (`dlp-lora serve --ray`).

Each replica is a Ray actor that loads its own pipeline (base model, the whole adapter bank, router) from
the assets folder, on the device and in the dtype of a `DeviceConfig` (a `ReplicaSpec` holds all a replica
needs), and serves `create_app(pipeline, cfg)` through `serve.ingress`: same routes, same
batching scheduler, same errors, nothing re-implemented. Ray Serve's proxy spreads requests over the
replicas, caps each at `max_ongoing_requests` (back-pressure: the rest wait in the proxy, and beyond
`max_queued_requests` they get a 503) and replaces a replica that dies. Every response carries an
`X-Replica-Id` header naming the replica that answered (its Ray actor name).

Nothing else in the package imports this module (it needs the optional `ray` extra).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from ray import serve
except ImportError as exc:  # the optional extra is missing: say how to get it
    raise ModuleNotFoundError("Ray Serve is not installed; install it with `pip install 'dlp-lora[ray]'`") from exc
from fastapi import FastAPI, Request, Response

from dlp_lora.config import DeviceConfig, RayServeConfig, RoutingConfig, ServerConfig
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.server.app import create_app

__all__ = [
    "REPLICA_HEADER",
    "ReplicaSpec",
    "app_builder",
    "deployment",
    "deployment_options",
    "replica_app",
    "replica_spec",
    "serve_ray",
]

REPLICA_HEADER = "X-Replica-Id"
APP_NAME = "dlp-lora"


def deployment_options(ray_cfg: RayServeConfig) -> dict:
    """Keyword arguments for `serve.deployment`: fixed replicas or an autoscaling range, back-pressure, and
    the CPUs and GPUs Ray reserves for each replica."""
    actor: dict = {"num_cpus": ray_cfg.cpus_per_replica}
    if ray_cfg.gpus_per_replica > 0:
        actor["num_gpus"] = ray_cfg.gpus_per_replica
    options: dict = {
        "max_ongoing_requests": ray_cfg.max_ongoing_requests,
        "max_queued_requests": ray_cfg.max_queued_requests,
        "ray_actor_options": actor,
    }
    if ray_cfg.max_replicas is None:
        options["num_replicas"] = ray_cfg.replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": ray_cfg.replicas,
            "max_replicas": ray_cfg.max_replicas,
            "target_ongoing_requests": ray_cfg.target_ongoing_requests,
        }
    return options


@dataclass(frozen=True)
class ReplicaSpec:
    """All one replica needs to build its app; only these paths and configs travel to the replicas."""

    assets: str
    """Absolute path of the assets folder (every node must see it there)."""
    cfg: ServerConfig
    """The server's settings, `model_name` resolved."""
    base_model: str | None = None
    """Overrides the manifest's base model (HF dir or hub id)."""
    quantize: str = "none"
    """`int8` loads the base model in int8 (CPU only)."""
    device: DeviceConfig = field(default_factory=DeviceConfig)
    """Where each replica places its model, and in which dtype."""
    threads: int = 1
    """torch threads in each replica."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    """The routing granularity of routed requests that do not choose one."""

    def load(self) -> DLPLoRA:
        """The pipeline a replica serves: loaded by the replica itself, on `device` in its dtype."""
        import torch

        # Each replica is its own process on its own share of the node: one pool of `threads` per replica,
        # not one per core per replica (which would oversubscribe the node).
        torch.set_num_threads(self.threads)
        return DLPLoRA.from_assets(
            self.assets, self.base_model, quantize=self.quantize, device=self.device, routing_config=self.routing
        )


def replica_spec(
    assets: str | Path,
    cfg: ServerConfig,
    ray_cfg: RayServeConfig,
    base_model: str | None = None,
    quantize: str = "none",
    device: DeviceConfig | None = None,
    routing: RoutingConfig | None = None,
) -> ReplicaSpec:
    """What every replica of `deployment(...)` loads, checked here once rather than in every replica."""
    from dlp_lora.assets import Manifest

    device = device or DeviceConfig()
    if device.device.startswith("cuda") and ray_cfg.gpus_per_replica <= 0:
        # Ray schedules and isolates replicas by the GPUs they reserve: without any, a replica may land on a
        # node without one, and every replica would share the same visible GPUs unaccounted for.
        raise ValueError(
            f"device {device.device!r} with Ray needs gpus_per_replica > 0 (e.g. 1, or 0.5 for two "
            "replicas per GPU), got 0"
        )
    root = str(Path(assets).resolve())
    manifest = Manifest.load(root)
    manifest.check(root)  # fail here, not in every replica's constructor
    cfg = dataclasses.replace(cfg, model_name=cfg.model_name or base_model or manifest.base_model)
    return ReplicaSpec(
        root,
        cfg,
        base_model,
        quantize,
        device,
        threads=max(1, int(ray_cfg.cpus_per_replica)),
        routing=routing or RoutingConfig(),
    )


def replica_app(spec: ReplicaSpec) -> FastAPI:
    """What one replica serves: its own pipeline under `create_app`, plus the replica id header."""
    app = create_app(spec.load(), spec.cfg)
    replica = serve.get_replica_context().replica_id.to_full_id_str()

    async def tag(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = replica
        return response

    app.middleware("http")(tag)
    return app


def deployment(
    assets: str | Path,
    cfg: ServerConfig,
    ray_cfg: RayServeConfig,
    base_model: str | None = None,
    quantize: str = "none",
    device: DeviceConfig | None = None,
    routing: RoutingConfig | None = None,
) -> serve.Application:
    """The bound Ray Serve application for one assets folder; run it with `serve.run(..., route_prefix="/")`.

    The app is built on each replica (a builder given to `serve.ingress`) from `replica_spec(...)`, so only
    the assets path and the configs travel to the replicas; every replica must see the assets folder at the
    same path. `device` (default: auto, float32) places each replica's model; a cuda device needs
    `ray_cfg.gpus_per_replica` > 0.
    """
    spec = replica_spec(assets, cfg, ray_cfg, base_model, quantize, device, routing)

    def build() -> FastAPI:
        return replica_app(spec)

    ingress = serve.ingress(build)()
    return serve.deployment(ingress, name="DLPLoRA", **deployment_options(ray_cfg)).bind()


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run` / a KubeRay `RayService` (`import_path: dlp_lora.server.ray:app_builder`).

    `args` holds `assets` (required), optionally `base_model` and `quantize` (none/int8), and any
    `ServerConfig`, `RayServeConfig`, `DeviceConfig` or `RoutingConfig` field by name (e.g. `replicas`,
    `max_ongoing_requests`, `max_tokens_limit`, `device`, `dtype`, `granularity`); unknown keys are an error. Values may be strings (`serve run ...
    replicas=2` passes them so): each becomes its field's type.
    """
    from pydantic import TypeAdapter

    configs = (ServerConfig, RayServeConfig, DeviceConfig, RoutingConfig)
    fields = {c: {f.name for f in dataclasses.fields(c)} for c in configs}
    unknown = sorted(set(args).difference(*fields.values(), {"assets", "base_model", "quantize"}))
    if unknown or "assets" not in args:
        raise ValueError(
            f"app_builder args: expected `assets` and ServerConfig/RayServeConfig/DeviceConfig/RoutingConfig "
            f"fields, got {'unknown ' + ', '.join(unknown) if unknown else 'no assets'}"
        )
    # pydantic's lax mode turns "2" into 2 for an int field (and refuses "two" naming the field), then
    # the dataclass's own __post_init__ checks run as usual.
    cfg, ray_cfg, device, routing = (
        TypeAdapter(c).validate_python({k: v for k, v in args.items() if k in fields[c]}) for c in configs
    )
    return deployment(
        args["assets"], cfg, ray_cfg, args.get("base_model"), args.get("quantize", "none"), device, routing
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_ray(
    assets: str | Path,
    cfg: ServerConfig,
    ray_cfg: RayServeConfig,
    base_model: str | None = None,
    quantize: str = "none",
    device: DeviceConfig | None = None,
    routing: RoutingConfig | None = None,
) -> None:
    """Deploy the app on `cfg.host:cfg.port` and block until interrupted (Ctrl-C or SIGTERM).

    With `ray_cfg.address` None this starts a local Ray cluster sized for the most replicas it may run
    (logical CPUs: more replicas than cores is allowed, and then they share the cores), else joins that one.
    """
    import os
    import signal

    import ray

    app = deployment(assets, cfg, ray_cfg, base_model, quantize, device, routing)
    if ray_cfg.address is None:
        most = ray_cfg.max_replicas or ray_cfg.replicas
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(most * ray_cfg.cpus_per_replica)), include_dashboard=False)
    else:
        ray.init(address=ray_cfg.address)
    # A terminated server stops its replicas and the local cluster it started, not only the driver.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        # Our own local cluster goes entirely; on a shared cluster only our application does.
        serve.shutdown() if ray_cfg.address is None else serve.delete(APP_NAME)
        ray.shutdown()
