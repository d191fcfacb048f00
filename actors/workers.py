"""The workers of one pipeline replica: its attention actors and expert shards, each started by `launch`
through a spawner: Ray (the default: actors placed where the config's resources say, restarted when lost)
or this process (InProcess: plain objects, for tests without Ray). The router (a Ray actor under the
Pipeline API, a Serve replica in `moeray serve`) connects to their data-plane addresses; the expert
scaler launches its extra replicas the same way."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import ray

from actors.attention import AttentionActor
from actors.common import WorkerSpec
from actors.expert_shard import ExpertShard
from cluster.config import MoerayConfig
from cluster.dataplane.transport import TransportConfig, with_token
from cluster.placement import Placement, place, ray_options
from kernels.args import ModelArgs
from kernels.engine import EngineConfig

log = logging.getLogger(__name__)


class Spawner(Protocol):
    def start(self, cls: type, options: dict, *args) -> Any:
        """Starts cls(*args) where the Ray actor options `options` place it; returns its handle."""
        ...

    def call(self, handles: list, method: str, *args) -> list:
        """Calls `method(*args)` on every worker, all at once; their results."""
        ...


class RaySpawner:
    def start(self, cls: type, options: dict, *args) -> Any:
        return ray.remote(cls).options(**options).remote(*args)

    def call(self, handles: list, method: str, *args) -> list:
        return ray.get([getattr(h, method).remote(*args) for h in handles])


class InProcess:
    """Workers built in this process as plain objects (the Ray options go unused): a pipeline in seconds."""

    def start(self, cls: type, options: dict, *args) -> Any:
        return cls(*args)

    def call(self, handles: list, method: str, *args) -> list:
        return [getattr(h, method)(*args) for h in handles]


RAY = RaySpawner()
ROLES = {"attention": AttentionActor, "experts": ExpertShard}
NAMESPACE = "moeray"  # where a Serve application's expert pool names its shards


def launch(config: MoerayConfig, role: str, holds: list, *args, spawner: Spawner = RAY, **options) -> Any:
    """Starts one worker of `role`: "attention" holding the layers `holds` (args: its expert shards, see
    AttentionActor), or "experts" holding the (layer, expert) pairs `holds` (spread over the nodes that have
    the resources), built from `config`'s checkpoint, engine section and data plane, on the Ray resources
    pipeline.<role> asks for plus `options`."""
    placement = getattr(config.pipeline, role)
    if role == "experts":
        options = {"scheduling_strategy": "SPREAD", **options}
    spec = WorkerSpec(config.model, config.engine, config.pipeline.transport, placement.threads)
    return spawner.start(ROLES[role], ray_options(placement, role, config.engine.device, **options), spec, holds,
                         *args)


@dataclass
class Workers:
    """The attention actors of one pipeline replica and the expert shards they call, with their data-plane
    addresses. `shared`: the shards are a pool other replicas call too (so they join no replica's collective
    group)."""

    config: MoerayConfig  # what they run with, the router too: the data plane with the deployment's token
    placement: Placement
    attention: list
    experts: list
    attention_addresses: list[str]
    expert_addresses: list[str]
    shared: bool = False


def start_experts(config: MoerayConfig, spawner: Spawner = RAY,
                  name: str | None = None) -> tuple[MoerayConfig, Placement, list, list[str], int]:
    """Starts the expert shards that `config` places and waits until they serve: (the config every worker of
    the deployment runs with, the placement, the shards, their addresses, how many were adopted). `config` is
    left as it is: the workers run with a copy whose data plane has the deployment's token (a configured one,
    else a fresh one). Ray restarts a shard that dies (its process, its node) for as long as its owner lives;
    its callers find it again at its new address.

    With `name` (a Serve application's expert pool) the shards are detached Ray actors named `name.shard-I`
    (in Ray namespace "moeray"):
    they outlive the process that started them, and a later call with the same name adopts each one whose
    layout (`same_layout`) is what it would start, with the data-plane token they have; it stops the others.
    Whoever passes a name stops them (`stop_experts`)."""
    if config.model is None:
        raise ValueError("config.model: give a checkpoint directory")
    pc = config.pipeline
    p = place(ModelArgs.from_dir(config.model), pc)
    for role in ("router", "attention", "experts"):  # checked before any worker starts
        ray_options(getattr(pc, role), role, config.engine.device)
    wanted = [pairs for pairs in p.shards for _ in range(p.replicas)]
    found = adopt(config, wanted, name) if name else {}
    token = pc.transport.token or next((spec.transport_config.token for spec in found.values()), "")
    # the deployment's actors accept only each other
    transport_config = with_token(dataclasses.replace(pc.transport, token=token))
    config = dataclasses.replace(config, pipeline=dataclasses.replace(pc, transport=transport_config))
    experts, adopted = [], 0
    for i, pairs in enumerate(wanted):
        running = found.get(i)
        if running is not None and running.transport_config == transport_config:
            experts.append(running.actor)
            adopted += 1
            continue
        if running is not None:  # a configured token that is not theirs
            ray.kill(running.actor, no_restart=True)
        named = {"name": f"{name}.shard-{i}", "namespace": NAMESPACE, "lifetime": "detached"} if name else {}
        experts.append(launch(config, "experts", pairs, spawner=spawner, max_restarts=-1, **named))
    return config, p, experts, spawner.call(experts, "address"), adopted


@dataclass
class Found:
    """A named shard still running from an earlier start, and what it was built from."""

    actor: Any
    transport_config: TransportConfig


def same_layout(spec: WorkerSpec, pairs: list, config: MoerayConfig, wanted: list) -> bool:
    """Whether a running shard (built from `spec`, holding `pairs`) is the one `config` would start to hold
    `wanted`: the same checkpoint, pairs, threads and data plane (its token aside), and the same engine settings
    that build experts (a KV-cache size or batch limit does not matter to a shard)."""
    def built(engine: EngineConfig) -> tuple:
        return engine.device, engine.dtype, engine.expert_quant, engine.moe_kernel

    pc = config.pipeline
    return (spec.model == config.model and sorted(map(tuple, pairs)) == sorted(map(tuple, wanted))
            and spec.threads == pc.experts.threads and built(spec.engine) == built(config.engine)
            and dataclasses.replace(spec.transport_config, token="") == dataclasses.replace(pc.transport, token=""))


def adopt(config: MoerayConfig, wanted: list, name: str) -> dict[int, Found]:
    """The shards named `name.shard-I` that are alive and laid out as `wanted[I]` says, by I; stops the rest
    (another layout, or an index past the new placement's)."""
    found = {}
    for named in ray.util.list_named_actors(all_namespaces=True):
        actor_name = named["name"]
        prefix, _, index = actor_name.rpartition(".shard-")
        if named["namespace"] != NAMESPACE or prefix != name or not index.isdigit():
            continue
        i, actor = int(index), ray.get_actor(actor_name, namespace=NAMESPACE)
        try:
            spec, pairs = ray.get(actor.layout.remote(), timeout=60)
        except Exception as e:  # noqa: BLE001 (dead, or not answering: replaced)
            log.warning("expert shard %s does not answer (%s): starting a new one", actor_name, e)
            spec = None
        if spec is not None and i < len(wanted) and same_layout(spec, pairs, config, wanted[i]):
            found[i] = Found(actor, spec.transport_config)
        else:
            ray.kill(actor, no_restart=True)
    tokens = {f.transport_config.token for f in found.values()}
    if len(tokens) > 1:  # started by different deployments (cannot call each other's peers): keep none
        for f in found.values():
            ray.kill(f.actor, no_restart=True)
        return {}
    return found


def stop_experts(experts: list) -> None:
    """Stops shards for good (no restart), e.g. a named pool's when its application is deleted."""
    for actor in experts:
        try:
            ray.kill(actor, no_restart=True)
        except Exception as e:  # noqa: BLE001 (already gone)
            log.debug("stopping %s: %s", actor, e)


def start_attention(config: MoerayConfig, placement: Placement, experts: list, expert_addresses: list[str],
                    spawner: Spawner = RAY, shared: bool = False) -> Workers:
    """Starts one pipeline replica's attention actors, calling the shards `experts` (at `expert_addresses`,
    placed by `placement`), and waits until they serve. `config`: the deployment's (start_experts')."""
    pc = config.pipeline
    holders = placement.actors_of()
    attention = [launch(config, "attention", layers, {pair: i for pair, i in holders.items() if pair[0] in layers},
                        expert_addresses, pc.micro_batches, pc.restart_timeout_s, spawner=spawner,
                        max_restarts=-1)
                 for layers in placement.attention]
    spawner.call(attention, "watch", experts)  # so they wait for a shard that Ray restarts
    return Workers(config, placement, attention, experts, spawner.call(attention, "address"), expert_addresses,
                   shared)


def start_workers(config: MoerayConfig, spawner: Spawner = RAY) -> Workers:
    """One pipeline replica with expert shards of its own (start_experts, then start_attention)."""
    return start_attention(*start_experts(config, spawner)[:4], spawner)
