"""Router: owns one pipeline replica's batch. The same Engine as the single-process one (scheduling,
KV block tables, sampling, stops) with a PipelineExecutor that runs each layer across actors:

    h = embed(tokens)
    for each layer l:
        h = attention_actor(l).forward(h)                 # h + attention(attention_norm(h)), KV cache there
        x = ffn_norm(h); route x with the gate            # here
        one message per expert actor holding rows for l  # concurrently, then wait for all
        h = h + combine(results)                          # here
    logits = output(norm(h))                             # here, only for rows being sampled
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch

from actors.common import node_id, set_threads
from cluster import transport
from cluster.loop import EngineLoop
from cluster.placement import Placement
from kernels.cache import StepSeq
from kernels.checkpoint import Checkpoint
from kernels.engine import DTYPES, Engine, EngineConfig, Request, load_tokenizer
from kernels.model import RouterPart, build, load_into
from kernels.moe import Blocks, moe
from kernels.sampling import SamplingParams


class PipelineExecutor:
    def __init__(self, ckpt: Checkpoint, engine: EngineConfig, placement: Placement, net: transport.TransportConfig,
                 attention_addresses: list[str], expert_addresses: list[str]):
        self.args = a = ckpt.args
        self.part = load_into(build(RouterPart, a), ckpt, dtype=DTYPES[engine.dtype])
        attention = [transport.connect(net, addr) for addr in attention_addresses]
        self.attention_of = {l: attention[i] for i, layers in enumerate(placement.attention) for l in layers}
        self.experts = [transport.connect(net, addr) for addr in expert_addresses]
        self.actors_of = placement.actors_of()
        self.step = 0
        self.tokens_per_expert: dict[tuple[int, int], int] = defaultdict(int)  # the load signal for scaling
        self.seconds = {"attention": 0.0, "experts": 0.0, "total": 0.0}

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, seqs: list[StepSeq], logits_index: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        self.step += 1
        h = self.part.tok_embeddings(tokens)  # [T, D]
        told = set()  # attention actors that already have this step's block tables
        for l, layer in enumerate(self.part.layers):
            actor = self.attention_of[l]
            t = time.perf_counter()
            h = actor.attention(self.step, l, None if id(actor) in told else seqs, h).result()
            self.seconds["attention"] += time.perf_counter() - t
            told.add(id(actor))
            x = layer.ffn_norm(h)
            if self.args.moe:
                h = h + moe(x, layer.feed_forward.gate.weight, self.args.moe.num_experts_per_tok,
                            lambda rows, blocks: self._experts(l, rows, blocks))
            else:  # dense: the layer's FFN is its one expert, with weight 1
                h = h + self._experts(l, x, [(0, 0, x.shape[0])])
        logits = self.part.output(self.part.norm(h[logits_index])).float()  # [S, V]
        self.seconds["total"] += time.perf_counter() - t0
        return logits

    def _experts(self, layer: int, rows: torch.Tensor, blocks: Blocks) -> torch.Tensor:
        """Runs the experts of `blocks` on their rows: ONE message per expert actor, all in flight at once.
        An expert's rows are split evenly over its replicas."""
        t = time.perf_counter()
        parts: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # actor -> (expert, first row, count)
        for e, start, n in blocks:
            self.tokens_per_expert[layer, e] += n
            actors = self.actors_of[layer, e]
            for r, actor in enumerate(actors):
                lo, hi = start + n * r // len(actors), start + n * (r + 1) // len(actors)
                if hi > lo:
                    parts[actor].append((e, lo, hi - lo))
        pending = []
        for actor, ps in parts.items():
            index = torch.cat([torch.arange(s, s + m) for _, s, m in ps])
            pending.append((ps, self.experts[actor].experts(layer, [(e, m) for e, _, m in ps], rows[index])))
        out = torch.empty_like(rows)
        for ps, p in pending:
            y, at = p.result(), 0
            for _, s, m in ps:
                out[s : s + m] = y[at : at + m]
                at += m
        self.seconds["experts"] += time.perf_counter() - t
        return out


class Router:
    """The Ray actor around one pipeline replica's engine: submit requests, stream their tokens."""

    def __init__(self, model_dir: str, engine: EngineConfig, placement: Placement, net: transport.TransportConfig,
                 attention_addresses: list[str], expert_addresses: list[str], threads: int = 0):
        set_threads(threads)
        ckpt = Checkpoint.open(model_dir)
        self.executor = PipelineExecutor(ckpt, engine, placement, net, attention_addresses, expert_addresses)
        self.loop = EngineLoop(Engine(self.executor, ckpt.args, load_tokenizer(model_dir), engine))

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        """Streams TokenEvents (call with num_returns="streaming"); cancelling the stream aborts the request."""
        async for event in self.loop.generate(Request(request_id, prompt_ids, params)):
            yield event

    def stats(self) -> dict:
        return {**self.loop.stats(), "node_id": node_id(), "step": self.executor.step,
                "seconds": dict(self.executor.seconds),
                "tokens_per_expert": {f"{l}:{e}": n for (l, e), n in sorted(self.executor.tokens_per_expert.items())}}

    def info(self) -> dict:
        return {"node_id": node_id()}
