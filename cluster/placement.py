"""Where the roles of a pipeline replica run, and which actor holds which weights.

A dense model (Mistral-7B) is placed as a MoE with one expert per layer and weight 1, so the expert
shards, the router and the transport have one code path for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.dataplane.transport import TransportConfig
from kernels.args import ModelArgs


@dataclass
class AttentionPlacement:
    actors: int = 1  # the layers are split into this many contiguous ranges, one actor each
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources, e.g. {attention_node: 0.01}
    num_cpus: float = 0  # Ray CPUs reserved per actor (0: none, so a laptop fits every role)
    threads: int = 1  # torch threads per actor; 0: all cores of its node (set it where a role has a node of its own)
    # Ray GPUs reserved per actor: > 0 is required when engine.device is cuda (Ray then places the actor on
    # a GPU node and makes its GPU the process's "cuda"); a fraction shares one GPU, e.g. 0.5 = two per GPU
    num_gpus: float = 0


@dataclass
class ExpertPlacement:
    shards: int = 1  # the (layer, expert) pairs are split over this many shards (by expert, then by layer)
    replicas: int = 1  # actors per shard; an expert's rows are split evenly over the actors that hold it
    resources: dict[str, float] = field(default_factory=dict)  # e.g. {expert_node: 0.01}
    num_cpus: float = 0
    threads: int = 1
    num_gpus: float = 0  # as AttentionPlacement.num_gpus; extra replicas (expert autoscaling) ask for the same


@dataclass
class RouterPlacement:
    resources: dict[str, float] = field(default_factory=dict)
    num_cpus: float = 0
    threads: int = 1
    num_gpus: float = 0  # as AttentionPlacement.num_gpus (the router holds embeddings, final norm, LM head)


@dataclass
class PipelineConfig:
    attention: AttentionPlacement = field(default_factory=AttentionPlacement)
    experts: ExpertPlacement = field(default_factory=ExpertPlacement)
    router: RouterPlacement = field(default_factory=RouterPlacement)
    transport: TransportConfig = field(default_factory=TransportConfig)
    # a router waits this long for Ray to restart a lost worker, then fails its requests
    restart_timeout_s: float = 300.0
    # 2: each attention actor splits a step's sequences in two halves and runs its layers in ping-pong, one
    # half's attention while the other's experts compute; 1: the whole step at once
    micro_batches: int = 1

    def __post_init__(self):
        if self.micro_batches not in (1, 2):
            raise ValueError(f"micro_batches must be 1 or 2, got {self.micro_batches}")


Role = AttentionPlacement | ExpertPlacement | RouterPlacement


def ray_options(role: Role, role_name: str, device: str, **extra) -> dict:
    """Ray actor options for the actors of role `role_name` ("attention", "experts", "router") running on
    engine.device `device`: its CPUs, GPUs and custom resources, plus `extra`. A role on CUDA that asks
    Ray for no GPU is refused here, before anything starts: Ray would place it anywhere, and on a GPU
    node it would share a GPU others reserved."""
    if device != "cpu" and role.num_gpus <= 0:
        raise ValueError(f"engine.device is {device!r}: set pipeline.{role_name}.num_gpus > 0 (a fraction shares "
                         f"a GPU) so Ray gives each {role_name} actor a GPU")
    return {"num_cpus": role.num_cpus, "num_gpus": role.num_gpus, "resources": dict(role.resources), **extra}


@dataclass(frozen=True)
class Placement:
    attention: list[list[int]]  # layers of each attention actor
    shards: list[list[tuple[int, int]]]  # (layer, expert) pairs of each shard
    replicas: int  # actors per shard; actor index = shard * replicas + replica

    def actors_of(self) -> dict[tuple[int, int], list[int]]:
        """(layer, expert) -> indices of the expert actors that hold it (its replicas)."""
        return {pair: [s * self.replicas + r for r in range(self.replicas)]
                for s, shard in enumerate(self.shards) for pair in shard}


def _split(n: int, parts: int) -> list[range]:
    """0..n-1 in `parts` contiguous ranges, sizes differing by at most one."""
    return [range(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def place(args: ModelArgs, cfg: PipelineConfig) -> Placement:
    L, E = args.n_layers, max(args.num_experts, 1)
    if not 1 <= cfg.attention.actors <= L:
        raise ValueError(f"pipeline.attention.actors must be in 1..{L} (the model has {L} layers)")
    if not 1 <= cfg.experts.shards <= L * E:
        raise ValueError(f"pipeline.experts.shards must be in 1..{L * E} ({L} layers x {E} experts)")
    if cfg.experts.replicas < 1:
        raise ValueError("pipeline.experts.replicas must be >= 1")
    units = [(l, e) for e in range(E) for l in range(L)]  # expert-major: a shard gets whole experts first
    return Placement(
        attention=[list(r) for r in _split(L, cfg.attention.actors)],
        shards=[sorted(units[i] for i in r) for r in _split(len(units), cfg.experts.shards)],
        replicas=cfg.experts.replicas,
    )
