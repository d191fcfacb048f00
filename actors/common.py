"""What every role actor shares: what a worker is built from, torch threads and where it runs."""

import os
from dataclasses import dataclass

import ray
import torch

from cluster.dataplane.transport import TransportConfig
from kernels.engine import EngineConfig


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker (attention actor, expert shard) is built from, besides the layers or pairs it holds."""

    model: str  # checkpoint directory
    engine: EngineConfig  # device, dtype, expert_quant, moe_kernel: applied by kernels.build; the KV cache's size
    transport_config: TransportConfig  # its data-plane server's, with its pipeline replica's token
    threads: int  # torch threads (see set_threads)


def set_threads(threads: int) -> None:
    """One thread by default: roles sharing a node would otherwise spin OpenMP threads against each
    other (measured: 51 vs 87 tok/s for 4 roles on 2 cores); 0 takes every core, for a node of its own."""
    torch.set_num_threads(threads or os.cpu_count() or 1)


def node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def advertised(address: str) -> str:
    """The address other nodes should dial: a server bound to every interface (0.0.0.0, [::])
    is reached at this node's IP."""
    host, port = address.rsplit(":", 1)
    if host in ("0.0.0.0", "[::]", "::"):
        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    return f"{host}:{port}"
