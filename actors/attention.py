"""AttentionActor: a contiguous range of layers, their KV cache, and the MoE router stage of each (ffn_norm,
gate, dispatch to the expert shards, combine, residual). The router calls it once per step:

    hidden [T, D] of the step's tokens -> for each of its layers l:
        h = h + attention(attention_norm(h))                     # here, KV cache here
        x = ffn_norm(h); route x with the gate                   # here: rows [R, D], one per (token, chosen expert)
        one message per expert shard holding rows of l          # concurrently, then wait for all
        h = h + combine(results)                                 # here
    -> hidden [T, D] after its last layer, and the step's report (rows per expert, calls, retries, ...)

With pipeline.micro_batches 2 the step's sequences are split in two halves of about equal tokens, and the
layers run them in ping-pong (Transformer.run_layers): one half's attention while the other's experts are
away. A dense FFN is its layer's one expert: all T rows to expert 0, weight 1.
"""

from __future__ import annotations

import os
import time

import torch

from actors.common import Peers, WorkerSpec, advertised, node_id, set_threads
from actors.expert_calls import ExpertCalls
from cluster.dataplane import collective, transport
from kernels.build import Holds, build_role
from kernels.cache import KVCache, StepSeq
from kernels.checkpoint import Checkpoint
from kernels.model import Step


def split(seqs: list[StepSeq], parts: int) -> list[list[StepSeq]]:
    """The step's sequences as `parts` (1 or 2) micro-batches: two consecutive groups with new-token counts
    as equal as a cut between sequences makes them; one when there is one sequence."""
    if parts < 2 or len(seqs) < 2:
        return [seqs]
    total, acc, best = sum(s.n for s in seqs), 0, (float("inf"), 1)  # (|tokens before - after|, cut)
    for i, s in enumerate(seqs[:-1], 1):
        acc += s.n
        best = min(best, (abs(2 * acc - total), i))
    return [seqs[: best[1]], seqs[best[1]:]]


class AttentionActor:
    """Holds the model with only its layers loaded, but their experts (the rest stays on the meta device);
    their experts seams are stand-ins that call the expert shards (ExpertCalls): `pairs` {(layer, expert):
    indices into `addresses`} for this actor's layers, and the data-plane `addresses` of the placement's
    expert actors, whose Ray handles `watch` gives (to find one again after Ray restarts it)."""

    def __init__(self, spec: WorkerSpec, layers: list[int], pairs: dict[tuple[int, int], list[int]],
                 addresses: list[str], micro_batches: int = 1, restart_timeout_s: float = 300.0):
        set_threads(spec.threads)
        self.layers, self.micro_batches, self.addresses = list(layers), micro_batches, list(addresses)
        self.peers = Peers(spec.transport_config, restart_timeout_s=restart_timeout_s)
        base = {pair: [addresses[i] for i in actors] for pair, actors in pairs.items() if pair[0] in self.layers}
        self.experts = ExpertCalls(self.peers, base, overlap=micro_batches > 1)
        built = build_role(Checkpoint.open(spec.model), spec.engine, Holds(layers=layers,
                                                                           experts_stand_in=self.experts.stage))
        self.model, self.args, self.device, self.dtype = built.model, built.model.args, built.device, built.dtype
        a, e = self.args, spec.engine
        self.cache = KVCache(len(layers), e.num_blocks, e.block_size, a.n_kv_heads, a.head_dim, e.kv_dtype(self.dtype),
                             first_layer=layers[0], device=self.device)
        self.busy_s = 0.0  # time in forward, for the benchmark's breakdown
        self.server = transport.serve(spec.transport_config, attention=self.forward)

    def forward(self, step: int, layer: int, seqs: list[StepSeq], hidden: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """hidden [T, D] (one row per token of the step) into the first of this actor's layers (`layer`) ->
        (hidden [T, D] out of its last, the step's report)."""
        if layer != self.layers[0]:
            raise transport.BadRequest(f"this attention actor's layers start at {self.layers[0]}, not {layer}")
        if hidden.shape[1] != self.args.dim:
            raise transport.BadRequest(f"hidden states have dim {hidden.shape[1]}, the model has {self.args.dim}")
        x = self.experts
        with x.busy, torch.inference_mode():
            t0 = time.perf_counter()
            x.begin_step()
            recoveries, (collective_calls, _) = self.peers.recoveries, self.peers.collective_calls()
            groups = split(seqs, self.micro_batches)
            steps = [Step.begin(g, self.args, self.cache) for g in groups]
            # hidden arrives on CPU (the wire's bytes, or gloo's) or the GPU (nccl); the transport sends
            # the reply back from wherever it is
            hs = list(hidden.to(self.device, self.dtype).split([sum(s.n for s in g) for g in groups]))
            outs = self.model.run_layers(hs, steps, self.layers)
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
            self.busy_s += time.perf_counter() - t0
            e = max(self.args.num_experts, 1)
            calls_now, peers_now = self.peers.collective_calls()
            return out, {"expert_rows": [x.rows.get((l, i), 0) for l in self.layers for i in range(e)],
                         "calls": x.calls, "round_trips": x.round_trips, "retries": x.retries,
                         "recoveries": self.peers.recoveries - recoveries, "placement_version": x.placement_version,
                         "collective_calls": calls_now - collective_calls, "collective_peers": peers_now,
                         "micro_batches": len(groups)}

    # -- control plane (Ray calls) -------------------------------------------------------------
    def address(self) -> str:
        return advertised(self.server.address)

    def join_group(self, rendezvous: str, world_size: int, rank: int) -> None:
        """Join the router's collective group (transport kinds gloo, nccl) as `rank`: blocks until it has
        formed, while the data-plane server keeps answering gRPC on its own threads."""
        self.server.join(rendezvous, world_size, rank)

    def watch(self, handles: list) -> None:
        """The Ray handles of the expert actors at the constructor's addresses, in their order: a shard that
        fails is then waited for while Ray restarts it. (Not constructor arguments: Ray could not restart
        an actor whose arguments hold handles once they are gone.)"""
        self.peers.watch(dict(zip(self.addresses, handles, strict=True)))

    def use_group(self, ranks: dict[str, int]) -> None:
        """Call the expert shards at the addresses in `ranks` over the group joined (the others over the
        wire): before the first step."""
        group: collective.Group | None = self.server.group
        if group is not None:
            with self.experts.busy:
                self.peers.use_group(group, ranks)
                self.experts.connect()

    def update_placement(self, version: int, table: dict[str, list[str]]) -> int:
        """A new table of extra expert replicas {"layer:expert": [addresses]}; waits until it is in use (the
        step running, if any, ends first) and returns the version in use."""
        self.experts.update_placement(version, table)
        with self.experts.busy:
            self.experts.swap()
            return self.experts.placement_version

    def info(self) -> dict:
        return {"node_id": node_id(), "pid": os.getpid(), "layers": self.layers, "busy_s": self.busy_s,
                "waiting_s": self.experts.waiting_s,
                "kv_cache_bytes": self.cache.nbytes, "placement_version": self.experts.placement_version}
