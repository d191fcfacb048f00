"""Router: owns one pipeline replica's batch. The same Engine as the single-process one (scheduling,
KV block tables, sampling, stops) with a PipelineExecutor that runs the same Transformer.forward, its
layers' two seams filled with stand-ins that call the replica's workers:

    h = embed(tokens)                                     # here; h [T, D], one row per token
    for each layer l:
        h = attention_actor(l).forward(h)                 # h + attention(attention_norm(h)), KV cache there
        x = ffn_norm(h); route x with the gate            # here: rows [R, D], one per (token, chosen expert)
        one message per expert actor holding rows for l  # concurrently, then wait for all
        h = h + combine(results)                          # here: rows back to tokens [T, D]
    logits = output(norm(h))                             # here, only for rows being sampled

A dense model's FFN is the layer's one expert: all T rows to expert 0, weight 1.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import ray
import torch

from actors.common import node_id, set_threads
from cluster.dataplane import collective, transport
from cluster.loop import EngineLoop
from cluster.placement import Placement
from kernels.build import Holds, build_role
from kernels.cache import StepSeq
from kernels.checkpoint import Checkpoint
from kernels.engine import CacheLost, Engine, EngineConfig, Request, load_tokenizer
from kernels.moe import Blocks
from kernels.sampling import SamplingParams

if TYPE_CHECKING:
    from actors.workers import Workers

log = logging.getLogger(__name__)


Pair = tuple[int, int]  # (layer, expert)
FATAL = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "PERMISSION_DENIED"}  # retrying can't help
MAX_FAILED_STEPS = 3  # attention failures in a row before the step's requests fail


@dataclass
class RemoteStep:
    """What the attention stand-ins need of a step (the `step` Transformer.forward hands every layer): its
    number, its sequences, and the attention actors that have its block tables already (the first call of a
    step to each actor carries them)."""

    number: int
    seqs: list[StepSeq]
    told: set[int] = field(default_factory=set)  # id() of the clients called this step


class PipelineExecutor:
    """Runs kernels.model's Transformer with every layer's seams filled by stand-ins that call workers:
    attention by `_attention` (the attention actor holding the layer), experts by `_experts` (the expert
    shards holding them). The model here holds only embeddings, ffn_norm and gates, final norm and LM head.
    `table` maps each (layer, expert) to the clients of the expert actors holding it. The expert scaler
    replaces it with `update_placement`; the new table is swapped in between steps, never within one.
    The router's weights and the step's hidden states are on engine.device; tensors leave through the
    transport (which copies them to the host) and what comes back, on CPU, is moved to the device.
    With a collective group (transport kinds gloo, nccl) the workers at the addresses in `ranks` are
    called over it; any other address (an extra replica, a restarted worker) over plain gRPC."""

    def __init__(self, ckpt: Checkpoint, engine: EngineConfig, placement: Placement,
                 transport_config: transport.TransportConfig, attention_addresses: list[str],
                 expert_addresses: list[str], window_s: float = 10.0,
                 find_restarted: Callable[[str], str | None] | None = None, group: collective.Group | None = None,
                 ranks: dict[str, int] | None = None):
        self.args = ckpt.args
        built = build_role(ckpt, engine, Holds(stand_ins=(lambda l: partial(self._attention, l),
                                                          lambda l: partial(self._experts, l))))
        self.model, self.device = built.model, built.device
        self.transport_config = transport_config
        self.group, self.ranks = group, dict(ranks or {})  # the collective group; worker address -> rank
        # address of a lost worker -> its address once Ray has restarted it (None: not ours)
        self.find_restarted = find_restarted
        self._clients: dict[str, transport.Client] = {}  # by address: one channel per peer, reused across tables
        attention = [self._client(addr) for addr in attention_addresses]
        self.attention_of = {l: attention[i] for i, layers in enumerate(placement.attention) for l in layers}
        self.base: dict[Pair, list[transport.Client]] = {  # the placement's shards: the fallback of every retry
            pair: [self._client(expert_addresses[i]) for i in actors] for pair, actors in placement.actors_of().items()}
        self.table: dict[Pair, list[transport.Client]] = dict(self.base)
        self.placement_version = 0  # the version of `table` (0: the placement's own)
        self._pending: tuple[int, dict[Pair, list[str]]] | None = None
        self._busy = threading.Lock()  # held by forward: tables are swapped only outside a step
        self.step = 0
        self.tokens_per_expert: dict[Pair, int] = defaultdict(int)  # cumulative; the rate below is the scaling signal
        self.window_s = window_s
        self._window: deque[tuple[float, dict[Pair, int]]] = deque()  # (time, rows per pair) of each step
        self._window_lock = threading.Lock()
        self._step_counts: dict[Pair, int] = defaultdict(int)
        self.retries = 0  # expert calls re-sent to another holder after a failure
        self.recoveries = 0  # workers found again after Ray restarted them
        # data-plane calls, and sequential round trips (a fan-out waited for together counts once), per step
        self.step_calls, self.step_round_trips = 0, 0  # of the step running or last run
        self.calls, self.round_trips = 0, 0  # all steps
        self._failed_steps = 0  # steps in a row lost to attention failures
        self.seconds = {"attention": 0.0, "experts": 0.0, "total": 0.0}

    def _client(self, address: str) -> transport.Client:
        if address not in self._clients:
            self._clients[address] = transport.connect(self.transport_config, address, self.group,
                                                       self.ranks.get(address))
        return self._clients[address]

    def collective_calls(self) -> tuple[int, int]:
        """(calls whose tensors went over the collective group, peers still reached over it)."""
        clients = list(self._clients.values())
        return sum(c.collective_calls for c in clients), sum(c.collective for c in clients)

    # -- placement table ---------------------------------------------------------------------------
    def update_placement(self, version: int, table: dict[str, list[str]]) -> None:
        """Queue table {"layer:expert": [addresses of extra replicas]}: each pair is served by its base shards
        plus those. It takes effect at the start of the next step, or now if no step is running. Older
        versions are ignored."""
        extras = {tuple(map(int, key.split(":"))): list(addresses) for key, addresses in table.items()}
        self._pending = (version, extras)  # one reference assignment: the step thread sees all of it or none
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
            version, extras = pending
            self.table = {pair: base + [self._client(addr) for addr in extras.get(pair, ())]
                          for pair, base in self.base.items()}
            self.placement_version = version

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
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, seqs: list[StepSeq], logits_index: torch.Tensor) -> torch.Tensor:
        with self._busy:
            self._swap()
            self._step_counts = defaultdict(int)
            self.step_calls = self.step_round_trips = 0
            try:
                t0 = time.perf_counter()
                self.step += 1
                logits = self.model(tokens.to(self.device), RemoteStep(self.step, seqs), logits_index.to(self.device))
                self.seconds["total"] += time.perf_counter() - t0
                self._failed_steps = 0
                return logits
            finally:
                self.calls += self.step_calls
                self.round_trips += self.step_round_trips
                now = time.monotonic()
                with self._window_lock:
                    self._window.append((now, self._step_counts))
                    while self._window[0][0] < now - self.window_s:
                        self._window.popleft()

    def _attention(self, layer: int, h: torch.Tensor, step: RemoteStep) -> torch.Tensor:
        """Layer `layer`'s attention seam: h [T, D] (one row per token of the step) -> h + attention(
        attention_norm(h)) [T, D], on the attention actor that holds the layer and its KV cache."""
        actor = self.attention_of[layer]
        t = time.perf_counter()
        self.step_calls += 1
        self.step_round_trips += 1
        try:
            h = actor.attention(step.number, layer, None if id(actor) in step.told else step.seqs, h).result()
        except transport.TransportError as err:
            raise self._attention_failed(actor, err) from err
        self.seconds["attention"] += time.perf_counter() - t
        step.told.add(id(actor))
        return h.to(self.device)  # [T, D]

    def _experts(self, layer: int, rows: torch.Tensor, blocks: Blocks) -> torch.Tensor:
        """Layer `layer`'s experts seam: rows [R, D], one per (token, chosen expert) in dispatch order (each
        expert's rows one block; a dense layer's: every token, expert 0) -> [R, D], each row through its
        expert. ONE message per expert actor, all in flight at once. An expert's rows are split evenly over
        its replicas. A failed call is re-sent to another actor holding the same experts (at last the base
        shard), and the failed actor leaves this router's table until the next update: a lost replica costs
        latency, not a request."""
        t = time.perf_counter()
        parts: dict[transport.Client, Blocks] = defaultdict(list)  # actor -> its blocks of `rows`
        for e, start, n in blocks:
            self.tokens_per_expert[layer, e] += n
            self._step_counts[layer, e] += n
            actors = self.table[layer, e]
            for r, actor in enumerate(actors):
                lo, hi = start + n * r // len(actors), start + n * (r + 1) // len(actors)
                if hi > lo:
                    parts[actor].append((e, lo, hi - lo))
        out = torch.empty_like(rows)  # [R, D]
        failed: set[transport.Client] = set()
        for attempt in range(4):
            pending = []
            for actor, ps in parts.items():  # send all, then wait for all
                index = torch.cat([torch.arange(s, s + m) for _, s, m in ps]).to(rows.device)  # [R_a]: its rows
                pending.append((actor, ps, index, actor.experts(layer, [(e, m) for e, _, m in ps], rows[index])))
            self.step_calls += len(pending)
            self.step_round_trips += 1  # all in flight at once, waited for together
            retry: dict[transport.Client, Blocks] = defaultdict(list)
            for actor, ps, index, p in pending:
                try:
                    out[index] = p.result().to(out.device)  # [R_a, D], in the order sent
                except transport.TransportError as err:
                    if err.code in FATAL or attempt == 3:
                        raise
                    log.warning("expert call to %s failed (%s); retrying elsewhere", actor.address, err.code)
                    failed.add(actor)
                    self._drop(actor)
                    if any(actor in base for base in self.base.values()):  # ours: wait for Ray to restart it
                        self._recover(actor)
                    for e, s, m in ps:
                        retry[self._holder(layer, e, failed)].append((e, s, m))
            if not retry:
                break
            self.retries += 1
            parts = retry
        self.seconds["experts"] += time.perf_counter() - t
        return out

    def _holder(self, layer: int, e: int, failed: set[transport.Client]) -> transport.Client:
        """Another actor holding (layer, e): a live replica from the table, else a base shard."""
        for actor in [*self.table[layer, e], *self.base[layer, e]]:
            if actor not in failed:
                return actor
        return self.base[layer, e][0]  # every holder failed once: try the base shard again

    def _attention_failed(self, actor: transport.Client, err: transport.TransportError) -> Exception:
        """What a failed attention call raises: CacheLost once the actor serves again (restarted by Ray,
        its KV cache empty, or just slow: recomputing is right either way), so the engine recomputes the
        running sequences' caches; the error itself when it is not transient, not ours, or keeps failing."""
        self._failed_steps += 1
        if err.code in FATAL or self.find_restarted is None or self._failed_steps > MAX_FAILED_STEPS:
            return err
        log.warning("attention call to %s failed (%s); recomputing the KV cache once it serves",
                    actor.address, err.code)
        self._recover(actor)
        return CacheLost(f"attention actor {actor.address} failed ({err.code})")

    def _recover(self, actor: transport.Client) -> None:
        """Waits until the worker that served at actor.address serves again (Ray restarts a lost one: a new
        process on a new port) and puts its new client wherever the old one was. TransportError if it can't."""
        address = self.find_restarted(actor.address) if self.find_restarted else None
        if address is None:
            raise transport.TransportError("UNAVAILABLE", f"{actor.address}: lost, and no one restarts it")
        if address == actor.address:
            return
        new = self._client(address)
        swap = lambda clients: [new if c is actor else c for c in clients]  # noqa: E731
        self.base = {pair: swap(cs) for pair, cs in self.base.items()}
        self.table = {pair: swap(cs) for pair, cs in self.table.items()}
        self.attention_of = {l: new if c is actor else c for l, c in self.attention_of.items()}
        self._clients.pop(actor.address).close()
        self.recoveries += 1
        log.warning("worker %s serves again at %s", actor.address, address)

    def _drop(self, actor: transport.Client) -> None:
        """Stop sending to `actor` until the next table update; a pair left with no holder gets its base shards."""
        self.table = {pair: [a for a in actors if a is not actor] or self.base[pair]
                      for pair, actors in self.table.items()}


class Router:
    """One pipeline replica's engine: submit requests, stream their tokens. A Ray actor (Pipeline) or the
    base of a Serve replica (`moeray serve`). It keeps its workers serving: a lost attention actor or
    base expert shard is restarted by Ray (started with max_restarts), and the executor finds it again
    here. With scaling enabled it runs the expert scaler in-process, on its own routing load. Its config is
    the one its workers run with (workers.config: the data plane carries the replica's token)."""

    def __init__(self, workers: Workers):
        config = workers.config
        pc = config.pipeline
        set_threads(pc.router.threads)
        ckpt = Checkpoint.open(config.model)
        self.restart_timeout_s = pc.restart_timeout_s
        self._workers = dict(zip(workers.attention_addresses + workers.expert_addresses,
                                 workers.attention + workers.experts, strict=True))
        group, ranks = self._join_group(pc.transport, workers)
        self.executor = PipelineExecutor(ckpt, config.engine, workers.placement, pc.transport,
                                         workers.attention_addresses, workers.expert_addresses,
                                         config.scaling.window_s, self._find_restarted, group, ranks)
        self.engine = Engine(self.executor, ckpt.args, load_tokenizer(config.model), config.engine)
        self.loop = EngineLoop(self.engine)
        self.scaler = None
        if config.scaling.enabled:
            from actors.scaler import ExpertScaler

            self.scaler = ExpertScaler(config, self, workers.placement)

    @staticmethod
    def _join_group(transport_config: transport.TransportConfig,
                    workers: Workers) -> tuple[collective.Group | None, dict[str, int]]:
        """Transport kinds gloo and nccl: this replica's collective group, the router rank 0 and its workers
        1..N in Workers' order (attention actors, then expert shards); (group, {worker address: rank}).
        The rendezvous is a free port on this node. A worker that does not join is called over gRPC, and
        so is every worker when the group cannot form. kind grpc: (None, {})."""
        if not transport.is_collective(transport_config):
            return None, {}
        handles = workers.attention + workers.experts
        addresses = workers.attention_addresses + workers.expert_addresses
        world = len(handles) + 1
        store, rendezvous = transport.rendezvous(transport_config, ray.util.get_node_ip_address(), world)
        joins = [h.join_group.remote(rendezvous, world, rank) for rank, h in enumerate(handles, 1)]
        try:
            group = transport.join(transport_config, store, world, transport.CALLER)
        except Exception as e:  # the workers' joins time out on their own
            log.warning("collective group (%s, %d ranks) did not form (%s): the data plane stays on gRPC",
                        transport_config.kind, world, e)
            return None, {}
        ranks = {}
        for rank, (address, ref) in enumerate(zip(addresses, joins, strict=True), 1):
            try:
                ray.get(ref, timeout=transport_config.timeout_s)
                ranks[address] = rank
            except Exception as e:
                log.warning("worker %s did not join the collective group (%s): calling it over gRPC", address, e)
                group.break_pair(rank)
        return group, ranks

    def _find_restarted(self, address: str) -> str | None:
        """The current address of the worker that served at `address`, waiting while Ray restarts it."""
        handle = self._workers.get(address)
        if handle is None:
            return None  # not one of ours (an extra replica: the scaler replaces those)
        deadline = time.monotonic() + self.restart_timeout_s
        while True:
            try:
                new = ray.get(handle.address.remote(), timeout=max(deadline - time.monotonic(), 0.01))
                break
            except ray.exceptions.ActorUnavailableError:  # restarting: calls are refused, not queued, meanwhile
                if time.monotonic() > deadline:
                    raise transport.TransportError("UNAVAILABLE", f"{address}: still restarting after "
                                                   f"{self.restart_timeout_s:.0f}s") from None
                time.sleep(0.2)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                raise transport.TransportError(
                    "UNAVAILABLE", f"{address}: not serving again within {self.restart_timeout_s:.0f}s: {e}") from e
        self._workers[new] = self._workers.pop(address)
        return new

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams):
        """Streams TokenEvents (call with num_returns="streaming"); cancelling the stream aborts the request."""
        async for event in self.loop.generate(Request(request_id, prompt_ids, params)):
            yield event

    def update_placement(self, version: int, table: dict[str, list[str]]) -> None:
        """A new table of extra replicas {"layer:expert": [addresses]}; stats()["placement_version"]
        acknowledges it once no step can use the old one."""
        self.executor.update_placement(version, table)

    def stats(self) -> dict:
        x = self.executor
        x.try_swap()  # an idle router acknowledges a pending table here
        collective_calls, collective_peers = x.collective_calls()
        return {**self.loop.stats(), "node_id": node_id(), "step": x.step, "seconds": dict(x.seconds),
                "tokens_per_expert": {f"{l}:{e}": n for (l, e), n in sorted(x.tokens_per_expert.items())},
                "expert_tokens_per_s": {f"{l}:{e}": r for (l, e), r in sorted(x.expert_rates().items())},
                "expert_replicas": self.scaler.replica_counts() if self.scaler else {},
                "placement_version": x.placement_version, "expert_retries": x.retries,
                "worker_recoveries": x.recoveries, "kv_recomputes": self.engine.recomputes,
                "collective_calls": collective_calls, "collective_peers": collective_peers,
                "data_plane": {"calls": x.calls, "round_trips": x.round_trips,
                               "last_step": {"calls": x.step_calls, "round_trips": x.step_round_trips}}}

    def scaler_status(self) -> dict | None:
        """The expert scaler's view (replicas and targets per pair, pending ones, events); None when off."""
        return self.scaler.status() if self.scaler else None

    def scaler_replicas(self, pair: str) -> list:
        """Actor handles of `pair`'s ready extra replicas (for operators and tests)."""
        return self.scaler.handles(pair) if self.scaler else []

    def info(self) -> dict:
        return {"node_id": node_id(), "pid": os.getpid()}
