"""ExpertPool: a deployment's expert shards, started once and shared by every pipeline replica.

A pipeline replica (a router and its attention actors) joins the pool (`join`): it gets the deployment's
config (with its data-plane token), the placement and the base shards' addresses and Ray handles, and its
attention actors call those shards. The pool outlives any one replica: scaling routers out or in, or a
router crashing, leaves it serving; it stops with its owner (the ExpertPool Serve deployment of the app, so
`serve shutdown` and Ctrl-C on `moeray serve` stop it; the driver with the Pipeline API). Ray restarts a
lost shard (max_restarts=-1) and each caller finds it again through its handle.

With scaling enabled the pool runs the one expert scaler of the deployment (actors/scaler.py) on the load of
all its routers: each router reports its windowed token rates per (layer, expert) and the placement table
version its attention actors use (`report`, every scaling.interval_s), and gets the latest table back. The
scaler sees the rates summed over the routers heard from lately, and retires a replica only once each of
them has acknowledged a table without it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray

from actors.workers import RAY, Spawner, start_experts, stop_experts
from cluster.config import MoerayConfig
from cluster.placement import Placement

log = logging.getLogger(__name__)


@dataclass
class PoolInfo:
    """What a joining pipeline replica needs of the pool."""

    config: MoerayConfig  # the deployment's: its data plane carries the deployment's token
    placement: Placement
    experts: list  # the base shards' Ray handles
    addresses: list[str]  # their data-plane addresses when the pool started them
    version: int  # the expert placement table in force (0: the base shards only)
    table: dict[str, list[str]]


@dataclass
class _Load:
    seen: float  # time.monotonic() of the router's last report
    rates: dict[str, float]  # token rows per second per "layer:expert"
    acked: int  # the table version all its attention actors use


class ExpertPool:
    """`name`: the shards are detached and named after it (start_experts), so the pool's process can go (a
    crash, a `serve deploy` that replaces it) while they serve on; the next pool of that name adopts them.
    Without a name they are this process's and die with it."""

    def __init__(self, config: MoerayConfig, spawner: Spawner = RAY, name: str | None = None):
        self.config, self.placement, self.experts, self.addresses, adopted = start_experts(config, spawner, name)
        # an adopting pool's tables must supersede its predecessor's (whose extra replicas died with it), which
        # routers may still use: its versions start at the clock (ms), above any table an earlier pool published
        self.version, self.table = (time.time_ns() // 1_000_000 if adopted else 0), {}
        self._loads: dict[str, _Load] = {}
        self._lock = threading.Lock()  # report (a Ray call) against the scaler's thread
        self.scaler = None
        if config.scaling.enabled:
            from actors.scaler import ExpertScaler

            self.scaler = ExpertScaler(self.config, self, self.placement, self.version)

    # -- pipeline replicas -------------------------------------------------------------------------
    def join(self, router: str) -> PoolInfo:
        """A pipeline replica joins (its router's id): what it needs; from now on its acknowledgements count."""
        with self._lock:
            self._loads[router] = _Load(time.monotonic(), {}, self.version)
            return PoolInfo(self.config, self.placement, list(self.experts), list(self.addresses), self.version,
                            dict(self.table))

    def report(self, router: str, rates: dict[str, float], acked: int) -> tuple[int, dict[str, list[str]]]:
        """A router's windowed token rates per "layer:expert" and the table version its attention actors use;
        returns the latest table (version, {"layer:expert": [addresses of extra replicas]})."""
        with self._lock:
            self._loads[router] = _Load(time.monotonic(), dict(rates), acked)
            return self.version, dict(self.table)

    def leave(self, router: str) -> None:
        with self._lock:
            self._loads.pop(router, None)

    def _live(self) -> dict[str, _Load]:
        """The routers heard from within three report intervals (others have left or died)."""
        horizon = time.monotonic() - 3 * self.config.scaling.interval_s - 5
        return {r: load for r, load in self._loads.items() if load.seen >= horizon}

    # -- what the scaler reads and writes (its `router`) ---------------------------------------------
    def stats(self) -> dict:
        """The deployment's routing load: rates summed over live routers, and the oldest table version any of
        them still uses (with none, the latest: nobody uses an older one)."""
        with self._lock:
            live = self._live()
            rates: dict[str, float] = defaultdict(float)
            for load in live.values():
                for pair, r in load.rates.items():
                    rates[pair] += r
            return {"expert_tokens_per_s": dict(rates),
                    "placement_version": min((load.acked for load in live.values()), default=self.version)}

    def update_placement(self, version: int, table: dict[str, list[str]]) -> None:
        """The scaler's new table: routers get it with their next report."""
        with self._lock:
            self.version, self.table = version, dict(table)

    # -- operators and tests -------------------------------------------------------------------------
    def status(self) -> dict:
        """The scaler's view (None when scaling is off) and the routers the pool has heard from."""
        with self._lock:
            now = time.monotonic()
            routers = {r: {"age_s": now - load.seen, "acked": load.acked} for r, load in self._loads.items()}
        return {"scaler": self.scaler.status() if self.scaler else None, "routers": routers,
                "version": self.version}

    def replica_counts(self) -> dict[str, int]:
        return self.scaler.replica_counts() if self.scaler else {}

    def scaler_replicas(self, pair: str) -> list:
        """Actor handles of `pair`'s ready extra replicas."""
        return self.scaler.handles(pair) if self.scaler else []

    def info(self) -> list[dict]:
        """Each base shard's info (node, pairs, parameter bytes, busy time)."""
        return ray.get([e.info.remote() for e in self.experts])

    def shutdown(self, shards: bool = False) -> None:
        """Stops the scaler and its replicas, and with `shards` the base shards (those of an unnamed pool die
        with this process, their owner, anyway)."""
        if self.scaler:
            self.scaler.stop()
        if shards:
            stop_experts(self.experts)


class PoolReplica(ExpertPool):
    """The ExpertPool Serve deployment's replica: its shards are named after the application, so they outlive
    the replica; Serve restarting it (a crash) or replacing it (`serve deploy` of changed args) starts a replica
    that adopts them. When the application is deleted (`serve delete`, `serve shutdown`, Ctrl-C on `moeray
    serve`) the replica stops them, once the application's routers have stopped: Serve stops every deployment's
    replicas at once, and a router first finishes its running requests (within serve.routers.drain_timeout_s),
    whose steps call the shards till then. The deployment's graceful_shutdown_timeout_s leaves it that long
    (actors/app.py: SHARDS_OUTLAST_ROUTERS_S more)."""

    def __init__(self, config: MoerayConfig):
        from ray import serve

        self.app = serve.get_replica_context().app_name
        super().__init__(config, RAY, f"moeray-pool.{self.app}")

    def __del__(self):  # Serve's graceful shutdown: the application deleted, or this replica replaced
        if hasattr(self, "experts"):
            deleted = app_deleted(self.app)
            if deleted and not routers_stopped(self.app, self.config.serve.routers.drain_timeout_s):
                log.warning("application %s: routers still running after %.0f s; stopping its expert shards",
                            self.app, self.config.serve.routers.drain_timeout_s)
            self.shutdown(shards=deleted)


def app_deleted(app: str) -> bool:
    """Whether Serve is deleting application `app` (or has: it is gone)."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    try:
        status = serve.status().applications.get(app)
    except Exception as e:  # noqa: BLE001 (the controller is gone: so is the application)
        log.info("Serve status unavailable (%s): taking application %s as deleted", e, app)
        return True
    return status is None or status.status == ApplicationStatus.DELETING


def routers_stopped(app: str, timeout_s: float, poll_s: float = 0.25) -> bool:
    """Waits, at most timeout_s, until application `app` has no Router replica alive; whether it has none. Its
    replicas are Ray actors named after it (Serve's replica ids: "SERVE_REPLICA::<app>#Router#<id>"); Serve's
    status stops listing a deleting application's deployments while their replicas still drain."""
    prefix = f"SERVE_REPLICA::{app}#Router#"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
        except Exception as e:  # noqa: BLE001 (the cluster is going: so are the routers)
            log.info("named actors unavailable (%s): taking application %s's routers as stopped", e, app)
            return True
        if not alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def call(handle: Any, method: str, *args) -> Any:
    """`method(*args)` on the pool behind `handle`, blocking: a Ray actor handle (the Pipeline API) or a Serve
    deployment handle (the app). Serve refuses a blocking wait on its handle from a thread running an event
    loop (a replica's constructor), so there it waits from a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop here: wait in this thread
        response = getattr(handle, method).remote(*args)
        return response.result() if hasattr(response, "result") else ray.get(response)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call, handle, method, *args).result()
