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
    """The attention and expert actors of one pipeline replica, with their data-plane addresses."""

    config: MoerayConfig  # what they run with, the router too: the caller's, the data plane given the replica's token
    placement: Placement
    attention: list
    experts: list
    attention_addresses: list[str]
    expert_addresses: list[str]


def start_workers(config: MoerayConfig, spawner: Spawner = RAY) -> Workers:
    """Starts the expert shards and then the attention actors (which call them) that `config` places, and
    waits until they serve.
    `config` is left as it is: the workers run with a copy whose data plane has this replica's token (a
    configured one, else a fresh one), Workers.config. Ray restarts a worker that dies (its process, its
    node) for as long as its owner lives; the router finds it again at its new address."""
    if config.model is None:
        raise ValueError("config.model: give a checkpoint directory")
    pc = config.pipeline
    # this replica's actors accept only each other
    config = dataclasses.replace(config, pipeline=dataclasses.replace(pc, transport=with_token(pc.transport)))
    p = place(ModelArgs.from_dir(config.model), pc)
    for role in ("router", "attention", "experts"):  # checked before any worker starts
        ray_options(getattr(pc, role), role, config.engine.device)
    experts = [launch(config, "experts", pairs, spawner=spawner, max_restarts=-1)
               for pairs in p.shards for _ in range(p.replicas)]
    expert_addresses = spawner.call(experts, "address")
    holders = p.actors_of()
    attention = [launch(config, "attention", layers, {pair: i for pair, i in holders.items() if pair[0] in layers},
                        expert_addresses, pc.micro_batches, pc.restart_timeout_s, spawner=spawner,
                        max_restarts=-1)
                 for layers in p.attention]
    spawner.call(attention, "watch", experts)  # so they wait for a shard that Ray restarts
    return Workers(config, p, attention, experts, spawner.call(attention, "address"), expert_addresses)
