"""ExpertShard: the SwiGLU experts of a set of (layer, expert) pairs, answering one batched message per layer."""

from __future__ import annotations

import os
import time

import torch

from actors.common import advertised, node_id, set_threads
from cluster import transport
from kernels.checkpoint import Checkpoint
from kernels.engine import DTYPES, QUANT_BITS
from kernels.model import FeedForward, build, expert_prefix, load_into
from kernels.moe import expert_rows
from kernels.quant import quantize_experts


class ExpertShard:
    def __init__(self, model_dir: str, pairs: list[tuple[int, int]], dtype: str, net: transport.TransportConfig,
                 threads: int = 0, quant: str = "none"):
        set_threads(threads)
        ckpt = Checkpoint.open(model_dir)
        a = ckpt.args
        self.dim, self.dtype = a.dim, DTYPES[dtype]
        self.experts = {(l, e): load_into(build(FeedForward, a.dim, a.hidden_dim), ckpt, expert_prefix(a, l, e), self.dtype)
                        for l, e in pairs}
        if QUANT_BITS[quant]:
            quantize_experts(self.experts, QUANT_BITS[quant])
        self.busy_s = 0.0
        self.server = transport.serve(net, experts=self.forward)

    def forward(self, layer: int, blocks: list[tuple[int, int]], rows: torch.Tensor) -> torch.Tensor:
        """rows [R, D]: for each (expert, n) in blocks, the next n rows are that expert's."""
        if rows.shape[1] != self.dim:
            raise ValueError(f"rows have dim {rows.shape[1]}, the model has {self.dim}")
        missing = [e for e, _ in blocks if (layer, e) not in self.experts]
        if missing:
            raise KeyError(f"experts {missing} of layer {layer} are not on this shard")
        starts, at = [], 0
        for e, n in blocks:
            starts.append((e, at, n))
            at += n
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = expert_rows(rows.to(self.dtype), starts, {e: self.experts[(layer, e)] for e, _ in blocks})
        self.busy_s += time.perf_counter() - t0
        return out

    # -- control plane (Ray calls) -------------------------------------------------------------
    def address(self) -> str:
        return advertised(self.server.address)

    def info(self) -> dict:
        return {"node_id": node_id(), "pid": os.getpid(), "pairs": sorted(self.experts), "busy_s": self.busy_s,
                "param_bytes": sum(t.numel() * t.element_size() for m in self.experts.values()
                                   for t in [*m.parameters(), *m.buffers()])}  # quantized weights are buffers
