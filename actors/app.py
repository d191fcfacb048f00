"""The Serve application: `import_path: actors.app:build_app` in a Serve config (configs/serve.yaml), or
`moeray serve`, which builds the same application with `moeray_app`.

    applications:
    - name: moeray
      import_path: actors.app:build_app
      args: {config: configs/pipeline-local.yaml}   # and/or model: /models/Mixtral-8x7B-Instruct-v0.1
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.serve import Application

from cluster.config import ConfigError, MoerayConfig, api_key_of, load_config
from cluster.placement import ray_options
from cluster.ports import is_loopback_host

log = logging.getLogger(__name__)

GRPC_SERVICERS = [
    "cluster.api.grpc_api.add_GenerationService_to_serve",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
# the ExpertPool replica's graceful shutdown beyond the routers' drain: it stops the shards once the routers have
# stopped (actors/pool.py: PoolReplica), and Serve would kill it, the shards left running, at the end of its timeout
SHARDS_OUTLAST_ROUTERS_S = 60.0
REPO = Path(__file__).resolve().parents[1]  # where a relative `config:` path is also looked up


class BuildArgs(BaseModel):
    """The Serve config's `args:`. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")
    config: str | None = None  # moeray YAML (engine, pipeline, serve sections)
    model: str | None = None  # checkpoint directory; overrides the YAML's; default: the built-in demo model
    # set by `moeray deploy`: the sha256 of the `config` file as it read it. Serve redeploys an application only
    # when its args change, so an edited moeray YAML under the same name would otherwise be ignored
    config_sha256: str | None = None


def config_digest(path: str) -> str | None:
    """The sha256 (hex) of the moeray YAML a `config:` arg names, found as the builder finds it; None if there
    is no such file here (a cluster elsewhere may have it)."""
    import hashlib

    try:
        return hashlib.sha256(config_path(path).read_bytes()).hexdigest()
    except ConfigError:
        return None


def with_defaults(config: MoerayConfig) -> MoerayConfig:
    """A copy of `config` with the demo model when no model is configured, and the API key from
    $MOERAY_API_KEY when the config has none (so it travels to the Ingress replicas inside the config,
    wherever they run)."""
    serve_cfg = dataclasses.replace(config.serve, api_key=api_key_of(config.serve))
    config = dataclasses.replace(config, serve=serve_cfg)
    if config.model is None:
        from kernels.train import demo_dir

        serve_cfg = dataclasses.replace(serve_cfg, model_name=serve_cfg.model_name or "moeray-demo")
        config = dataclasses.replace(config, model=str(demo_dir()), serve=serve_cfg)
    return config


def config_path(path: str) -> Path:
    """A `config:` path from the Serve config: as given (relative to where the builder runs), else relative to
    the moeray source tree (`serve run` builds the app in a Ray worker, whose directory is not the user's)."""
    given = Path(path).expanduser()
    for candidate in (given, REPO / given) if not given.is_absolute() else (given,):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"args.config: no file {path!r} (looked in {Path.cwd()} and {REPO})")


def with_config_digests(config: dict) -> dict:
    """A Serve config (a dict) with `config_sha256` in the args of each moeray application whose `config:` file
    is found here (config_digest): Serve redeploys an application only when its config changes."""
    apps = []
    for app in config.get("applications", []):
        args = app.get("args") or {}
        if app.get("import_path") == "actors.app:build_app" and args.get("config"):
            if digest := config_digest(args["config"]):
                app = {**app, "args": {**args, "config_sha256": digest}}
        apps.append(app)
    return {**config, "applications": apps}


def build_app(args: dict) -> Application:
    """Serve's application builder (one parameter: the Serve config's `args`, a dict)."""
    try:
        a = BuildArgs.model_validate(args or {})
    except ValidationError as e:
        raise ConfigError("; ".join(f"args.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                    for err in e.errors())) from None
    if a.config and a.config_sha256 and config_digest(a.config) != a.config_sha256:
        log.warning("args.config %s here differs from the file `moeray deploy` read (its sha256 in "
                    "args.config_sha256): this cluster's copy is the one used", a.config)
    return moeray_app(load_config(config_path(a.config) if a.config else None, {"model": a.model}))


def exposure_warnings(config: MoerayConfig, http_host: str | None = None, grpc_on: bool = False) -> list[str]:
    """What a configuration opens to other machines without an API key (printed by `moeray serve`, logged
    by the builder): nothing by default."""
    s = config.serve
    if s.api_key or not s.allow_remote_without_key:
        return []
    remote = [f"HTTP on {http_host}"] if http_host and not is_loopback_host(http_host) else []
    remote += ["gRPC on every interface"] if grpc_on else []
    return [f"serve.allow_remote_without_key is set and there is no API key: {' and '.join(remote) or 'any proxy'} "
            "serves generations to other machines with no authentication"]


def moeray_app(config: MoerayConfig) -> Application:
    """Three deployments: ExpertPool (one replica: the expert shards and the expert scaler, shared by every
    router), Router (pipeline replicas, autoscaled on ongoing requests; each starts its attention actors and
    joins the pool) and Ingress (HTTP and gRPC, autoscaled on ongoing requests)."""
    from actors.ingress import Ingress, RouterReplica
    from actors.pool import PoolReplica

    config = with_defaults(config)
    for warning in exposure_warnings(config):
        log.warning(warning)
    s, pc, r = config.serve, config.pipeline, config.serve.routers
    pool = serve.deployment(PoolReplica, name="ExpertPool", num_replicas=1, max_ongoing_requests=1000,
                            graceful_shutdown_timeout_s=r.drain_timeout_s + SHARDS_OUTLAST_ROUTERS_S,
                            ray_actor_options={"num_cpus": 0}).bind(config)
    router = serve.deployment(
        RouterReplica, name="Router", max_ongoing_requests=100_000, graceful_shutdown_timeout_s=r.drain_timeout_s,
        autoscaling_config={"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                            "target_ongoing_requests": r.target_ongoing_requests,
                            "upscale_delay_s": r.upscale_delay_s, "downscale_delay_s": r.downscale_delay_s,
                            "look_back_period_s": r.look_back_period_s,
                            "metrics_interval_s": min(r.look_back_period_s / 3, 10.0)},
        ray_actor_options=ray_options(pc.router, "router", config.engine.device),
    ).bind(pool)
    capacity = s.ingress.capacity(r.max_replicas, config.engine)
    ingress = serve.deployment(  # past capacity, Serve queues up to as many more, then answers 503
        Ingress, name="Ingress", max_ongoing_requests=capacity, max_queued_requests=capacity,
        autoscaling_config={"min_replicas": s.ingress.min_replicas, "max_replicas": s.ingress.max_replicas,
                            "target_ongoing_requests": s.ingress.target_ongoing_requests,
                            "upscale_delay_s": s.ingress.upscale_delay_s,
                            "downscale_delay_s": s.ingress.downscale_delay_s},
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(router, config)


# Deployment options moeray derives from its config (one home for each, whichever way the app is started): a
# Serve config's `deployments:` entry would silently override them, and the ingress capacity follows the routers.
OWNED_BY_MOERAY = {"num_replicas": "serve.routers, serve.ingress", "autoscaling_config": "serve.routers, serve.ingress",
                   "max_ongoing_requests": "serve.ingress.max_ongoing_requests",
                   "max_queued_requests": "serve.ingress.max_ongoing_requests",
                   "graceful_shutdown_timeout_s": "serve.routers.drain_timeout_s"}


def validate_serve_config(data: dict):
    """A Serve config checked as `serve deploy` checks it (ServeDeploySchema), and more strictly: Ray
    accepts unknown keys silently, so a typo like `max_replica` would be ignored; here it is an error
    naming the key. Also checks each moeray application's `args`. `moeray deploy` runs this before
    deploying; `serve deploy` itself does not (the builder still refuses unknown `args` keys)."""
    from ray.serve import schema
    from ray.serve.config import AutoscalingConfig

    def known(value, model, where):
        if isinstance(value, dict):
            for key in value:
                if key not in model.model_fields:
                    raise ConfigError(f"unknown key '{where}{key}' in the Serve config")

    known(data, schema.ServeDeploySchema, "")
    known(data.get("http_options"), schema.HTTPOptionsSchema, "http_options.")
    known(data.get("grpc_options"), schema.gRPCOptionsSchema, "grpc_options.")
    known(data.get("logging_config"), schema.LoggingConfig, "logging_config.")
    for i, app in enumerate(data.get("applications") or []):
        known(app, schema.ServeApplicationSchema, f"applications[{i}].")
        for j, d in enumerate(app.get("deployments") or []):
            where = f"applications[{i}].deployments[{j}]."
            known(d, schema.DeploymentSchema, where)
            known(d.get("autoscaling_config"), AutoscalingConfig, where + "autoscaling_config.")
        if app.get("import_path") == "actors.app:build_app":
            for j, d in enumerate(app.get("deployments") or []):
                for key in OWNED_BY_MOERAY.keys() & d.keys():
                    raise ConfigError(f"applications[{i}].deployments[{j}].{key}: moeray sets it from its own config "
                                      f"({OWNED_BY_MOERAY[key]} in the file args.config names), for moeray serve and "
                                      "serve run alike; set it there")
            try:
                BuildArgs.model_validate(app.get("args") or {})
            except ValidationError as e:
                err = e.errors()[0]
                raise ConfigError(f"applications[{i}].args: {err['loc'][0]}: {err['msg']}") from None
    return schema.ServeDeploySchema.model_validate(data)


QUIET = {"log_level": "WARNING", "enable_access_log": False}  # Serve's logging for `moeray serve` unless --verbose


def serve_options(config: MoerayConfig) -> dict:
    """serve.start() keyword arguments for the HTTP and (only when serve.grpc_port is set) gRPC proxies."""
    s = config.serve
    options: dict = {"http_options": {"host": s.host, "port": s.http_port}}
    if s.grpc_port is not None:
        options["grpc_options"] = {"port": s.grpc_port, "grpc_servicer_functions": GRPC_SERVICERS}
    return options
