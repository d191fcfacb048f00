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

import logging
import threading
import time
from collections import defaultdict, deque

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

log = logging.getLogger(__name__)


Pair = tuple[int, int]  # (layer, expert)


class PipelineExecutor:
    """`table` maps each (layer, expert) to the clients of the expert actors holding it. The expert scaler
    replaces it with `update_placement`; the new table is swapped in between steps, never within one."""

    def __init__(self, ckpt: Checkpoint, engine: EngineConfig, placement: Placement, net: transport.TransportConfig,
                 attention_addresses: list[str], expert_addresses: list[str], window_s: float = 10.0):
        self.args = a = ckpt.args
        self.part = load_into(build(RouterPart, a), ckpt, dtype=DTYPES[engine.dtype])
        self.net = net
        self._clients: dict[str, transport.Client] = {}  # by address: one channel per peer, reused across tables
        attention = [self._client(addr) for addr in attention_addresses]
        self.attention_of = {l: attention[i] for i, layers in enumerate(placement.attention) for l in layers}
        self.base: dict[Pair, list[transport.Client]] = {  # the placement's shards: the fallback of every retry
            pair: [self._client(expert_addresses[i]) for i in actors] for pair, actors in placement.actors_of().items()}
        self.table: dict[Pair, list[transport.Client]] = dict(self.base)
        self.placement_version = 0  # the version of `table` (0: the placement's own)
        self._pending: tuple[int, dict[Pair, list[transport.Client]]] | None = None
        self._busy = threading.Lock()  # held by forward: tables are swapped only outside a step
        self.step = 0
        self.tokens_per_expert: dict[Pair, int] = defaultdict(int)  # cumulative; the rate below is the scaling signal
        self.window_s = window_s
        self._window: deque[tuple[float, dict[Pair, int]]] = deque()  # (time, rows per pair) of each step
        self._window_lock = threading.Lock()
        self._step_counts: dict[Pair, int] = defaultdict(int)
        self.retries = 0  # expert calls re-sent to another holder after a failure
        self.seconds = {"attention": 0.0, "experts": 0.0, "total": 0.0}

    def _client(self, address: str) -> transport.Client:
        if address not in self._clients:
            self._clients[address] = transport.connect(self.net, address)
        return self._clients[address]

    # -- placement table ---------------------------------------------------------------------------
    def update_placement(self, version: int, table: dict[str, list[str]]) -> None:
        """Queue table {"layer:expert": [addresses]} (pairs it omits keep their base shards); it takes effect
        at the start of the next step, or now if no step is running. Older versions are ignored."""
        new = dict(self.base)
        for key, addresses in table.items():
            l, e = map(int, key.split(":"))
            if addresses:
                new[l, e] = [self._client(addr) for addr in addresses]
        self._pending = (version, new)  # one reference assignment: the step thread sees all of it or none
        self.try_swap()

    def try_swap(self) -> None:
        if self._busy.acquire(blocking=False):
            try:
                self._swap()
            finally:
                self._busy.release()

    def _swap(self) -> None:
        pending = self._pending
        if pending is not None and pending[0] > self.placement_version:
            self.placement_version, self.table = pending

    def expert_rates(self) -> dict[Pair, float]:
        """Token rows per second routed to each (layer, expert) over the last `window_s` seconds."""
        now = time.monotonic()
        totals: dict[Pair, int] = defaultdict(int)
        with self._window_lock:
            while self._window and self._window[0][0] < now - self.window_s:
                self._window.popleft()
            for _, counts in self._window:
                for pair, n in counts.items():
                    totals[pair] += n
        return {pair: n / self.window_s for pair, n in totals.items()}

    # -- the step ----------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, seqs: list[StepSeq], logits_index: torch.Tensor) -> torch.Tensor:
        with self._busy:
            self._swap()
            self._step_counts = defaultdict(int)
            try:
                return self._forward(tokens, seqs, logits_index)
            finally:
                now = time.monotonic()
                with self._window_lock:
                    self._window.append((now, self._step_counts))
                    while self._window[0][0] < now - self.window_s:
                        self._window.popleft()

    @torch.inference_mode()
    def _forward(self, tokens: torch.Tensor, seqs: list[StepSeq], logits_index: torch.Tensor) -> torch.Tensor:
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
        An expert's rows are split evenly over its replicas. A failed call is re-sent to another actor
        holding the same experts (at last the base shard), and the failed actor leaves this router's
        table until the next update: a lost replica costs latency, not a request."""
        t = time.perf_counter()
        parts: dict[transport.Client, list[tuple[int, int, int]]] = defaultdict(list)  # actor -> (expert, row, count)
        for e, start, n in blocks:
            self.tokens_per_expert[layer, e] += n
            self._step_counts[layer, e] += n
            actors = self.table[layer, e]
            for r, actor in enumerate(actors):
                lo, hi = start + n * r // len(actors), start + n * (r + 1) // len(actors)
                if hi > lo:
                    parts[actor].append((e, lo, hi - lo))
        out = torch.empty_like(rows)
        failed: set[transport.Client] = set()
        for attempt in range(4):
            pending = [(actor, ps, self._send(actor, layer, ps, rows)) for actor, ps in parts.items()]
            retry: dict[transport.Client, list[tuple[int, int, int]]] = defaultdict(list)
            for actor, ps, p in pending:
                try:
                    y = p.result()
                except transport.TransportError as err:
                    if err.code == "INVALID_ARGUMENT" or attempt == 3:
                        raise
                    log.warning("expert call to %s failed (%s); retrying elsewhere", actor.address, err.code)
                    failed.add(actor)
                    self._drop(actor)
                    for e, s, m in ps:
                        retry[self._holder(layer, e, failed)].append((e, s, m))
                    continue
                at = 0
                for _, s, m in ps:
                    out[s : s + m] = y[at : at + m]
                    at += m
            if not retry:
                break
            self.retries += 1
            parts = retry
        self.seconds["experts"] += time.perf_counter() - t
        return out

    @staticmethod
    def _send(actor: transport.Client, layer: int, ps: list[tuple[int, int, int]], rows: torch.Tensor):
        index = torch.cat([torch.arange(s, s + m) for _, s, m in ps])
        return actor.experts(layer, [(e, m) for e, _, m in ps], rows[index])

    def _holder(self, layer: int, e: int, failed: set[transport.Client]) -> transport.Client:
        """Another actor holding (layer, e): a live replica from the table, else a base shard."""
        for actor in [*self.table[layer, e], *self.base[layer, e]]:
            if actor not in failed:
                return actor
        return self.base[layer, e][0]  # every holder failed once: try the base shard again

    def _drop(self, actor: transport.Client) -> None:
        """Stop sending to `actor` until the next table update; a pair left with no holder gets its base shards."""
        self.table = {pair: [a for a in actors if a is not actor] or self.base[pair]
                      for pair, actors in self.table.items()}


class Router:
    """The Ray actor around one pipeline replica's engine: submit requests, stream their tokens."""

    def __init__(self, model_dir: str, engine: EngineConfig, placement: Placement, net: transport.TransportConfig,
                 attention_addresses: list[str], expert_addresses: list[str], threads: int = 0, window_s: float = 10.0):
        set_threads(threads)
        ckpt = Checkpoint.open(model_dir)
        self.executor = PipelineExecutor(ckpt, engine, placement, net, attention_addresses, expert_addresses, window_s)
        self.loop = EngineLoop(Engine(self.executor, ckpt.args, load_tokenizer(model_dir), engine))

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        """Streams TokenEvents (call with num_returns="streaming"); cancelling the stream aborts the request."""
        async for event in self.loop.generate(Request(request_id, prompt_ids, params)):
            yield event

    def update_placement(self, version: int, table: dict[str, list[str]]) -> None:
        """The expert scaler's new placement table {"layer:expert": [addresses]}; stats()["placement_version"]
        acknowledges it once no step can use the old one."""
        self.executor.update_placement(version, table)

    def stats(self) -> dict:
        x = self.executor
        x.try_swap()  # an idle router acknowledges a pending table here
        return {**self.loop.stats(), "node_id": node_id(), "step": x.step, "seconds": dict(x.seconds),
                "tokens_per_expert": {f"{l}:{e}": n for (l, e), n in sorted(x.tokens_per_expert.items())},
                "expert_tokens_per_s": {f"{l}:{e}": r for (l, e), r in sorted(x.expert_rates().items())},
                "placement_version": x.placement_version, "expert_retries": x.retries}

    def info(self) -> dict:
        return {"node_id": node_id()}
