"""Router: owns one pipeline replica's batch. The same Engine as the single-process one (scheduling,
KV block tables, sampling, stops) with a PipelineExecutor that runs the same Transformer.forward, its
layers a stand-in that calls the replica's attention actors, each once per step for its range of layers:

    h = embed(tokens)                                     # here; h [T, D], one row per token
    for each attention actor (in layer order):
        h, report = actor.forward(step, seqs, h)          # its layers: attention, MoE router stage, experts
    logits = output(norm(h))                             # here, only for rows being sampled

Per decode step the critical path is one round trip per attention actor plus, inside each, one expert
fan-out per layer. The actors' reports carry what they routed (the expert scaler's signal, windowed here)
and their data-plane counts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import ray
import torch

from actors.common import Peers, node_id, set_threads
from actors.expert_calls import FATAL
from cluster.dataplane import transport
from cluster.loop import EngineLoop
from cluster.placement import Placement
from kernels.build import Holds, build_role
from kernels.cache import StepSeq
from kernels.checkpoint import Checkpoint
from kernels.engine import CacheLost, Engine, EngineConfig, Request, load_tokenizer
from kernels.sampling import SamplingParams

if TYPE_CHECKING:
    from actors.workers import Workers

log = logging.getLogger(__name__)


Pair = tuple[int, int]  # (layer, expert)
MAX_FAILED_STEPS = 3  # attention failures in a row before the step's requests fail
COUNTS = ("calls", "round_trips", "retries", "recoveries", "collective_calls")  # summed over the actors' reports


@dataclass
class RemoteStep:
    """What the layers stand-in needs of a step (the `step` Transformer.forward hands it): its number and
    its sequences."""

    number: int
    seqs: list[StepSeq]


class PipelineExecutor:
    """Runs kernels.model's Transformer with its layers a stand-in, `_layers`, that calls each attention
    actor once per step; the model here holds only the embeddings, final norm and LM head. The router's
    weights and the step's hidden states are on engine.device; tensors leave through the transport (which
    copies them to the host) and what comes back, on CPU, is moved to the device. `peers` makes the clients
    (over the collective group for the workers in it) and finds a restarted attention actor again;
    `recovered(i)`, if given, is told when attention actor i serves again after a restart (the router gives
    it again what it was given after construction)."""

    def __init__(self, ckpt: Checkpoint, engine: EngineConfig, placement: Placement, peers: Peers,
                 attention_addresses: list[str], window_s: float = 10.0,
                 recovered: Callable[[int], None] | None = None):
        self.args = ckpt.args
        built = build_role(ckpt, engine, Holds(layers_stand_in=self._layers))
        self.model, self.device = built.model, built.device
        self.peers, self.recovered = peers, recovered
        # (first layer, layers, client) of each attention actor, in layer order
        self.attention = [(layers[0], list(layers), peers.client(addr))
                          for layers, addr in zip(placement.attention, attention_addresses, strict=True)]
        self.acked = [0] * len(self.attention)  # each actor's expert placement version in use
        self._busy = threading.Lock()  # held by forward
        self.step = 0
        self.tokens_per_expert: dict[Pair, int] = defaultdict(int)  # cumulative; the rate below is the scaling signal
        self.window_s = window_s
        self._window: deque[tuple[float, dict[Pair, int]]] = deque()  # (time, rows per pair) of each step
        self._window_lock = threading.Lock()
        self._step_counts: dict[Pair, int] = defaultdict(int)
        # data-plane counts, the router's attention calls and the actors' expert calls, of the step running or
        # last run and of all steps; round trips are sequential waits (a fan-out waited for together counts once)
        self.last: dict[str, int] = dict.fromkeys(COUNTS, 0)
        self.totals: dict[str, int] = dict.fromkeys(COUNTS, 0)
        self.collective_peers = [0] * len(self.attention)  # expert shards each actor reaches over the group
        self.micro_batches = self.micro_batched = 0  # of the step running or last run; summed over all steps
        self._failed_steps = 0  # steps in a row lost to attention failures
        self.seconds = {"layers": 0.0, "total": 0.0}

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

    def collective_calls(self) -> tuple[int, int]:
        """(calls whose tensors went over the collective group, pairs still using it): the router's with its
        attention actors, and theirs with the expert shards."""
        calls, peers = self.peers.collective_calls()
        return calls + self.totals["collective_calls"], peers + sum(self.collective_peers)

    # -- the step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, seqs: list[StepSeq], logits_index: torch.Tensor) -> torch.Tensor:
        with self._busy:
            self._step_counts = defaultdict(int)
            self.last, self.micro_batches = dict.fromkeys(COUNTS, 0), 0
            try:
                t0 = time.perf_counter()
                self.step += 1
                logits = self.model(tokens.to(self.device), RemoteStep(self.step, seqs), logits_index.to(self.device))
                self.seconds["total"] += time.perf_counter() - t0
                self._failed_steps = 0
                return logits
            finally:
                for k, n in self.last.items():
                    self.totals[k] += n
                self.micro_batched += self.micro_batches
                now = time.monotonic()
                with self._window_lock:
                    self._window.append((now, self._step_counts))
                    while self._window[0][0] < now - self.window_s:
                        self._window.popleft()

    def _layers(self, h: torch.Tensor, step: RemoteStep) -> torch.Tensor:
        """The layers seam: h [T, D] embedded -> [T, D] after the last layer, through each attention actor."""
        t = time.perf_counter()
        for i, (first, layers, actor) in enumerate(self.attention):
            self.last["calls"] += 1
            self.last["round_trips"] += 1
            try:
                h, report = actor.attention(step.number, first, step.seqs, h).result()
            except transport.TransportError as err:
                raise self._attention_failed(i, err) from err
            self._count(i, layers, report)
            h = h.to(self.device)  # [T, D]
        self.seconds["layers"] += time.perf_counter() - t
        return h

    def _count(self, i: int, layers: list[int], report: dict) -> None:
        """Adds attention actor i's report of a step to the router's counts."""
        experts = max(self.args.num_experts, 1)
        for j, n in enumerate(report["expert_rows"]):
            if n:
                pair = (layers[j // experts], j % experts)
                self.tokens_per_expert[pair] += n
                self._step_counts[pair] += n
        for k in COUNTS:
            self.last[k] += report[k]
        self.acked[i] = max(self.acked[i], report["placement_version"])  # a late reply never lowers an ack
        self.micro_batches = report["micro_batches"]  # the same for every actor: they split the same sequences
        self.collective_peers[i] = report["collective_peers"]

    def _attention_failed(self, i: int, err: transport.TransportError) -> Exception:
        """What a failed attention call raises: CacheLost once the actor serves again (restarted by Ray,
        its KV cache empty, or just slow: recomputing is right either way), so the engine recomputes the
        running sequences' caches; the error itself when it is not transient, not ours, or keeps failing."""
        first, layers, actor = self.attention[i]
        self._failed_steps += 1
        if err.code in FATAL or actor.address not in self.peers.handles or self._failed_steps > MAX_FAILED_STEPS:
            return err
        log.warning("attention call to %s failed (%s); recomputing the KV cache once it serves",
                    actor.address, err.code)
        new = self.peers.recover(actor)
        self.attention[i] = (first, layers, new)
        if new is not actor:
            self.collective_peers[i] = 0  # a restarted actor is in no group
            if self.recovered is not None:
                self.recovered(i)
        return CacheLost(f"attention actor {actor.address} failed ({err.code})")


def router_name() -> str:
    return f"router-{uuid.uuid4().hex[:12]}"


class Router:
    """One pipeline replica's engine: submit requests, stream their tokens. A Ray actor (Pipeline) or the
    base of a Serve replica (`moeray serve`). It keeps its workers serving: a lost attention actor or
    base expert shard is restarted by Ray (started with max_restarts), and the executor (for attention
    actors) or the attention actors (for shards) find it again. Its config is the one its workers run with
    (workers.config: the data plane carries the deployment's token). With a `pool` (the ExpertPool its
    shards belong to: a Ray actor or Serve deployment handle) and scaling enabled it reports its routing load
    there every scaling.interval_s and hands the pool's placement tables to its attention actors."""

    def __init__(self, workers: Workers, pool=None, table: tuple[int, dict[str, list[str]]] = (0, {}),
                 name: str | None = None):
        config = workers.config
        pc = config.pipeline
        set_threads(pc.router.threads)
        ckpt = Checkpoint.open(config.model)
        self.name = name or router_name()  # how the pool knows this router
        self._attention, self._experts = list(workers.attention), list(workers.experts)  # Ray handles
        self.base = {f"{l}:{e}": len(holders) for (l, e), holders in workers.placement.actors_of().items()}
        self.placement: tuple[int, dict[str, list[str]]] = (0, {})  # the latest table of extra expert replicas
        self._placement_lock = threading.Lock()
        peers = Peers(pc.transport, dict(zip(workers.attention_addresses, workers.attention, strict=True)),
                      pc.restart_timeout_s)
        self._join_group(pc.transport, workers, peers)
        self.executor = PipelineExecutor(ckpt, config.engine, workers.placement, peers, workers.attention_addresses,
                                         config.scaling.window_s, self._restarted)
        self.engine = Engine(self.executor, ckpt.args, load_tokenizer(config.model), config.engine)
        self.loop = EngineLoop(self.engine)
        self.update_placement(*table)
        self.pool, self._stop = pool, threading.Event()
        if pool is not None and config.scaling.enabled:
            threading.Thread(target=self._report, args=(config.scaling.interval_s,), name="pool-report",
                             daemon=True).start()

    def _report(self, interval_s: float) -> None:
        """Every interval_s: this router's windowed routing load and acknowledged table to the pool, whose
        latest table comes back and goes to the attention actors."""
        from actors.pool import call

        while not self._stop.wait(interval_s):
            rates = {f"{l}:{e}": r for (l, e), r in self.executor.expert_rates().items()}
            try:
                version, table = call(self.pool, "report", self.name, rates, min(self.executor.acked))
                self.update_placement(version, table)
            except Exception as e:  # the pool restarting, Ray busy: the next report retries
                log.warning("report to the expert pool failed (%s: %s)", type(e).__name__, e)

    @staticmethod
    def _join_group(transport_config: transport.TransportConfig, workers: Workers, peers: Peers) -> None:
        """Transport kinds gloo and nccl: this replica's collective group, the router rank 0 and its workers
        1..N in Workers' order (attention actors, then expert shards unless they are a shared pool: a shard
        serves one group). The router calls its attention actors over it, and they the expert shards. The
        rendezvous is a free port on this node. A worker that does not join is called over the wire, and so
        is every worker when the group cannot form."""
        if not transport.is_collective(transport_config):
            return
        own = ([], []) if workers.shared else (workers.experts, workers.expert_addresses)  # a pool joins no one's
        handles, addresses = workers.attention + own[0], workers.attention_addresses + own[1]
        world = len(handles) + 1
        store, rendezvous = transport.rendezvous(transport_config, ray.util.get_node_ip_address(), world)
        joins = [h.join_group.remote(rendezvous, world, rank) for rank, h in enumerate(handles, 1)]
        try:
            group = transport.join(transport_config, store, world, transport.CALLER)
        except Exception as e:  # the workers' joins time out on their own
            log.warning("collective group (%s, %d ranks) did not form (%s): the data plane stays on the wire",
                        transport_config.kind, world, e)
            return
        ranks = {}
        for rank, (address, ref) in enumerate(zip(addresses, joins, strict=True), 1):
            try:
                ray.get(ref, timeout=transport_config.timeout_s)
                ranks[address] = rank
            except Exception as e:
                log.warning("worker %s did not join the collective group (%s): calling it over the wire", address, e)
                group.break_pair(rank)
        peers.use_group(group, {a: r for a, r in ranks.items() if a in workers.attention_addresses})
        shards = {a: r for a, r in ranks.items() if a in workers.expert_addresses}
        ray.get([h.use_group.remote(shards) for h in workers.attention])

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        """Streams TokenEvents (call with num_returns="streaming"); cancelling the stream aborts the request."""
        async for event in self.loop.generate(Request(request_id, prompt_ids, params)):
            yield event

    def update_placement(self, version: int, table: dict[str, list[str]]) -> None:
        """A new table of extra expert replicas {"layer:expert": [addresses]} for every attention actor;
        returns once each has it in use (after the step it runs, if any): stats()["placement_version"]."""
        with self._placement_lock:
            if version <= self.placement[0]:
                return
            self.placement = (version, table)
            acks = ray.get([a.update_placement.remote(version, table) for a in self._attention])
            self.executor.acked = [max(x, y) for x, y in zip(self.executor.acked, acks, strict=True)]

    def _restarted(self, i: int) -> None:
        """Attention actor i serves again after a restart, as it was constructed: give it the expert actors'
        handles and the latest placement table."""
        ray.get(self._attention[i].watch.remote(self._experts))
        with self._placement_lock:
            version, table = self.placement
            if version:
                self.executor.acked[i] = ray.get(self._attention[i].update_placement.remote(version, table))

    def stats(self) -> dict:
        x = self.executor
        collective_calls, collective_peers = x.collective_calls()
        return {**self.loop.stats(), "node_id": node_id(), "step": x.step, "seconds": dict(x.seconds),
                "tokens_per_expert": {f"{l}:{e}": n for (l, e), n in sorted(x.tokens_per_expert.items())},
                "expert_tokens_per_s": {f"{l}:{e}": r for (l, e), r in sorted(x.expert_rates().items())},
                "expert_replicas": self.replica_counts(),
                "placement_version": min(x.acked), "expert_retries": x.totals["retries"],
                "worker_recoveries": x.totals["recoveries"] + x.peers.recoveries,
                "kv_recomputes": self.engine.recomputes,
                "collective_calls": collective_calls, "collective_peers": collective_peers,
                "data_plane": {"calls": x.totals["calls"], "round_trips": x.totals["round_trips"],
                               "micro_batches": x.micro_batched,
                               "last_step": {"calls": x.last["calls"], "round_trips": x.last["round_trips"],
                                             "micro_batches": x.micro_batches}}}

    def replica_counts(self) -> dict[str, int]:
        """Holders per "layer:expert" in the table this router's attention actors were given: base shards plus
        the pool's extra replicas."""
        extras = self.placement[1]
        return {pair: n + len(extras.get(pair, ())) for pair, n in self.base.items()}

    def stop(self) -> None:
        """Stops reporting to the pool (the engine loop and workers stop with the process)."""
        self._stop.set()

    def info(self) -> dict:
        return {"node_id": node_id(), "pid": os.getpid(), "name": self.name}
