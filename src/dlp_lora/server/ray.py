"""Scale-out: the same FastAPI app (`create_app`) as a Ray Serve deployment (`dlp-lora serve --ray`).

Each replica is a Ray actor that loads its own pipeline (base model, the whole adapter bank, router) from
the assets folder and serves `create_app(pipeline, cfg)` through `serve.ingress`: same routes, same
batching scheduler, same errors, nothing re-implemented. Ray Serve's proxy spreads requests over the
replicas, caps each at `max_ongoing_requests` (back-pressure: the rest wait in the proxy, and beyond
`max_queued_requests` they get a 503) and replaces a replica that dies. Every response carries an
`X-Replica-Id` header naming the replica that answered (its Ray actor name).

Nothing else in the package imports this module (it needs the optional `ray` extra).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Awaitable, Callable

try:
    from ray import serve
except ImportError as exc:  # the optional extra is missing: say how to get it
    raise ModuleNotFoundError("Ray Serve is not installed; install it with `pip install 'dlp-lora[ray]'`") from exc
from fastapi import FastAPI, Request, Response

from dlp_lora.config import RayServeConfig, ServerConfig
from dlp_lora.pipeline import DLPLoRA
from dlp_lora.server.app import create_app

__all__ = ["REPLICA_HEADER", "app_builder", "deployment", "deployment_options", "replica_app", "serve_ray"]

REPLICA_HEADER = "X-Replica-Id"
APP_NAME = "dlp-lora"


def deployment_options(ray_cfg: RayServeConfig) -> dict:
    """Keyword arguments for `serve.deployment`: fixed replicas or an autoscaling range, and back-pressure."""
    options: dict = {"max_ongoing_requests": ray_cfg.max_ongoing_requests,
                     "max_queued_requests": ray_cfg.max_queued_requests,
                     "ray_actor_options": {"num_cpus": ray_cfg.cpus_per_replica}}
    if ray_cfg.max_replicas is None:
        options["num_replicas"] = ray_cfg.replicas
    else:
        options["autoscaling_config"] = {"min_replicas": ray_cfg.replicas, "max_replicas": ray_cfg.max_replicas,
                                         "target_ongoing_requests": ray_cfg.target_ongoing_requests}
    return options


def replica_app(assets: str, cfg: ServerConfig, base_model: str | None, threads: int,
                quantize: str = "none") -> FastAPI:
    """What one replica serves: its own pipeline under `create_app`, plus the replica id header."""
    import torch

    # Each replica is its own process on its own share of the node: one pool of `threads` per replica,
    # not one per core per replica (which would oversubscribe the node).
    torch.set_num_threads(threads)
    app = create_app(DLPLoRA.from_assets(assets, base_model, quantize=quantize), cfg)
    replica = serve.get_replica_context().replica_id.to_full_id_str()

    async def tag(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = replica
        return response

    app.middleware("http")(tag)
    return app


def deployment(assets: str | Path, cfg: ServerConfig, ray_cfg: RayServeConfig,
               base_model: str | None = None, quantize: str = "none") -> serve.Application:
    """The bound Ray Serve application for one assets folder; run it with `serve.run(..., route_prefix="/")`.

    The app is built on each replica (a builder given to `serve.ingress`), so only the assets path and
    the configs travel to the replicas; every replica must see the assets folder at the same path.
    """
    from dlp_lora.assets import Manifest

    root = str(Path(assets).resolve())
    Manifest.load(root).check(root)  # fail here, not in every replica's constructor
    name = cfg.model_name or base_model or Manifest.load(root).base_model
    cfg = dataclasses.replace(cfg, model_name=name)
    threads = max(1, int(ray_cfg.cpus_per_replica))

    def build() -> FastAPI:
        return replica_app(root, cfg, base_model, threads, quantize)

    ingress = serve.ingress(build)()
    return serve.deployment(ingress, name="DLPLoRA", **deployment_options(ray_cfg)).bind()


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run` / a KubeRay `RayService` (`import_path: dlp_lora.server.ray:app_builder`).

    `args` holds `assets` (required), optionally `base_model` and `quantize` (none/int8), and any `ServerConfig` or `RayServeConfig`
    field by name (e.g. `replicas`, `max_ongoing_requests`, `max_tokens_limit`); unknown keys are an error.
    Values may be strings (`serve run ... replicas=2` passes them so): each becomes its field's type.
    """
    from pydantic import TypeAdapter

    fields = {"server": {f.name for f in dataclasses.fields(ServerConfig)},
              "ray": {f.name for f in dataclasses.fields(RayServeConfig)}}
    unknown = sorted(set(args) - fields["server"] - fields["ray"] - {"assets", "base_model", "quantize"})
    if unknown or "assets" not in args:
        raise ValueError(f"app_builder args: expected `assets` and ServerConfig/RayServeConfig fields, got "
                         f"{'unknown ' + ', '.join(unknown) if unknown else 'no assets'}")
    # pydantic's lax mode turns "2" into 2 for an int field (and refuses "two" naming the field), then
    # the dataclass's own __post_init__ checks run as usual.
    cfg = TypeAdapter(ServerConfig).validate_python({k: v for k, v in args.items() if k in fields["server"]})
    ray_cfg = TypeAdapter(RayServeConfig).validate_python({k: v for k, v in args.items() if k in fields["ray"]})
    return deployment(args["assets"], cfg, ray_cfg, args.get("base_model"), args.get("quantize", "none"))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_ray(assets: str | Path, cfg: ServerConfig, ray_cfg: RayServeConfig, base_model: str | None = None,
              quantize: str = "none") -> None:
    """Deploy the app on `cfg.host:cfg.port` and block until interrupted (Ctrl-C or SIGTERM).

    With `ray_cfg.address` None this starts a local Ray cluster sized for the most replicas it may run
    (logical CPUs: more replicas than cores is allowed, and then they share the cores), else joins that one.
    """
    import os
    import signal

    import ray

    app = deployment(assets, cfg, ray_cfg, base_model, quantize)
    if ray_cfg.address is None:
        most = ray_cfg.max_replicas or ray_cfg.replicas
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(most * ray_cfg.cpus_per_replica)),
                 include_dashboard=False)
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
