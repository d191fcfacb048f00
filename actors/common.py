"""What every role actor shares: torch threads and where it runs."""

import os

import ray
import torch


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
