"""ExpertShard: the SwiGLU experts of a set of (layer, expert) pairs, answering one batched message per layer."""

from __future__ import annotations

import os
import time

import torch

from actors.common import advertised, node_id, set_threads
from cluster.dataplane import transport
from kernels.checkpoint import Checkpoint
from kernels.engine import DTYPES, QUANT_BITS, resolve_device
from kernels.fused_moe import expert_runner
from kernels.model import FeedForward, build, expert_prefix, load_into
from kernels.moe import blocks_of
from kernels.quant import quantize_experts


class ExpertShard:
    """`device` and `kernel` are engine.device and engine.moe_kernel; as in Engine.from_dir, quantized
    experts are quantized on CPU, then moved, and a dense model's FFN (its layer's one expert) stays on
    the reference kernel, which is what the single-process engine runs for it."""

    def __init__(self, model_dir: str, pairs: list[tuple[int, int]], dtype: str, net: transport.TransportConfig,
                 threads: int = 0, quant: str = "none", device: str = "cpu", kernel: str = "reference"):
        set_threads(threads)
        self.device = resolve_device(device)  # before loading anything: a missing GPU fails here, clearly
        ckpt = Checkpoint.open(model_dir)
        a = ckpt.args
        self.dim, self.dtype = a.dim, DTYPES[dtype]
        bits = QUANT_BITS[quant]
        load_to = "cpu" if bits else self.device
        self.experts = {(l, e): load_into(build(FeedForward, a.dim, a.hidden_dim), ckpt, expert_prefix(a, l, e),
                                          self.dtype, device=load_to)
                        for l, e in pairs}
        if bits:
            for ff in quantize_experts(self.experts, bits).values():
                ff.to(self.device)
        # one runner per layer held: run(rows, blocks) over that layer's experts (kernels/fused_moe.py)
        kernel = kernel if a.moe else "reference"
        layers = sorted({l for l, _ in pairs})
        self.run = {l: expert_runner({e: ff for (m, e), ff in self.experts.items() if m == l}, kernel) for l in layers}
        self.busy_s = 0.0
        self.server = transport.serve(net, experts=self.forward)

    def forward(self, layer: int, blocks: list[tuple[int, int]], rows: torch.Tensor) -> torch.Tensor:
        """rows [R, D] -> [R, D]: this shard's share of a layer's rows (one per token and chosen expert, not
        per token); for each (expert, n) in blocks, the next n rows are that expert's. They arrive on CPU
        (the wire's bytes, or gloo's) or the GPU (nccl); the transport sends the result back from where it is."""
        if rows.shape[1] != self.dim:
            raise transport.BadRequest(f"rows have dim {rows.shape[1]}, the model has {self.dim}")
        missing = [e for e, _ in blocks if (layer, e) not in self.experts]
        if missing:
            raise transport.BadRequest(f"experts {missing} of layer {layer} are not on this shard")
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.run[layer](rows.to(self.device, self.dtype), blocks_of(blocks))  # [R, D]
        self.busy_s += time.perf_counter() - t0
        return out

    # -- control plane (Ray calls) -------------------------------------------------------------
    def address(self) -> str:
        return advertised(self.server.address)

    def join_group(self, rendezvous: str, world_size: int, rank: int) -> None:
        """Join the router's collective group (transport kinds gloo, nccl) as `rank`: blocks until it has
        formed, while the data-plane server keeps answering gRPC on its own threads."""
        self.server.join(rendezvous, world_size, rank)

    def info(self) -> dict:
        return {"node_id": node_id(), "pid": os.getpid(), "pairs": sorted(self.experts), "busy_s": self.busy_s,
                "param_bytes": sum(t.numel() * t.element_size() for m in self.experts.values()
                                   for t in [*m.parameters(), *m.buffers()])}  # quantized weights are buffers
