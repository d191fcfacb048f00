"""The Serve application: `import_path: cluster.app:build_app` in a Serve config, or `moeray serve`.

    applications:
    - name: moeray
      import_path: cluster.app:build_app
      args: {config: configs/demo.yaml}        # and/or model: /models/Mixtral-8x7B-Instruct-v0.1
"""

from __future__ import annotations


from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve import Application

from cluster.config import MoerayConfig, api_key_of, load_config
from cluster.placement import ray_options

GRPC_SERVICERS = [
    "cluster.rpc.moeray_pb2_grpc.add_GenerationServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]


class BuildArgs(BaseModel):
    """The Serve config's `args:`. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")
    config: str | None = None  # moeray YAML (engine, pipeline, serve sections)
    model: str | None = None  # checkpoint directory; overrides the YAML's; default: the built-in demo model


def resolve(config: MoerayConfig) -> MoerayConfig:
    """The demo model when no model is configured; the API key from $MOERAY_API_KEY when the config has
    none (so it travels to the Ingress replicas inside the config, wherever they run)."""
    config.serve.api_key = api_key_of(config.serve)
    if config.model is None:
        from kernels.train import demo_dir

        config.model = str(demo_dir())
        config.serve.model_name = config.serve.model_name or "moeray-demo"
    return config


def build_app(args: dict | None = None, config: MoerayConfig | None = None) -> Application:
    from actors.ingress import Ingress, RouterReplica

    if config is None:
        a = BuildArgs(**(args or {}))
        config = load_config(a.config, {"model": a.model})
    config = resolve(config)
    s, pc = config.serve, config.pipeline
    router = serve.deployment(
        RouterReplica, name="Router", num_replicas=s.pipeline_replicas, max_ongoing_requests=100_000,
        ray_actor_options=ray_options(pc.router, "router", config.engine.device),
    ).bind(config)
    capacity = s.ingress.capacity(s.pipeline_replicas, config.engine)
    ingress = serve.deployment(  # past capacity, Serve queues up to as many more, then answers 503
        Ingress, name="Ingress", max_ongoing_requests=capacity, max_queued_requests=capacity,
        autoscaling_config={"min_replicas": s.ingress.min_replicas, "max_replicas": s.ingress.max_replicas,
                            "target_ongoing_requests": s.ingress.target_ongoing_requests},
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(router, config)


def validate_serve_config(data: dict):
    """A Serve config checked as `serve deploy` checks it (ServeDeploySchema), and more strictly: Ray
    accepts unknown keys silently, so a typo like `max_replica` would be ignored; here it is an error
    naming the key. Also checks each moeray application's `args`."""
    from ray.serve import schema
    from ray.serve.config import AutoscalingConfig

    from cluster.config import ConfigError

    def known(value, model, where):
        if isinstance(value, dict):
            for key in value:
                if key not in model.model_fields:
                    raise ConfigError(f"unknown key '{where}{key}' in the Serve config")

    known(data, schema.ServeDeploySchema, "")
    known(data.get("http_options"), schema.HTTPOptionsSchema, "http_options.")
    known(data.get("grpc_options"), schema.gRPCOptionsSchema, "grpc_options.")
    for i, app in enumerate(data.get("applications") or []):
        known(app, schema.ServeApplicationSchema, f"applications[{i}].")
        for j, d in enumerate(app.get("deployments") or []):
            where = f"applications[{i}].deployments[{j}]."
            known(d, schema.DeploymentSchema, where)
            known(d.get("autoscaling_config"), AutoscalingConfig, where + "autoscaling_config.")
        if app.get("import_path") == "cluster.app:build_app":
            BuildArgs(**(app.get("args") or {}))
    return schema.ServeDeploySchema.model_validate(data)


def serve_options(config: MoerayConfig) -> dict:
    """serve.start() keyword arguments for the HTTP and gRPC proxies."""
    s = config.serve
    return {"http_options": {"host": s.host, "port": s.http_port},
            "grpc_options": {"port": s.grpc_port, "grpc_servicer_functions": GRPC_SERVICERS}}
