"""The workers of one pipeline replica: its attention actors and expert shards, started on Ray where the
placement puts them. The router (a Ray actor under the Pipeline API, a Serve replica in `moeray serve`)
connects to their data-plane addresses."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from actors.attention import AttentionActor
from actors.expert_shard import ExpertShard
from cluster.config import MoerayConfig
from cluster.dataplane.transport import with_token
from cluster.placement import Placement, plan, ray_options
from kernels.args import ModelArgs


@dataclass
class Workers:
    """The attention and expert actors of one pipeline replica, with their data-plane addresses."""

    placement: Placement
    attention: list
    experts: list
    attention_addresses: list[str]
    expert_addresses: list[str]


def start_workers(config: MoerayConfig) -> Workers:
    """Starts the attention actors and expert shards that `config` places, and waits until they serve.
    The router (a Ray actor here, a Serve replica in `moeray serve`) connects to the addresses. Ray
    restarts a worker that dies (its process, its node) for as long as its owner lives; the router
    finds it again at its new address."""
    if config.model is None:
        raise ValueError("config.model: give a checkpoint directory")
    args = ModelArgs.from_dir(config.model)
    config.pipeline.transport = with_token(config.pipeline.transport)  # this replica's actors accept only each other
    p, pc, eng = plan(args, config.pipeline), config.pipeline, config.engine
    ray_options(pc.router, "router", eng.device)  # checked before any worker starts
    attention_options = ray_options(pc.attention, "attention", eng.device, max_restarts=-1)
    expert_options = ray_options(pc.experts, "experts", eng.device, max_restarts=-1, scheduling_strategy="SPREAD")
    attention = [ray.remote(AttentionActor).options(**attention_options).remote(
        config.model, layers, eng, pc.transport, pc.attention.threads) for layers in p.attention]
    experts = [ray.remote(ExpertShard).options(**expert_options).remote(
        config.model, pairs, eng.dtype, pc.transport, pc.experts.threads, eng.expert_quant, eng.device, eng.moe_kernel)
        for pairs in p.shards for _ in range(p.replicas)]
    return Workers(p, attention, experts, ray.get([a.address.remote() for a in attention]),
                   ray.get([e.address.remote() for e in experts]))
