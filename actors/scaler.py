"""Expert scaler: replicas of hot (layer, expert) pairs follow routing load, within the config's bounds.

It runs in the expert pool's process (actors/pool.py: one per deployment, a Serve replica with `moeray
serve`, a Ray actor with the Pipeline API), on the load of every router calling the pool. Every `interval_s`
it reads the pool's token rates per pair (the routers' windowed rates, summed), and

    decide     Policy: desired = clamp(ceil(rate / target_tokens_per_s), min, max) per pair, the hottest
               first while the pool budget lasts; a change waits for upscale/downscale_delay_s of
               sustained demand and for cooldown_s after the pair's last change.
    reconcile  starts one-pair ExpertShard replicas (asking for the expert node resource, so a pending one
               makes the Ray autoscaler add a node) or marks surplus ones draining; replaces lost ones.
    publish    gives the pool {"layer:expert": [extra replica addresses]} when it changes (version + 1); each
               router gets it with its next report and hands it to its attention actors.
    retire     stops a draining replica once every router has acknowledged a version without it: attention
               actors swap tables between steps, so from then on no call to it is in flight.

A replica that does not serve within ready_timeout_s is reported unplaceable, stopped and started anew;
nothing here is fatal to the pipeline. Base shards (the placement's) are never removed: they are the floor
(a lost one is restarted by Ray and found again by its callers). Extra replicas are created by this
process, so they die with the pool.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass

import ray

from actors.workers import launch
from cluster.config import MoerayConfig, ScalingConfig
from cluster.placement import Placement

log = logging.getLogger(__name__)

Pair = tuple[int, int]


def key(pair: Pair) -> str:
    return f"{pair[0]}:{pair[1]}"


def parse(k: str) -> Pair:
    l, e = k.split(":")
    return int(l), int(e)


class Policy:
    """Target replicas per pair (base shards included), from token rates, with hysteresis. No Ray here."""

    def __init__(self, cfg: ScalingConfig, base: dict[Pair, int]):
        self.cfg, self.base = cfg, base
        self.lo = {p: max(cfg.min_replicas, n) for p, n in base.items()}
        self.hi = {p: max(cfg.max_replicas, self.lo[p]) for p in base}
        self.target = dict(self.lo)
        self._since: dict[Pair, tuple[bool, float]] = {}  # pair -> (upward?, since when) demand differs from target
        self._changed: dict[Pair, float] = {}

    def desired(self, rates: dict[Pair, float]) -> dict[Pair, int]:
        """What the rates ask for now; extra replicas go to the hottest pairs while the pool budget lasts."""
        budget = self.cfg.max_extra_replicas - sum(self.lo[p] - self.base[p] for p in self.base)
        out = {}
        for p in sorted(self.base, key=lambda p: -rates.get(p, 0.0)):
            want = min(max(math.ceil(rates.get(p, 0.0) / self.cfg.target_tokens_per_s), self.lo[p]), self.hi[p])
            more = min(want - self.lo[p], max(budget, 0))
            out[p], budget = self.lo[p] + more, budget - more
        return out

    def decide(self, rates: dict[Pair, float], now: float) -> list[tuple[Pair, int, int]]:
        """Moves targets where demand has differed long enough; returns the changes (pair, old, new)."""
        changes = []
        for p, want in self.desired(rates).items():
            cur = self.target[p]
            if want == cur:
                self._since.pop(p, None)
                continue
            up = want > cur
            if self._since.get(p, (None,))[0] is not up:
                self._since[p] = (up, now)
            delay = self.cfg.upscale_delay_s if up else self.cfg.downscale_delay_s
            if now - self._since[p][1] < delay or now - self._changed.get(p, -math.inf) < self.cfg.cooldown_s:
                continue
            if up:  # other pairs may still hold budget they are about to give back
                used = sum(self.target[q] - self.lo[q] for q in self.base if q != p)
                want = min(want, self.lo[p] + max(self.cfg.max_extra_replicas - used, 0))
                if want <= cur:
                    continue
            self.target[p], self._changed[p] = want, now
            self._since.pop(p, None)
            changes.append((p, cur, want))
        return changes


@dataclass
class Replica:
    pair: Pair
    handle: object
    ready: object  # ObjectRef of handle.address()
    started: float
    state: str = "starting"  # starting -> ready -> draining -> (stopped)
    address: str | None = None
    drain_version: int | None = None  # the first table version without it
    ping: object = None


@dataclass
class Event:
    at: float
    what: str
    pair: str = ""
    detail: str = ""

    def as_dict(self) -> dict:
        return {"at": self.at, "what": self.what, "pair": self.pair, "detail": self.detail}


class ExpertScaler:
    """The controller, a thread in the pool's process. `config`: the deployment's (extra replicas are
    launched from it, with its data-plane token); `pool`: what it reads and tells: stats() ->
    dict with "expert_tokens_per_s" and "placement_version", update_placement(version, table);
    `placement`: the deployment's, whose shards hold each pair once per shard replica (the base)."""

    def __init__(self, config: MoerayConfig, pool, placement: Placement, version: int = 0):
        self.config, self.cfg, self.pool = config, config.scaling, pool
        self.base = {p: len(actors) for p, actors in placement.actors_of().items()}
        self.policy = Policy(self.cfg, self.base)
        self.replicas: list[Replica] = []
        self.version, self.published, self.acked = version, {}, version  # tables are numbered on from `version`
        self.rates: dict[Pair, float] = {}
        self.events: deque[Event] = deque(maxlen=100)
        self.unplaceable = 0
        self.ticks = 0
        self._lock = threading.Lock()  # status() reads what the loop thread writes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="expert-scaler", daemon=True)
        self._thread.start()

    # -- what operators see (through the pool) ----------------------------------------------
    def replica_counts(self) -> dict[str, int]:
        """Serving holders per pair: base shards + ready extra replicas."""
        with self._lock:
            return self._counts()

    def _counts(self) -> dict[str, int]:
        count = {key(p): n for p, n in self.base.items()}
        for r in self.replicas:
            if r.state == "ready":
                count[key(r.pair)] += 1
        return count

    def status(self) -> dict:
        with self._lock:
            now = time.monotonic()
            return {
                "replicas": self._counts(),
                "targets": {key(p): n for p, n in self.policy.target.items()},
                "extra": [{"pair": key(r.pair), "state": r.state, "address": r.address, "age_s": now - r.started}
                          for r in self.replicas],
                "pending": [key(r.pair) for r in self.replicas if r.state == "starting"],
                "unplaceable": self.unplaceable,  # replicas stopped after ready_timeout_s (each one retried)
                "rates": {key(p): r for p, r in sorted(self.rates.items())},
                "version": self.version, "acked": self.acked, "ticks": self.ticks,
                "events": [e.as_dict() for e in self.events],
            }

    def handles(self, pair: str) -> list:
        """The actor handles of `pair`'s ready extra replicas (for operators and tests)."""
        with self._lock:
            return [r.handle for r in self.replicas if key(r.pair) == pair and r.state == "ready"]

    def stop(self) -> None:
        """Stops the loop and every extra replica."""
        self._stop.set()
        self._thread.join(timeout=30)
        for r in self.replicas:
            ray.kill(r.handle)
        self.replicas.clear()

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.cfg.interval_s):
            try:
                self._tick()
            except Exception as e:  # a bad tick (the pool busy, Ray hiccup) is logged; the next one retries
                log.exception("scaler tick failed")
                self._event("error", detail=f"{type(e).__name__}: {e}")

    def _event(self, what: str, pair: Pair | None = None, detail: str = "") -> None:
        self.events.append(Event(time.time(), what, key(pair) if pair else "", detail))

    def _tick(self) -> None:
        stats = self.pool.stats()
        rates = {parse(k): r for k, r in stats.get("expert_tokens_per_s", {}).items()}
        now = time.monotonic()
        with self._lock:
            self.rates, self.acked = rates, stats.get("placement_version", 0)
            self._check_replicas(now)
            for p, old, new in self.policy.decide(rates, now):
                self._event("scale", p, f"{old} -> {new} replicas at {rates.get(p, 0.0):.1f} tokens/s")
            self._reconcile(now)
            self._publish()
            self._retire()
            self.ticks += 1

    def _start(self, pair: Pair, now: float) -> None:
        handle = launch(self.config, "experts", [pair])
        self.replicas.append(Replica(pair, handle, handle.address.remote(), now))
        self._event("start", pair)

    def _remove(self, r: Replica, what: str, detail: str = "") -> None:
        ray.kill(r.handle)
        self.replicas.remove(r)
        self._event(what, r.pair, detail)

    def _check_replicas(self, now: float) -> None:
        """Starting ones that now serve become ready; those past ready_timeout_s are retried; dead ones go."""
        starting = [r for r in self.replicas if r.state == "starting"]
        done, _ = ray.wait([r.ready for r in starting], num_returns=len(starting), timeout=0) if starting else ([], [])
        done = set(done)
        for r in starting:
            if r.ready in done:
                try:
                    r.address, r.state = ray.get(r.ready), "ready"
                    self._event("ready", r.pair, r.address)
                except Exception as e:  # died while starting: retried by _reconcile
                    self._remove(r, "failed", f"{type(e).__name__}: {e}")
            elif now - r.started > self.cfg.ready_timeout_s:
                self.unplaceable += 1
                self._remove(r, "unplaceable", f"not serving after {self.cfg.ready_timeout_s:.0f}s; retrying "
                             f"(resources {dict(self.config.pipeline.experts.resources)})")
        serving = [r for r in self.replicas if r.state in ("ready", "draining")]
        for r in serving:  # liveness: the previous tick's ping, if answered
            if r.ping is not None and ray.wait([r.ping], timeout=0)[0]:
                try:
                    ray.get(r.ping)
                except ray.exceptions.RayActorError as e:
                    self._remove(r, "lost", type(e).__name__)
                    continue
                r.ping = None
            if r.ping is None:
                r.ping = r.handle.address.remote()

    def _reconcile(self, now: float) -> None:
        for p, target in self.policy.target.items():
            active = [r for r in self.replicas if r.pair == p and r.state != "draining"]
            need = target - self.base[p]
            for _ in range(need - len(active)):
                self._start(p, now)
            surplus = len(active) - need
            for r in sorted(active, key=lambda r: r.state == "ready")[:max(surplus, 0)]:  # unready ones first
                if r.state == "starting":
                    self._remove(r, "cancel")
                else:
                    r.state = "draining"
                    self._event("drain", p, r.address)

    def _publish(self) -> None:
        table: dict[str, list[str]] = {}
        for r in self.replicas:
            if r.state == "ready":
                table.setdefault(key(r.pair), []).append(r.address)
        if table != self.published:
            self.version += 1
            self.published = table
            self.pool.update_placement(self.version, table)
        for r in self.replicas:  # the current version lacks every draining replica
            if r.state == "draining" and r.drain_version is None:
                r.drain_version = self.version

    def _retire(self) -> None:
        for r in [r for r in self.replicas if r.state == "draining" and r.drain_version is not None]:
            if self.acked >= r.drain_version:
                self._remove(r, "stopped", f"drained: every router acknowledged version {r.drain_version}")
