"""AttentionActor: the attention half of a contiguous range of layers, and their KV cache."""

from __future__ import annotations

import os
import threading
import time

import torch

from actors.common import WorkerSpec, advertised, node_id, set_threads
from cluster.dataplane import transport
from kernels.build import Holds, build_role
from kernels.cache import KVCache, StepSeq
from kernels.checkpoint import Checkpoint
from kernels.model import Step


class AttentionActor:
    """Holds the model with only its layers' attention weights loaded (the rest stays on the meta device)
    and runs TransformerBlock.attend, the attention half of the single-process forward, for the router."""

    def __init__(self, spec: WorkerSpec, layers: list[int]):
        set_threads(spec.threads)
        built = build_role(Checkpoint.open(spec.model), spec.engine, Holds(attention=layers))
        self.model, self.args, self.device, self.dtype = built.model, built.model.args, built.device, built.dtype
        self.layers, a, e = list(layers), self.args, spec.engine
        self.cache = KVCache(len(layers), e.num_blocks, e.block_size, a.n_kv_heads, a.head_dim, self.dtype,
                             first_layer=layers[0], device=self.device)
        self.step, self.current = -1, None  # the step being run, and its Step (metadata, RoPE, cache)
        self.busy_s = 0.0  # compute time, for the benchmark's breakdown
        self._lock = threading.Lock()
        self.server = transport.serve(spec.transport_config, attention=self.forward)

    def forward(self, step: int, layer: int, seqs: list[StepSeq] | None, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, D] (one row per token of the step) -> hidden + attention(attention_norm(hidden)) [T, D]."""
        if layer not in self.layers:
            raise transport.BadRequest(f"layer {layer} is not on this attention actor (it has {self.layers})")
        if hidden.shape[1] != self.args.dim:
            raise transport.BadRequest(f"hidden states have dim {hidden.shape[1]}, the model has {self.args.dim}")
        with self._lock, torch.inference_mode():
            t0 = time.perf_counter()
            if seqs is not None:  # the first of this actor's layers in a step carries the step's block tables
                self.current, self.step = Step.begin(seqs, self.args, self.cache), step
            elif step != self.step:
                raise transport.BadRequest(f"step {step} sent no block tables (this actor last saw step {self.step})")
            if hidden.shape[0] != self.current.meta.positions.shape[0]:
                raise transport.BadRequest(f"{hidden.shape[0]} hidden rows for a step of "
                                           f"{self.current.meta.positions.shape[0]} tokens")
            # hidden arrives on CPU (the wire's bytes, or gloo's) or the GPU (nccl); the transport sends
            # the reply back from wherever it is
            out = self.model.layers[layer].attend(hidden.to(self.device, self.dtype), self.current)
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
        return {"node_id": node_id(), "pid": os.getpid(), "layers": self.layers, "busy_s": self.busy_s,
                "kv_cache_bytes": self.cache.nbytes}
