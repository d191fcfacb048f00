"""What every role actor shares: torch threads and where it runs."""

import os

import ray
import torch


def set_threads(threads: int) -> None:
    """Ray gives an actor with num_cpus=0 one OpenMP thread; the data plane is sequential per step,
    so the active actor may use the whole node unless configured otherwise."""
    torch.set_num_threads(threads or os.cpu_count() or 1)


def node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
