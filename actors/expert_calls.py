"""ExpertCalls: how an attention actor reaches its layers' experts. For each layer, the experts seam of
the actor's model is `stage(layer)`, a stand-in that sends ONE message per expert shard holding rows of
that layer, all in flight at once, and whose wait collects them (kernels.moe.start: the actor computes
the other micro-batch's attention meanwhile).

`table` maps each (layer, expert) to the clients of the expert actors holding it: the placement's base
shards plus the expert scaler's extra replicas, which `update_placement` swaps in between steps, never
within one. An expert's rows are split evenly over its holders. A failed call is re-sent to another
holder (at last the base shard, once Ray has restarted it), and the failed actor leaves the table until
the next update: a lost replica costs latency, not a request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

import torch

from actors.common import Peers
from cluster.dataplane import transport
from kernels.moe import Blocks, Wait

log = logging.getLogger(__name__)

Pair = tuple[int, int]  # (layer, expert)
FATAL = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "PERMISSION_DENIED"}  # retrying can't help
ATTEMPTS = 4  # sends of one fan-out's rows before the step fails


class ExpertCalls:
    def __init__(self, peers: Peers, base: dict[Pair, list[str]], overlap: bool = False):
        """`base`: the addresses of the placement's shards holding each (layer, expert). `overlap`: the caller
        computes between a fan-out's start and its wait (micro-batches), so every call leaves at once."""
        self.peers, self.overlap = peers, overlap
        self.base_addresses = base
        self.base: dict[Pair, list[transport.Client]] = {}
        self.table: dict[Pair, list[transport.Client]] = {}
        self.connect()
        self.placement_version = 0  # the version of `table` (0: the placement's own)
        self._pending: tuple[int, dict[Pair, list[str]]] | None = None
        self.busy = threading.Lock()  # held through a step by its caller: tables are swapped only outside one
        # of the step running or last run: rows routed per pair, calls, sequential waits, re-sent calls
        self.rows: dict[Pair, int] = defaultdict(int)
        self.calls = self.round_trips = self.retries = 0
        self.waiting_s = 0.0  # in all: time a step's thread waited for expert results (the benchmark's breakdown)

    def connect(self) -> None:
        """(Re)make the base clients through `peers` (after Peers.use_group), and the table from them."""
        self.base = {pair: [self.peers.client(a) for a in addresses] for pair, addresses in self.base_addresses.items()}
        self.table = dict(self.base)

    # -- placement table ---------------------------------------------------------------------------
    def update_placement(self, version: int, table: dict[str, list[str]]) -> int:
        """Queue table {"layer:expert": [addresses of extra replicas]}: each pair is served by its base shards
        plus those. It takes effect at the start of the next step, or now if no step is running. Older
        versions are ignored. Returns the version in use now."""
        extras = {tuple(map(int, key.split(":"))): list(addresses) for key, addresses in table.items()}
        self._pending = (version, extras)  # one reference assignment: the step thread sees all of it or none
        self.try_swap()
        return self.placement_version

    def try_swap(self) -> None:
        if self.busy.acquire(blocking=False):
            try:
                self.swap()
            finally:
                self.busy.release()

    def swap(self) -> None:
        """Take a pending table (the caller holds `busy`)."""
        pending = self._pending
        if pending is not None and pending[0] > self.placement_version:
            version, extras = pending
            self.table = {pair: base + [self.peers.client(addr) for addr in extras.get(pair, ())]
                          for pair, base in self.base.items()}
            self.placement_version = version

    def begin_step(self) -> None:
        """Swap in a pending table and zero the step's counters (the caller holds `busy`)."""
        self.swap()
        self.rows = defaultdict(int)
        self.calls = self.round_trips = self.retries = 0

    # -- the calls ---------------------------------------------------------------------------------
    def stage(self, layer: int) -> Stage:
        return Stage(self, layer)

    def start(self, layer: int, rows: torch.Tensor, blocks: Blocks) -> Wait:
        """Sends rows [R, D] (each expert's a block, in dispatch order; a dense layer's: every token, expert 0)
        to the actors holding their experts, one message per actor; the Wait returns [R, D], each row through
        its expert, re-sending failed calls elsewhere."""
        parts: dict[transport.Client, Blocks] = defaultdict(list)  # actor -> its blocks of `rows`
        for e, first, n in blocks:
            self.rows[layer, e] += n
            actors = self.table[layer, e]
            for r, actor in enumerate(actors):
                lo, hi = first + n * r // len(actors), first + n * (r + 1) // len(actors)
                if hi > lo:
                    parts[actor].append((e, lo, hi - lo))
        out = torch.empty_like(rows)  # [R, D]
        sent = self._send(layer, rows, parts)
        failed: set[transport.Client] = set()

        def wait() -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                return collect()
            finally:
                self.waiting_s += time.perf_counter() - t0

        def collect() -> torch.Tensor:
            nonlocal sent
            for attempt in range(ATTEMPTS):
                self.round_trips += 1  # all in flight at once, waited for together
                retry: dict[transport.Client, Blocks] = defaultdict(list)
                for actor, ps, index, call in sent:
                    try:
                        out[index] = call.result().to(out.device)  # [R_a, D], in the order sent
                    except transport.TransportError as err:
                        if err.code in FATAL or attempt == ATTEMPTS - 1:
                            raise
                        log.warning("expert call to %s failed (%s); retrying elsewhere", actor.address, err.code)
                        failed.add(actor)
                        self._drop(actor)
                        if any(actor in base for base in self.base.values()):  # ours: wait for Ray to restart it
                            self._recover(actor)
                        for e, s, m in ps:
                            retry[self._holder(layer, e, failed)].append((e, s, m))
                if not retry:
                    return out
                self.retries += 1
                sent = self._send(layer, rows, retry)
            raise AssertionError("unreachable: the last attempt raises")

        return wait

    def _send(self, layer: int, rows: torch.Tensor, parts: dict[transport.Client, Blocks]) -> list:
        sent = []
        for actor, ps in parts.items():  # send all; they are waited for together
            index = torch.cat([torch.arange(s, s + m) for _, s, m in ps]).to(rows.device)  # [R_a]: its rows
            sent.append((actor, ps, index, actor.experts(layer, [(e, m) for e, _, m in ps], rows[index])))
        if self.overlap:
            transport.flush()
        self.calls += len(sent)
        return sent

    def _holder(self, layer: int, e: int, failed: set[transport.Client]) -> transport.Client:
        """Another actor holding (layer, e): a live replica from the table, else a base shard."""
        for actor in [*self.table[layer, e], *self.base[layer, e]]:
            if actor not in failed:
                return actor
        return self.base[layer, e][0]  # every holder failed once: try the base shard again

    def _recover(self, actor: transport.Client) -> None:
        """Wait for Ray to restart a base shard, and put its new client wherever the old one was."""
        new = self.peers.recover(actor)
        if new is actor:
            return
        swap = lambda clients: [new if c is actor else c for c in clients]  # noqa: E731
        self.base = {pair: swap(cs) for pair, cs in self.base.items()}
        self.table = {pair: swap(cs) for pair, cs in self.table.items()}

    def _drop(self, actor: transport.Client) -> None:
        """Stop sending to `actor` until the next table update; a pair left with no holder gets its base shards."""
        self.table = {pair: [a for a in actors if a is not actor] or self.base[pair]
                      for pair, actors in self.table.items()}


class Stage:
    """Layer `layer`'s experts seam (kernels.moe.ExpertsStage, with `start`): its experts on expert shards."""

    def __init__(self, calls: ExpertCalls, layer: int):
        self.calls, self.layer = calls, layer

    def start(self, rows: torch.Tensor, blocks: Blocks) -> Wait:
        return self.calls.start(self.layer, rows, blocks)

    def __call__(self, rows: torch.Tensor, blocks: Blocks) -> torch.Tensor:
        return self.start(rows, blocks)()
