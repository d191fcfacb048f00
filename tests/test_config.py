"""Typed YAML config: defaults, every shipped config loads, unknown keys and bad values are named."""

from pathlib import Path

import pytest
import yaml

from cluster.config import ConfigError, MoerayConfig, load_config

ROOT = Path(__file__).parent.parent
ALL = sorted((ROOT / "configs").glob("*.yaml"))
SERVE = [p for p in ALL if "applications" in yaml.safe_load(p.read_text())]  # Ray Serve configs
CONFIGS = [p for p in ALL if p not in SERVE]  # moeray configs


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults():
    cfg = load_config()
    assert cfg.model is None and cfg.engine.max_num_seqs == 64


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    load_config(path)


@pytest.mark.parametrize("path", SERVE, ids=[p.name for p in SERVE])
def test_serve_configs_validate(path, monkeypatch):
    """What `serve deploy` checks (ServeDeploySchema), unknown keys, our builder's args, and the
    moeray YAML they name."""
    from actors.app import BuildArgs, validate_serve_config

    schema = validate_serve_config(yaml.safe_load(path.read_text()))
    monkeypatch.chdir(ROOT)  # paths in args are relative to where `serve run` is started
    for app in schema.applications:
        assert app.import_path == "actors.app:build_app"
        args = BuildArgs(**app.args)
        if args.config:
            load_config(args.config)


def test_moeray_deploy_puts_the_moeray_yamls_digest_in_the_args(tmp_path, monkeypatch):
    """Serve redeploys only on a changed app config: `moeray deploy` adds the sha256 of the YAML args.config names
    (found as the builder finds it), so an edit to that file alone changes the args; a file not found here (a
    cluster elsewhere) leaves them as they are."""
    from actors.app import BuildArgs, with_config_digests

    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load(SERVE[0].read_text())
    (tmp_path / "moeray.yaml").write_text("engine:\n  max_num_seqs: 8\n")
    shipped["applications"][0]["args"]["config"] = "moeray.yaml"
    first = with_config_digests(shipped)
    args = first["applications"][0]["args"]
    assert len(args["config_sha256"]) == 64 and BuildArgs(**args).config == "moeray.yaml"
    assert "config_sha256" not in shipped["applications"][0]["args"]  # the given dict is left alone
    assert with_config_digests(shipped) == first
    (tmp_path / "moeray.yaml").write_text("engine:\n  max_num_seqs: 16\n")
    assert with_config_digests(shipped)["applications"][0]["args"]["config_sha256"] != args["config_sha256"]
    shipped["applications"][0]["args"]["config"] = "elsewhere.yaml"
    assert with_config_digests(shipped) == shipped
    # the shipped config's own configs/pipeline-local.yaml is found in the moeray tree from anywhere
    assert "config_sha256" in with_config_digests(yaml.safe_load(SERVE[0].read_text()))["applications"][0]["args"]


@pytest.mark.parametrize("where, key", [
    (("applications", 0, "deployments", 0, "autoscaling_config"), "max_replica"),
    (("applications", 0, "deployments", 0), "max_ongoing_request"),
    (("applications", 0), "import_pth"),
    (("applications", 0, "args"), "modle"),
    ((), "http_option"),
])
def test_serve_config_typos_are_refused(where, key):
    from actors.app import validate_serve_config

    broken = yaml.safe_load(SERVE[0].read_text())
    if "deployments" in where:  # the shipped file has none (moeray's config sets replicas and autoscaling)
        broken["applications"][0]["deployments"] = [{"name": "Ingress", "autoscaling_config": {}}]
    node = broken
    for k in where:
        node = node[k]
    node[key] = 3
    with pytest.raises(Exception, match=key):
        validate_serve_config(broken)


@pytest.mark.parametrize("key, value, home", [("num_replicas", 2, "serve.routers"),
                                              ("autoscaling_config", {"max_replicas": 8}, "serve.ingress"),
                                              ("graceful_shutdown_timeout_s", 5, "serve.routers.drain_timeout_s")])
def test_replica_counts_have_one_home(key, value, home):
    """The moeray config sets replicas and autoscaling for moeray serve and serve run alike; a Serve config's
    deployments entry would override them silently (and the ingress capacity follows the routers)."""
    from actors.app import validate_serve_config

    config = yaml.safe_load(SERVE[0].read_text())
    config["applications"][0]["deployments"] = [{"name": "Router", key: value}]
    with pytest.raises(Exception, match=f"deployments.0.?.{key}.*{home}"):
        validate_serve_config(config)


def test_values_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "model: /m\nengine:\n  max_num_seqs: 8\n  dtype: bfloat16\n"),
                      {"engine": {"dtype": "float16"}})
    assert (cfg.model, cfg.engine.max_num_seqs, cfg.engine.dtype) == ("/m", 8, "float16")


@pytest.mark.parametrize("text, message", [
    ("engine:\n  max_seqs: 8\n", "unknown key 'engine.max_seqs'"),
    ("modle: /m\n", "unknown key 'modle'"),
    ("engine:\n  max_num_seqs: lots\n", "engine.max_num_seqs: expected int, got 'lots'"),
    ("engine:\n  max_num_seqs: true\n", "engine.max_num_seqs: expected int"),
    ("engine:\n  dtype: float8\n", "engine: dtype must be one of"),
    ("engine:\n  max_num_seqs: 0\n", "max_num_seqs must be >= 1"),
    ("serve:\n  routers: {min_replicas: 3, max_replicas: 2}\n", "serve.routers needs 1 <= min_replicas"),
    ("serve:\n  pipeline_replicas: 2\n", "unknown key 'serve.pipeline_replicas'"),
    ("engine: [1, 2]\n", "engine: expected a mapping"),
    ("- a\n", "expected a mapping at the top level"),
    ("engine: {\n", "not valid YAML"),
])
def test_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(write(tmp_path, text))


def test_ingress_capacity_reaches_the_routers_queue_before_serve_queues():
    """A stream holds its ingress slot to the end: with fewer slots than the routers' batches and queues,
    requests would wait in Serve's queue (no bound, no 429) instead of getting the router's 429."""
    cfg = MoerayConfig()
    cfg.engine.max_num_seqs, cfg.engine.max_queued_requests = 64, 256
    cfg.serve.routers.max_replicas, cfg.serve.ingress.min_replicas = 2, 3
    assert cfg.serve.ingress.capacity(2, cfg.engine) == 215  # ceil(2 * (64 + 256) / 3) + 1
    cfg.serve.ingress.max_ongoing_requests = 10
    assert cfg.serve.ingress.capacity(2, cfg.engine) == 10


def test_engine_kv_cache_dtype_from_yaml(tmp_path):
    """engine.kv_cache_dtype reaches EngineConfig from YAML; a dtype it cannot hold is refused with its path."""
    import torch

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"engine": {"dtype": "float32", "kv_cache_dtype": "bfloat16"}}))
    assert load_config(p).engine.kv_dtype(torch.float32) == torch.bfloat16
    assert load_config().engine.kv_dtype(torch.float32) == torch.float32  # auto: the weights' dtype
    with pytest.raises(ConfigError, match="engine: kv_cache_dtype must be 'auto' or one of"):
        load_config(overrides={"engine": {"kv_cache_dtype": "int8"}})


def test_free_ports_stay_out_of_the_kernels_and_rays_ranges():
    """Ports the tests' servers get are never ones the kernel hands to bind(0) or an outgoing connection (Ray's
    processes take those between our pick and our bind), nor Ray's worker ports; each is bindable, none twice."""
    import socket

    from cluster.ports import _ephemeral_low, free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(20000 <= p < _ephemeral_low() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))
