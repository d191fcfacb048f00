"""What every role actor shares: what a worker is built from, torch threads and where it runs."""

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
import torch

from cluster.dataplane import collective
from cluster.dataplane.transport import Client, TransportConfig, TransportError, connect
from kernels.engine import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker (attention actor, expert shard) is built from, besides the layers or pairs it holds."""

    model: str  # checkpoint directory
    engine: EngineConfig  # device, dtype, expert_quant, moe_kernel: applied by kernels.build; the KV cache's size
    transport_config: TransportConfig  # its data-plane server's, with its pipeline replica's token
    threads: int  # torch threads (see set_threads)


def set_threads(threads: int) -> None:
    """One thread by default: roles sharing a node would otherwise spin OpenMP threads against each
    other (measured: 51 vs 87 tok/s for 4 roles on 2 cores); 0 takes every core, for a node of its own."""
    torch.set_num_threads(threads or os.cpu_count() or 1)


def node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def live_actors(class_name: str | None = None) -> list[dict]:
    """The connected Ray cluster's live actors (of `class_name`: "ExpertShard", "ServeReplica:moeray:Router"),
    each {"id", "class", "name", "pid"}, read from its GCS: unlike ray.util.state this needs no dashboard and
    cannot pick another Ray instance running on the same machine."""
    from ray._private import state

    return [{"id": actor_id, "class": a["ActorClassName"], "name": a["Name"], "pid": a["Pid"]}
            for actor_id, a in state.actors().items()
            if a["State"] == "ALIVE" and class_name in (None, a["ActorClassName"])]


def advertised(address: str) -> str:
    """The address other nodes should dial: a server bound to every interface (0.0.0.0, [::])
    is reached at this node's IP."""
    host, port = address.rsplit(":", 1)
    if host in ("0.0.0.0", "[::]", "::"):
        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
    return f"{host}:{port}"


class Peers:
    """The data-plane clients of one caller (a router, an attention actor), one per peer address and reused,
    and the way back to a peer that Ray restarted. `handles` {address: Ray actor handle} are the workers
    this caller may wait for (others: an expert scaler's replica, or workers in this process, are not
    restarted by anyone). Peers whose address is in `ranks` are called over the collective `group`."""

    def __init__(self, config: TransportConfig, handles: dict[str, Any] | None = None, restart_timeout_s: float = 300.0,
                 group: collective.Group | None = None, ranks: dict[str, int] | None = None):
        self.config, self.restart_timeout_s = config, restart_timeout_s
        self.handles: dict[str, Any] = {}
        self.watch(handles or {})
        self.group, self.ranks = group, dict(ranks or {})
        self._clients: dict[str, Client] = {}
        self._closed_calls = 0  # collective calls of clients closed since
        self.recoveries = 0  # peers found again after Ray restarted them

    def watch(self, handles: dict[str, Any]) -> None:
        """Wait for the workers `handles` {address: Ray actor handle} when they fail (others are ignored)."""
        self.handles.update({a: h for a, h in handles.items() if isinstance(h, ray.actor.ActorHandle)})

    def client(self, address: str) -> Client:
        if address not in self._clients:
            self._clients[address] = connect(self.config, address, self.group, self.ranks.get(address))
        return self._clients[address]

    def use_group(self, group: collective.Group, ranks: dict[str, int]) -> None:
        """From now on call the peers in `ranks` over `group` (clients made before are closed: call this
        before any call is in flight)."""
        self.group, self.ranks = group, dict(ranks)
        for address in ranks:
            if address in self._clients:
                self._close(address)

    def collective_calls(self) -> tuple[int, int]:
        """(calls whose tensors went over the collective group, peers still reached over it)."""
        clients = list(self._clients.values())
        return self._closed_calls + sum(c.collective_calls for c in clients), sum(c.collective for c in clients)

    def _close(self, address: str) -> None:
        client = self._clients.pop(address)
        self._closed_calls += client.collective_calls
        client.close()

    def recover(self, lost: Client) -> Client:
        """Waits until the worker that served at lost.address serves again (Ray restarts a lost one: a new
        process on a new port); its client, `lost` itself if it never moved. TransportError if it can't."""
        address = self._restarted(lost.address)
        if address == lost.address:
            return lost
        if lost.address in self._clients:
            self._close(lost.address)
        self.recoveries += 1
        log.warning("worker %s serves again at %s", lost.address, address)
        return self.client(address)

    def _restarted(self, address: str) -> str:
        """The current address of the worker that served at `address`, waiting while Ray restarts it."""
        handle = self.handles.get(address)
        if handle is None:
            raise TransportError("UNAVAILABLE", f"{address}: lost, and no one restarts it")
        deadline = time.monotonic() + self.restart_timeout_s
        while True:
            try:
                new = ray.get(handle.address.remote(), timeout=max(deadline - time.monotonic(), 0.01))
                break
            except ray.exceptions.ActorUnavailableError:  # restarting: calls are refused, not queued, meanwhile
                if time.monotonic() > deadline:
                    raise TransportError("UNAVAILABLE", f"{address}: still restarting after "
                                         f"{self.restart_timeout_s:.0f}s") from None
                time.sleep(0.2)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                raise TransportError("UNAVAILABLE",
                                     f"{address}: not serving again within {self.restart_timeout_s:.0f}s: {e}") from e
        self.handles[new] = self.handles.pop(address)
        return new
