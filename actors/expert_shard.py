"""ExpertShard: the SwiGLU experts of a set of (layer, expert) pairs, answering one batched message per layer;
concurrent messages for the same layer (from several attention actors) run as one batch (actors/batching.py)."""

from __future__ import annotations

import os

import torch

from actors.batching import Batcher
from actors.common import WorkerSpec, advertised, node_id, set_threads
from cluster.dataplane import transport
from kernels.build import Holds, build_role
from kernels.checkpoint import Checkpoint


class ExpertShard:
    """Its experts are built by kernels.build (device, dtype, quantization, and their stage per layer on
    engine.moe_kernel)."""

    def __init__(self, spec: WorkerSpec, pairs: list[tuple[int, int]]):
        set_threads(spec.threads)
        self.spec, self.pairs = spec, sorted(pairs)
        built = build_role(Checkpoint.open(spec.model), spec.engine, Holds(experts=pairs))
        self.dim, self.device, self.dtype = built.model.args.dim, built.device, built.dtype
        self.experts = built.experts  # {(layer, expert): FeedForward}
        self.run = built.stages  # layer -> run(rows, blocks) over its experts here (kernels/fused_moe.py)
        self.batcher = Batcher(self.run)  # one compute at a time, of every call of its layer then waiting
        self.server = transport.serve(spec.transport_config, experts=self.forward)

    def forward(self, layer: int, blocks: list[tuple[int, int]], rows: torch.Tensor) -> torch.Tensor:
        """rows [R, D] -> [R, D]: this shard's share of a layer's rows (one per token and chosen expert, not
        per token); for each (expert, n) in blocks, the next n rows are that expert's. They arrive on CPU
        (the wire's bytes, or gloo's) or the GPU (nccl); the transport sends the result back from where it is.
        Checked here, before the batcher queues it with other callers' calls: a bad call fails alone."""
        if rows.shape[1] != self.dim:
            raise transport.BadRequest(f"rows have dim {rows.shape[1]}, the model has {self.dim}")
        missing = [e for e, _ in blocks if (layer, e) not in self.experts]
        if missing:
            raise transport.BadRequest(f"experts {missing} of layer {layer} are not on this shard")
        return self.batcher(layer, blocks, rows.to(self.device, self.dtype))  # [R, D]

    # -- control plane (Ray calls) -------------------------------------------------------------
    def address(self) -> str:
        return advertised(self.server.address)

    def layout(self) -> tuple[WorkerSpec, list[tuple[int, int]]]:
        """What it was built from and holds: an expert pool starting again adopts a shard whose layout it wants."""
        return self.spec, self.pairs

    def join_group(self, rendezvous: str, world_size: int, rank: int) -> None:
        """Join the router's collective group (transport kinds gloo, nccl) as `rank`: blocks until it has
        formed, while the data-plane server keeps answering gRPC on its own threads."""
        self.server.join(rendezvous, world_size, rank)

    def info(self) -> dict:
        """Where it runs, what it holds, and its batching: calls, batches (computes run), rows_per_expert_call
        (mean rows per expert GEMM), callers_per_batch, busy_s (seconds computing)."""
        return {"node_id": node_id(), "pid": os.getpid(), "pairs": sorted(self.experts), **self.batcher.stats(),
                "param_bytes": sum(t.numel() * t.element_size() for m in self.experts.values()
                                   for t in [*m.parameters(), *m.buffers()])}  # quantized weights are buffers
