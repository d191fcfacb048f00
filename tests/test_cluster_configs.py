"""cluster/*.yaml (`ray up` configs): Ray's own offline validation, plus what it does not check.

Ray's validator (`validate_config(prepare_config(cfg))`, the first two steps of `ray up`, no cloud
calls) catches unknown keys at the top level and in node types, a head_node_type that names no node
type, a node type without node_config or resources, custom resources that are fractional, negative
or strings, and min_workers summing past the global max_workers. It does not catch (so `check` below
does): a float custom resource with an integral value (1.0: JSON Schema counts it as an integer), or
a node type whose min_workers exceeds its own max_workers. Inside `provider` and `node_config`
anything goes: a misspelt InstanceType only fails at launch.
"""

import copy
import socket
from pathlib import Path

import jsonschema  # Ray's validator needs it; fail here, not skip, when it is missing
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = sorted((ROOT / "configs" / "ray-up").glob("*.yaml"))
GPU_CLUSTERS = [p for p in CLUSTERS if "cpu" not in p.name]
PLACEMENT = ("attention_node", "expert_node")  # the custom resources moeray's actors ask for
BUILTIN = {"CPU", "GPU", "memory", "object_store_memory"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Validation must not touch the network (no cloud credentials in CI): any connection fails."""
    def refuse(*_):
        raise AssertionError("validation tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def ray_validated(cfg: dict) -> dict:
    """What `ray up` does before it calls the cloud: fill in the provider's defaults, then validate."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def check(cfg: dict) -> dict:
    """Ray's validation, then ours: custom resources are ints (the schema lets 1.0 through) and no node
    type wants more nodes at least than at most. Returns the prepared config; ValueError names the problem."""
    prepared = ray_validated(cfg)
    for name, node_type in prepared["available_node_types"].items():
        for res, amount in node_type["resources"].items():
            if res not in BUILTIN and (type(amount) is not int or amount < 0):
                raise ValueError(f"node type {name!r}: custom resource {res}={amount!r} must be a non-negative int")
        if node_type["min_workers"] > node_type["max_workers"]:
            raise ValueError(f"node type {name!r}: min_workers {node_type['min_workers']} > "
                             f"max_workers {node_type['max_workers']}")
    return prepared


def by_resource(cfg: dict, resource: str) -> tuple[str, dict]:
    """The one node type that declares `resource`."""
    found = [(n, t) for n, t in cfg["available_node_types"].items() if resource in t["resources"]]
    assert len(found) == 1, f"{resource}: declared by {[n for n, _ in found]}, expected exactly one node type"
    return found[0]


def test_the_three_clusters_exist():
    assert {p.name for p in CLUSTERS} >= {"aws.yaml", "gcp.yaml", "aws-cpu.yaml"}


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_validates(path):
    check(load(path))


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_node_types_for_attention_and_experts(path):
    cfg = check(load(path))
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert not set(head["resources"]) & set(PLACEMENT), "no moeray actor should land on the head"
    for res in PLACEMENT:
        _, node_type = by_resource(cfg, res)
        amount = node_type["resources"][res]
        assert type(amount) is int and amount >= 1
        assert node_type["min_workers"] >= 1  # the first replicas have somewhere to go at once
    _, expert = by_resource(cfg, "expert_node")
    assert expert["max_workers"] > expert["min_workers"], "the autoscaler must be able to add expert nodes"
    assert cfg["max_workers"] >= sum(t["max_workers"] for t in cfg["available_node_types"].values())


@pytest.mark.parametrize("path", GPU_CLUSTERS, ids=lambda p: p.name)
def test_gpu_clusters_put_gpus_where_the_actors_go(path):
    cfg = check(load(path))
    for res in PLACEMENT:
        name, node_type = by_resource(cfg, res)
        node = node_type["node_config"]
        if cfg["provider"]["type"] == "aws":  # GPU count is filled in from EC2 at `ray up`; check the family
            assert node["InstanceType"].split(".")[0] in {"g5", "g6", "g6e", "p4d", "p4de", "p5", "p5e"}, name
        else:  # GCP: Ray cannot look the machine type up, the YAML must say it
            assert node_type["resources"].get("GPU", 0) >= 1, name
            assert node["machineType"].startswith(("a2-", "a3-", "g2-")) or node.get("guestAccelerators"), name


def pipeline_resources(path: Path) -> dict[str, dict[str, float]]:
    """{role: resources} of a moeray config's pipeline section (attention, experts, router)."""
    pipeline = load(path)["pipeline"]
    return {role: section["resources"] for role, section in pipeline.items()
            if isinstance(section, dict) and section.get("resources")}


@pytest.mark.parametrize("path, pipeline", [(p, "pipeline-multinode.yaml") for p in CLUSTERS]
                         + [(p, "pipeline-gpu.yaml") for p in GPU_CLUSTERS], ids=lambda p: getattr(p, "name", p))
def test_pipeline_placement_fits_the_cluster(path, pipeline):
    """Every resource a multi-node pipeline config places an actor with is declared by a node type of
    the cluster, in an amount that holds at least one such actor (else it would pend for ever)."""
    wants = pipeline_resources(ROOT / "configs" / pipeline)
    assert {r for res in wants.values() for r in res} == set(PLACEMENT)  # the cross-check covers both
    cfg = check(load(path))
    for role, resources in wants.items():
        for res, fraction in resources.items():
            name, node_type = by_resource(cfg, res)
            has = node_type["resources"][res]
            assert 0 < fraction <= has, f"{role} asks {res}={fraction}; {name} has {has}"


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
def test_every_node_installs_the_synced_repository(path):
    """file_mounts copies the repository root ("." where `ray up` runs) to REMOTE; head and workers then
    `pip install -e REMOTE`, so Serve's proxy can import moeray's gRPC stubs on every node."""
    cfg = check(load(path))
    remote = [r for r, local in cfg["file_mounts"].items() if (ROOT / local).resolve() == ROOT]
    assert len(remote) == 1 and (ROOT / "pyproject.toml").is_file()
    for commands in (cfg["head_setup_commands"], cfg["worker_setup_commands"]):  # setup_commands merged in
        assert any(f"pip install -q -e {remote[0]}" in c or f"pip install -e {remote[0]}" in c for c in commands)
    start = cfg["head_start_ray_commands"][-1]
    assert "--head" in start and "--autoscaling-config=~/ray_bootstrap_config.yaml" in start
    # no --resources on `ray start`: the node type's resources arrive through RAY_OVERRIDE_RESOURCES
    assert "$RAY_HEAD_IP:6379" in cfg["worker_start_ray_commands"][-1]
    assert not any("--resources" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])


@pytest.mark.parametrize("path", GPU_CLUSTERS, ids=lambda p: p.name)
def test_workers_fetch_the_weights_to_the_configured_model_path(path):
    model = load(ROOT / "configs" / "pipeline-multinode.yaml")["model"]
    cfg = check(load(path))
    assert any(c.rstrip().endswith(model) and "sync" in c for c in cfg["worker_setup_commands"]), model


def set_key(*keys, value=None, delete=False):
    def edit(cfg):
        node = cfg
        for k in keys[:-1]:
            node = node[k]
        if delete:
            node.pop(keys[-1])
        else:
            node[keys[-1]] = value
    return edit


def rename_top(old, new):
    def edit(cfg):
        cfg[new] = cfg.pop(old)
    return edit


EXPERT_NODE = ("available_node_types", "expert", "resources", "expert_node")  # the expert nodes' custom resource
# (what is broken, the edit, caught by Ray's validator itself?)
BROKEN = [
    ("typo'd top-level key", rename_top("max_workers", "max_worker"), True),
    ("typo'd node-type key", set_key("available_node_types", "expert", "min_worker", value=1), True),
    ("head_node_type names no node type", set_key("head_node_type", value="ray.head.default"), True),
    ("node type without node_config", set_key("available_node_types", "expert", "node_config", delete=True), True),
    ("node type without resources", set_key("available_node_types", "attention", "resources", delete=True), True),
    ("fractional custom resource", set_key(*EXPERT_NODE, value=0.5), True),
    ("negative custom resource", set_key(*EXPERT_NODE, value=-1), True),
    ("custom resource as a string", set_key(*EXPERT_NODE, value="1"), True),
    ("min_workers past the global max", set_key("available_node_types", "expert", "min_workers", value=50), True),
    ("custom resource as 1.0", set_key(*EXPERT_NODE, value=1.0), False),
    ("min_workers > the type's max_workers", set_key("available_node_types", "expert", "min_workers", value=9), False),
]


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.name)
@pytest.mark.parametrize("what, edit, by_ray", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_variants_fail(path, what, edit, by_ray):
    cfg = load(path)
    assert check(cfg)  # the original passes, so the failure below is the edit's
    edit(cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        (ray_validated if by_ray else check)(cfg)
