"""The workers of one pipeline replica: its attention actors and expert shards, each started by `launch`
through a spawner: Ray (the default: actors placed where the config's resources say, restarted when lost)
or this process (InProcess: plain objects, for tests without Ray). The router (a Ray actor under the
Pipeline API, a Serve replica in `moeray serve`) connects to their data-plane addresses; the expert
scaler launches its extra replicas the same way."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import ray

from actors.attention import AttentionActor
from actors.common import WorkerSpec
from actors.expert_shard import ExpertShard
from cluster.config import MoerayConfig
from cluster.dataplane.transport import with_token
from cluster.placement import Placement, place, ray_options
from kernels.args import ModelArgs


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


def start_experts(config: MoerayConfig, spawner: Spawner = RAY) -> tuple[MoerayConfig, Placement, list, list[str]]:
    """Starts the expert shards that `config` places and waits until they serve: (the config every worker of
    the deployment runs with, the placement, the shards, their addresses). `config` is left as it is: the
    workers run with a copy whose data plane has the deployment's token (a configured one, else a fresh one).
    Ray restarts a shard that dies (its process, its node) for as long as its owner lives; its callers find
    it again at its new address."""
    if config.model is None:
        raise ValueError("config.model: give a checkpoint directory")
    pc = config.pipeline
    # the deployment's actors accept only each other
    config = dataclasses.replace(config, pipeline=dataclasses.replace(pc, transport=with_token(pc.transport)))
    p = place(ModelArgs.from_dir(config.model), pc)
    for role in ("router", "attention", "experts"):  # checked before any worker starts
        ray_options(getattr(pc, role), role, config.engine.device)
    experts = [launch(config, "experts", pairs, spawner=spawner, max_restarts=-1)
               for pairs in p.shards for _ in range(p.replicas)]
    return config, p, experts, spawner.call(experts, "address")


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
    return start_attention(*start_experts(config, spawner), spawner)
