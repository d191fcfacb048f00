"""AttentionActor: the attention half of a contiguous range of layers, and their KV cache."""

from __future__ import annotations

import os
import threading
import time

import torch

from actors.common import advertised, node_id, set_threads
from cluster import transport
from kernels.cache import AttentionMetadata, KVCache, StepSeq
from kernels.checkpoint import Checkpoint
from kernels.engine import DTYPES, EngineConfig, resolve_device
from kernels.model import AttentionBlock, build, load_into
from kernels.rope import rope_freqs


class AttentionActor:
    def __init__(self, model_dir: str, layers: list[int], engine: EngineConfig, net: transport.TransportConfig,
                 threads: int = 0):
        set_threads(threads)
        self.device = resolve_device(engine.device)  # before loading anything: a missing GPU fails here, clearly
        ckpt = Checkpoint.open(model_dir)
        self.args, self.config = ckpt.args, engine
        dtype = DTYPES[engine.dtype]
        self.blocks = {l: load_into(build(AttentionBlock, self.args), ckpt, f"layers.{l}.", dtype, device=self.device)
                       for l in layers}
        a = self.args
        self.cache = KVCache(len(layers), engine.num_blocks, engine.block_size, a.n_kv_heads, a.head_dim, dtype,
                             first_layer=layers[0], device=self.device)
        self.dtype = dtype
        self.step, self.meta, self.freqs = -1, None, None
        self.busy_s = 0.0  # compute time, for the benchmark's breakdown
        self._lock = threading.Lock()
        self.server = transport.serve(net, attention=self.forward)

    def forward(self, step: int, layer: int, seqs: list[StepSeq] | None, hidden: torch.Tensor) -> torch.Tensor:
        if layer not in self.blocks:
            raise transport.BadRequest(f"layer {layer} is not on this attention actor (it has {sorted(self.blocks)})")
        if hidden.shape[1] != self.args.dim:
            raise transport.BadRequest(f"hidden states have dim {hidden.shape[1]}, the model has {self.args.dim}")
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            if seqs is not None:  # the first of this actor's layers in a step carries the step's block tables
                meta = AttentionMetadata.build(seqs, self.config.block_size, self.args.sliding_window)
                self.meta = meta.to(self.device)
                self.freqs = rope_freqs(self.meta.positions, self.args.head_dim, self.args.rope_theta)
                self.step = step
            elif step != self.step:
                raise transport.BadRequest(f"step {step} sent no block tables (this actor last saw step {self.step})")
            if hidden.shape[0] != self.meta.positions.shape[0]:
                raise transport.BadRequest(f"{hidden.shape[0]} hidden rows for a step of "
                                           f"{self.meta.positions.shape[0]} tokens")
            # hidden arrives on CPU (the wire's bytes, or gloo's) or the GPU (nccl); the transport sends
            # the reply back from wherever it is
            x = hidden.to(self.device, self.dtype)
            out = self.blocks[layer](x, self.freqs, self.cache.layer(layer), self.meta)
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
        return {"node_id": node_id(), "pid": os.getpid(), "layers": sorted(self.blocks), "busy_s": self.busy_s,
                "kv_cache_bytes": self.cache.nbytes}
