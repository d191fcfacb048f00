"""The tensor half of transport kinds "gloo" and "nccl": one pipeline replica's process group and the
point-to-point sends its data-plane calls make. Only cluster/dataplane/transport.py uses this module.

The group is a torch.distributed process-group object of its own, not torch's process-global default
group: a process may hold several (tests do), and nothing here reads global parallel state. Rank 0 is
the router and opens the rendezvous, a TCPStore on its node; ranks 1..N are its workers.

    rank 0:   store, address = rendezvous(host, N + 1, timeout_s)     # tell ranks 1..N the address
              group = Group.join(kind, store, N + 1, 0, timeout_s)   # returns once every rank has joined
    rank k:   group = Group.join(kind, address, N + 1, k, timeout_s)

A pair (this rank, a peer) whose exchange failed is out of step for good (a send that nobody received
may still be matched by the next receive), so `broken` records it on both sides and neither uses the
pair again: the data plane falls back to gRPC for that peer.

The group's own sockets (the store, gloo's or NCCL's connections) are not covered by the pipeline
token and are plaintext. gloo picks its interface from the hostname; set GLOO_SOCKET_IFNAME (NCCL:
NCCL_SOCKET_IFNAME) where that resolves to the wrong one.
"""

from __future__ import annotations

import datetime
import threading
import time

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


def rendezvous(host: str, world_size: int, timeout_s: float) -> tuple[dist.TCPStore, str]:
    """A new store for a group of `world_size`, listening on a free port; (store, "tcp://host:port")."""
    store = dist.TCPStore("0.0.0.0", 0, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    return store, f"tcp://{host}:{store.port}"


class Group:
    """A process group: `send`/`recv` post a point-to-point op to a peer rank; `wait` waits for them."""

    def __init__(self, kind: str, pg, rank: int, world_size: int, device: torch.device, store=None):
        self.kind, self.rank, self.world_size, self.device = kind, rank, world_size, device
        self._pg, self._store = pg, store  # rank 0 keeps the store: it serves the rendezvous
        self._broken: set[int] = set()
        self._orphans: list = []  # ops of broken pairs that may never finish, and their tensors: kept alive
        self._lock = threading.Lock()

    @classmethod
    def join(cls, kind: str, rendezvous: str | dist.Store, world_size: int, rank: int, timeout_s: float) -> Group:
        """Join the group at `rendezvous` ("tcp://host:port" or rank 0's store) as `rank`; returns once
        every rank has joined (gloo), or RuntimeError after timeout_s. nccl: tensors on this process's
        current CUDA device (an actor's one GPU)."""
        if kind not in BACKENDS:
            raise ValueError(f"no collective backend {kind!r}; expected one of {', '.join(BACKENDS)}")
        timeout = datetime.timedelta(seconds=timeout_s)
        if isinstance(rendezvous, str):
            host, port = rendezvous.removeprefix("tcp://").rsplit(":", 1)
            store: dist.Store = dist.TCPStore(host.strip("[]"), int(port), world_size, False, timeout=timeout)
        else:
            store = rendezvous
        prefixed = dist.PrefixStore("moeray", store)
        pg: dist.ProcessGroupGloo | dist.ProcessGroupNCCL
        if kind == "gloo":
            pg, device = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout), torch.device("cpu")
        else:
            if not (dist.is_nccl_available() and torch.cuda.is_available()):
                raise RuntimeError("transport kind nccl needs CUDA and a torch built with NCCL")
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            device = torch.device("cuda", torch.cuda.current_device())
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        return cls(kind, pg, rank, world_size, device, store if rank == 0 else None)

    # -- which pairs still work ------------------------------------------------------------------
    def usable(self, peer: int) -> bool:
        return 0 <= peer < self.world_size and peer != self.rank and peer not in self._broken

    def break_pair(self, peer: int, unfinished: tuple = ()) -> None:
        """Never use the pair with `peer` again; `unfinished` ops and tensors stay referenced here, since
        the backend may still write to them."""
        with self._lock:
            self._broken.add(peer)
            self._orphans.append(unfinished)

    # -- point to point ----------------------------------------------------------------------------
    def send(self, t: torch.Tensor, peer: int, tag: int):
        """Post a send of `t` (on self.device, contiguous) to `peer`; the Work to wait on."""
        return self._pg.send([t], peer, tag)

    def recv(self, t: torch.Tensor, peer: int, tag: int):
        """Post a receive into `t` (on self.device, contiguous) from `peer`; the Work to wait on."""
        return self._pg.recv([t], peer, tag)

    @staticmethod
    def wait(works: list, deadline: float) -> None:
        """Wait for posted ops until time.monotonic() reaches `deadline`; RuntimeError if they fail or
        are not done by then."""
        for work in works:
            left = datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001))
            if work.wait(left) is False:
                raise RuntimeError("collective op not done before the deadline")
