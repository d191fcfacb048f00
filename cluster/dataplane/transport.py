"""The data plane: how a router's hidden states reach its attention actors (one call per actor per step),
and an attention actor's expert rows its expert shards (one call per shard per layer), and back.

The ONE module that knows the wire. Actors call `serve` with plain-torch handlers, routers call
`connect` and get a Client; neither sees gRPC, and `TransportConfig.kind` picks the transport.

Kind "tcp" sends the same messages, with the same checks, as length-prefixed frames over plain TCP
(cluster/dataplane/stream.py): a call costs a socket round trip and no gRPC machinery, ~0.05 ms against ~0.3 ms
for a bare gRPC echo on a loaded 2-core machine. The rest of this docstring is about gRPC.

gRPC here means: one channel per peer, reused by every call (HTTP/2 multiplexes concurrent calls over
it); unary calls that return a Pending, so an attention actor fans out to all the shards of a layer and
then waits for all (Pending says which thread sends each); tensors as raw bytes (cluster.dataplane.codec, never
pickle); a deadline on every call; the same message-size limit on both ends. Servers check every
request before their handler sees it.

Peers prove they belong to the same pipeline with a shared secret, `TransportConfig.token`: the Client
sends it as metadata on every call, and the server refuses a call without it (UNAUTHENTICATED) before
it decodes a byte. start_workers generates one per pipeline replica and hands it to the attention
actors, the expert shards and the router through Ray's control plane. An empty token (tests that start
servers by hand) checks nothing. The token authenticates; it does not encrypt: the channels are
plaintext, so on a network where others can read the traffic the data plane also needs TLS (not built).

Kinds "nccl" and "gloo" (cluster/dataplane/collective.py) keep every call on gRPC (metadata, errors, deadline,
token) but move its tensors over a process group: the request announces dtype and shape with no bytes,
the Client has posted a send of the input and a receive of the output (same shape and dtype: the server
casts its result) to the peer's rank before the call, and the server receives the input from rank 0,
runs its handler, sends the output and replies. nccl moves CUDA tensors (GPU to GPU); gloo moves CPU
tensors, which is how it is tested without GPUs. One group per pipeline replica: the router is rank 0 and
opens the rendezvous, its workers join with Server.join, and any member calls any other (the router its
attention actors, they the expert shards): a Client made with the caller's group and the peer's rank uses
it, and the request names the caller's rank and a tag of the call's own, so several calls in flight on one
pair (two micro-batches) are matched right. gRPC stays
the fallback: a Client without a rank (a peer outside the group: an expert scaler's extra replica, a
worker Ray restarted) sends bytes, servers always accept bytes, and any failure of a collective call
breaks that pair for good (both sides) and re-sends the call once over gRPC (not when the peer is
unavailable or past its deadline: gRPC would fare no better). One caller per pair.

Shapes: T new tokens of a step, D model dim, R expert rows of a request.
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import grpc
import torch
from google.protobuf.message import DecodeError

from cluster.dataplane import collective, stream
from cluster.dataplane.codec import DTYPES, CodecError, allocate, decode, describe, encode
from cluster.ports import is_loopback_host
from cluster.rpc import dataplane_pb2 as pb
from cluster.rpc import dataplane_pb2_grpc as rpc
from kernels.cache import StepSeq

log = logging.getLogger(__name__)

KINDS = ("grpc", "tcp", *collective.BACKENDS)
CALLER = 0  # the rank that opens a collective group's rendezvous: a pipeline replica's router
TOKEN_METADATA = "moeray-dataplane-token"  # the call metadata carrying TransportConfig.token


@dataclass
class TransportConfig:
    """How actors and routers talk on the data plane; one per pipeline, the same on both ends."""

    # tcp (the messages over plain TCP: ~5x cheaper a call than gRPC) | grpc (bytes in gRPC messages) |
    # gloo (CPU tensors over a process group, the rest on gRPC) | nccl (CUDA tensors over a group)
    kind: str = "tcp"
    host: str = "127.0.0.1"  # servers' bind address: loopback unless a deployment opens it up
    max_message_mb: int = 256  # largest message either way; larger -> RESOURCE_EXHAUSTED
    timeout_s: float = 30.0  # deadline of every data-plane call
    workers: int = 8  # server threads: calls one server runs at once
    # the pipeline's shared secret, kept out of repr (configs get logged); empty: start_workers makes one
    token: str = dataclasses.field(default="", repr=False)

    def __post_init__(self):
        _check_kind(self)

    @property
    def max_bytes(self) -> int:
        return self.max_message_mb << 20


def _check_kind(config: TransportConfig) -> None:
    if config.kind not in KINDS:
        raise ValueError(f"unknown transport kind {config.kind!r}; expected one of {', '.join(KINDS)}")


def is_collective(config: TransportConfig) -> bool:
    """Does this kind move tensors over a process group (which the caller must form: join)?"""
    return config.kind in collective.BACKENDS


def rendezvous(config: TransportConfig, host: str, world_size: int):
    """Rank 0's side of forming a group: (store, "tcp://host:port" for ranks 1..N's Server.join)."""
    return collective.rendezvous(host, world_size, config.timeout_s)


def join(config: TransportConfig, rendezvous, world_size: int, rank: int) -> collective.Group:
    """Join the collective group at `rendezvous` (an address, or rank 0's store); waits up to timeout_s."""
    if not is_collective(config):
        raise ValueError(f"transport kind {config.kind!r} has no collective group")
    return collective.Group.join(config.kind, rendezvous, world_size, rank, config.timeout_s)


def with_token(config: TransportConfig) -> TransportConfig:
    """`config` itself if it has a token, else a copy with a fresh one (32 random bytes, URL-safe): what a
    pipeline replica gives all of its actors, so they accept calls from each other and no one else."""
    return config if config.token else dataclasses.replace(config, token=secrets.token_urlsafe(32))


AttentionHandler = Callable[[int, int, "list[StepSeq]", torch.Tensor], "tuple[torch.Tensor, dict]"]
"""(step, first layer, seqs, hidden [T, D]) -> (hidden [T, D], the step's report: StepReport's fields)."""
ExpertHandler = Callable[[int, "list[tuple[int, int]]", torch.Tensor], torch.Tensor]
"""(layer, [(expert, row count), ...], rows [R, D] with R == sum of counts) -> rows [R, D]."""


class TransportError(RuntimeError):
    """A data-plane call failed. `code` is the gRPC status name ("INVALID_ARGUMENT", "INTERNAL",
    "DEADLINE_EXCEEDED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED" (no or a wrong pipeline
    token), ...); `message` says why, peer first."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


# ---- server ----------------------------------------------------------------------------------------


class BadRequest(ValueError):
    """What a handler raises for a request that is the caller's mistake (a layer or expert not served
    here, a wrong hidden size): INVALID_ARGUMENT, which the router does not retry. Any other exception
    from a handler (a ValueError or KeyError from a bug included) is the server's own fault: INTERNAL."""


class Server:
    def __init__(self, stop: Callable[[float | None], None], address: str, config: TransportConfig,
                 box: SimpleNamespace):
        self._stop, self._config, self._box = stop, config, box
        self.address = address  # "host:port" actually bound (peers of a 0.0.0.0 server need the node's IP)

    @property
    def group(self) -> collective.Group | None:
        """The collective group joined (Server.join), which this process's clients may call over too."""
        return self._box.group

    def join(self, rendezvous: str, world_size: int, rank: int) -> None:
        """Join the caller's collective group as `rank` (kinds gloo, nccl); from then on this server also
        answers calls whose tensors travel over it. Blocks until the group has formed (timeout_s)."""
        self._box.group = join(self._config, rendezvous, world_size, rank)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; in-flight ones get `grace` seconds (None: cancelled now)."""
        self._stop(grace)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _options(config: TransportConfig) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", config.max_bytes), ("grpc.max_receive_message_length", config.max_bytes)]


def _run(name: str, body: Callable, request):
    """(body(request), None), or (None, (status code name, message)) with exceptions turned into status
    codes: the message's own checks (CodecError: dtype, shape, sizes; BadRequest: the rest) and a
    handler's BadRequest mean the request was wrong -> INVALID_ARGUMENT; anything else is this server's
    fault -> INTERNAL (which the router retries elsewhere), logged with its traceback. Either way the
    server keeps serving."""
    try:
        return body(request), None
    except (CodecError, BadRequest) as e:
        return None, ("INVALID_ARGUMENT", f"{name}: {e}")
    except Exception as e:
        log.exception("%s failed", name)
        return None, ("INTERNAL", f"{name}: {type(e).__name__}: {e}")


def _unary(name: str, body: Callable):
    """A gRPC method running `body(request) -> reply` (see _run)."""

    def method(request, context):
        reply, error = _run(name, body, request)
        if error is not None:
            context.abort(grpc.StatusCode[error[0]], error[1])  # raises
        return reply

    return method


def _stream_handler(services: dict[str, tuple[Any, Callable]]) -> stream.Handler:
    """Kind tcp's server side of `services` {name: (request type, body)} and Echo (see _run)."""
    methods = {stream.ATTENTION: "attention", stream.EXPERTS: "experts"}

    def handle(method: int, payload: bytearray) -> tuple[str, bytes | bytearray]:
        if method == stream.ECHO:
            return "OK", payload  # unparsed, as the gRPC Echo returns its request
        name = methods.get(method)
        if name not in services:
            return "UNIMPLEMENTED", f"data plane: no {name or f'method {method}'} service here".encode()
        kind, body = services[name]
        try:
            request = kind.FromString(payload)
        except DecodeError as e:
            return "INVALID_ARGUMENT", f"{name}: malformed request: {e}".encode()
        reply, error = _run(name, body, request)
        return ("OK", reply.SerializeToString()) if error is None else (error[0], error[1].encode())

    return handle


class _TokenCheck(grpc.ServerInterceptor):
    """Refuses every call whose metadata lacks the pipeline's token, before the request is deserialized:
    the refusal handler takes the raw bytes and never parses them. Constant-time comparison."""

    def __init__(self, token: str):
        self._token = token.encode()
        self._refuse = grpc.unary_unary_rpc_method_handler(self._unauthenticated)

    @staticmethod
    def _unauthenticated(request: bytes, context) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "data plane: missing or wrong pipeline token")

    def intercept_service(self, continuation, handler_call_details):
        presented = next((v for k, v in handler_call_details.invocation_metadata or () if k == TOKEN_METADATA), None)
        if isinstance(presented, str) and hmac.compare_digest(presented.encode(), self._token):
            return continuation(handler_call_details)
        return self._refuse


def _checked(out, like: torch.Tensor) -> torch.Tensor:
    """A handler's result, if the wire can carry it back as the reply. If not, that is the handler's
    bug: RuntimeError -> INTERNAL (encode's CodecError would read as a bad request)."""
    if not isinstance(out, torch.Tensor) or out.shape != like.shape or out.dtype not in DTYPES:
        got = f"{out.dtype} {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise RuntimeError(f"handler returned {got}, expected a tensor of shape {list(like.shape)}")
    return out


def serve(config: TransportConfig, *, attention: AttentionHandler | None = None, experts: ExpertHandler | None = None,
          port: int = 0) -> Server:
    """Start a server for the given handlers (a service without one answers UNIMPLEMENTED) and Echo.

    port 0 picks a free port; Server.address says which.
    """
    _check_kind(config)
    box = SimpleNamespace(group=None)  # the collective group, once Server.join has joined one

    def forward_attention(request: pb.AttentionRequest) -> pb.AttentionReply:
        seqs = [StepSeq(list(s.block_table), s.start, s.n) for s in request.seqs]
        reply = pb.AttentionReply()

        def run(hidden: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
            if any(s.start < 0 or s.n < 0 or min(s.block_table, default=0) < 0 for s in seqs):
                raise BadRequest("seqs need start >= 0, n >= 0 and block ids >= 0")
            if (n := sum(s.n for s in seqs)) != hidden.shape[0]:
                raise BadRequest(f"seqs have {n} new tokens in all, hidden has {hidden.shape[0]} rows")
            assert attention is not None  # forward_attention is registered only with a handler
            out, report = attention(request.step, request.layer, seqs, hidden)
            reply.report.CopyFrom(pb.StepReport(**report))
            return out

        _exchange(config, box.group, request.hidden, reply.hidden, run)
        return reply

    def forward_experts(request: pb.ExpertRequest) -> pb.ExpertReply:
        blocks = [(b.expert, b.rows) for b in request.blocks]
        counts = [n for _, n in blocks]

        def run(rows: torch.Tensor) -> torch.Tensor:  # [R, D] -> [R, D]
            if any(n < 0 for n in counts) or sum(counts) != rows.shape[0]:
                raise BadRequest(f"block row counts {counts} sum to {sum(counts)}, "
                                 f"rows tensor has {rows.shape[0]} rows")
            assert experts is not None  # forward_experts is registered only with a handler
            return experts(request.layer, blocks, rows)

        reply = pb.ExpertReply()
        _exchange(config, box.group, request.rows, reply.rows, run)
        return reply

    if not config.token and not is_loopback_host(config.host):
        log.warning("data plane on %s without a token: any peer that reaches it can call it", config.host)
    if config.kind == "tcp":
        services: dict[str, tuple[Any, Callable]] = {}
        if attention is not None:
            services["attention"] = (pb.AttentionRequest, forward_attention)
        if experts is not None:
            services["experts"] = (pb.ExpertRequest, forward_experts)
        lean = stream.Server(config.host, port, token=config.token, max_bytes=config.max_bytes,
                             timeout_s=config.timeout_s, workers=config.workers, handle=_stream_handler(services))
        return Server(lean.stop, lean.address, config, box)
    server = grpc.server(futures.ThreadPoolExecutor(config.workers, thread_name_prefix="moeray-dataplane"),
                         interceptors=[_TokenCheck(config.token)] if config.token else None,
                         options=[*_options(config), ("grpc.so_reuseport", 0)])  # a taken port fails, not shared
    if attention is not None:
        rpc.add_AttentionServicer_to_server(SimpleNamespace(Forward=_unary("attention", forward_attention)), server)
    if experts is not None:
        rpc.add_ExpertShardServicer_to_server(SimpleNamespace(Forward=_unary("experts", forward_experts)), server)
    rpc.add_EchoServicer_to_server(SimpleNamespace(Echo=lambda request, context: request), server)
    host = f"[{config.host}]" if ":" in config.host else config.host  # IPv6 literal
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as e:  # grpc raises here when it cannot bind
        server.stop(None)
        raise OSError(f"data plane cannot bind {host}:{port}: {e}") from e
    server.start()
    return Server(lambda grace: server.stop(grace).wait(), f"{host}:{bound}", config, box)


def _exchange(config: TransportConfig, group: collective.Group | None, given: pb.Tensor, reply: pb.Tensor,
              run: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """One request's tensors: run(input) -> output with both as bytes in the messages, or, when the
    request announces collective data, received from and sent back to the caller's rank, with the call's
    tags. Once the input has arrived the caller's receive is answered even if `run` fails (zeros)."""
    if not given.collective:
        x = decode(given, max_bytes=config.max_bytes, ndim=2)
        encode(_checked(run(x), x), reply)
        return
    caller = given.rank
    if group is None or not group.usable(caller):
        raise BadRequest("tensor data sent over a collective group this server is not (or no longer) in")
    x = allocate(given, max_bytes=config.max_bytes, ndim=2, device=group.device)
    deadline = time.monotonic() + config.timeout_s
    try:
        group.wait([group.recv(x, caller, given.tag)], deadline)
    except Exception as e:
        group.break_pair(caller, (x,))
        raise RuntimeError(f"collective receive failed: {e}") from e
    try:
        out, error = _checked(run(x), x).to(group.device, x.dtype).contiguous(), None
    except Exception as e:
        out, error = torch.zeros_like(x), e
    try:
        group.wait([group.send(out, caller, given.tag + 1)], deadline)
    except Exception as e:
        group.break_pair(caller, (out,))
        if error is None:
            raise RuntimeError(f"collective send failed: {e}") from e
    if error is not None:
        raise error
    describe(out, reply)


# ---- client ----------------------------------------------------------------------------------------


NOT_RESENT = {"UNAVAILABLE", "DEADLINE_EXCEEDED"}  # a collective call failing so is not re-sent: peer down or slow


class _Unsent(threading.local):
    call: weakref.ref | None = None  # to this thread's latest call while it is unsent


_unsent = _Unsent()


def _latest() -> Pending | None:
    """This thread's latest call, while it is unsent and someone still holds it."""
    return _unsent.call() if _unsent.call is not None else None


def flush() -> None:
    """Send this thread's calls now, before it waits for any: for a caller that computes something else
    while they are away (an attention actor's other micro-batch). Kind tcp sends every call as it is
    issued; gRPC's latest call otherwise waits to run in the thread that waits for it (see Pending)."""
    latest = _latest()
    _unsent.call = None
    if latest is not None:
        latest._send(here=False)


_senders: futures.ThreadPoolExecutor | None = None  # sends the calls that overlap others; made on first use


def _sender() -> futures.ThreadPoolExecutor:
    global _senders
    if _senders is None:
        _senders = futures.ThreadPoolExecutor(64, thread_name_prefix="moeray-dataplane-call")
    return _senders


def _forget_senders() -> None:
    global _senders
    _senders = None  # a forked child has none of the pool's threads, and a pool that thinks it has hangs


os.register_at_fork(after_in_child=_forget_senders)


class Pending:
    """A call issued. result() waits for the reply and decodes it: decoding happens only there, in the
    caller's thread, after the caller has issued all the calls it wants to overlap.

    Each call is a blocking gRPC call in some thread, never a gRPC future: a future costs ~0.3 ms more
    (a channel with no future in flight starts a new polling thread for the next one, and the reply then
    crosses from it to the caller's thread). So the latest call a thread issued stays unsent until that
    thread issues another call (then it is sent from a pool thread, in flight beside the next) or waits
    for any result (then it runs in the waiting thread while the earlier ones are in flight): a call that
    is waited for at once (a layer's attention) never leaves the caller's thread, and a fan-out to N
    peers sends N - 1 calls from the pool. A call dropped unsent (nobody can wait for it) is never sent.
    The deadline counts from the issue."""

    __slots__ = ("__weakref__", "_call", "_client", "_collective", "_error", "_field", "_lock", "_reply", "_sent",
                 "_shape")

    def __init__(self, client: GrpcClient, method, request, field: str, shape: torch.Size, collective=None):
        self._client, self._field, self._shape = client, field, shape
        self._call: tuple | None = (method, request, time.monotonic() + client._timeout)  # until it is sent
        self._lock = threading.Lock()  # one send, should two threads try
        self._sent: futures.Future | None = None  # the pool's, when it was sent from there
        self._reply = self._error = None  # when it ran in a waiting thread
        self._collective = collective  # (method, request, input, [send, recv], output, deadline) over the group
        earlier = _latest()
        _unsent.call = weakref.ref(self)
        if earlier is not None:
            earlier._send(here=False)

    def _send(self, here: bool) -> None:
        """Send the call unless it has gone: blocking in this thread (here), or from the pool."""
        with self._lock:
            call, self._call = self._call, None
            if call is None:
                return
            if not here:
                self._sent = _sender().submit(self._client._invoke, *call)
                return
            try:
                self._reply = self._client._invoke(*call)
            except grpc.RpcError as e:
                self._error = e

    def _wait(self):
        """The reply message; grpc.RpcError if the call failed."""
        latest = _latest()
        _unsent.call = None
        if latest is not None and latest is not self:  # runs while this one's reply comes in
            latest._send(here=True)
        self._send(here=True)
        if self._sent is not None:
            return self._sent.result()
        if self._error is not None:
            raise self._error
        return self._reply

    def result(self) -> torch.Tensor:
        """The reply tensor, with the request's shape; TransportError if the call or its reply is bad."""
        if self._collective is not None:
            return self._collective_result()
        try:
            reply = self._wait()
        except grpc.RpcError as e:
            raise TransportError(e.code().name, f"{self._client.address}: {e.details()}") from e
        return _result(self._client, reply, self._field, self._shape)

    def _collective_result(self) -> torch.Tensor:
        method, request, x, works, out, deadline = self._collective
        client = self._client
        try:
            reply = self._wait()
            got = getattr(reply, self._field)
            if not got.collective or list(got.shape) != list(x.shape) or got.dtype != DTYPES[x.dtype]:
                raise RuntimeError("the reply does not announce the request's tensor over the group")
            collective.Group.wait(works, deadline)
        except Exception as e:  # grpc.RpcError, or the group's ops
            code = e.code().name if isinstance(e, grpc.RpcError) else "INTERNAL"
            client._break(f"{code}: {e.details() if isinstance(e, grpc.RpcError) else e}", (works, x, out))
            if code in NOT_RESENT:
                details = e.details() if isinstance(e, grpc.RpcError) else e
                raise TransportError(code, f"{client.address}: {details}") from e
            plain = type(request)()
            plain.CopyFrom(request)
            getattr(plain, self._field).Clear()
            encode(x, getattr(plain, self._field))
            return client._call(method, plain, self._field, x.shape).result()
        client.collective_calls += 1
        return _result(client, reply, self._field, self._shape, out)


def _result(client: Client, reply, field: str, shape: torch.Size, tensor: torch.Tensor | None = None):
    """What a call's result() returns: the reply's tensor (`tensor`, when it came over the group), with
    an attention call's report as a dict of StepReport's fields."""
    t = _tensor(client, getattr(reply, field), shape) if tensor is None else tensor
    if not isinstance(reply, pb.AttentionReply):
        return t
    r = reply.report
    return t, {f.name: v if isinstance(v := getattr(r, f.name), int) else list(v) for f in r.DESCRIPTOR.fields}


def _tensor(client: Client, msg: pb.Tensor, shape: torch.Size) -> torch.Tensor:
    """The reply's tensor, checked to have the request's shape; TransportError if it is bad."""
    try:
        return decode(msg, max_bytes=client._max_bytes, ndim=2, dims=dict(enumerate(shape)))
    except ValueError as e:
        raise TransportError("INTERNAL", f"{client.address}: bad reply: {e}") from e


class Client:
    """Calls one peer; safe to use from several threads. attention and experts return a call in flight
    whose result() is the reply tensor. connect() makes the one for the configured kind."""

    address: str
    collective_calls = 0  # calls whose tensors went over a collective group
    _timeout: float  # seconds: every call's deadline
    _max_bytes: int  # the largest message either way

    def attention(self, step: int, layer: int, seqs: list[StepSeq], hidden: torch.Tensor):
        """Send hidden [T, D] into the actor's layers, the first of which is `layer`; result() is
        (hidden [T, D], the step's report: a dict of StepReport's fields)."""
        wire = [pb.StepSeq(block_table=s.block_table, start=s.start, n=s.n) for s in seqs]
        request = pb.AttentionRequest(step=step, layer=layer, seqs=wire)
        return self._send("attention", request, "hidden", hidden)

    def experts(self, layer: int, blocks: list[tuple[int, int]], rows: torch.Tensor):
        """Send rows [R, D], in blocks of (expert, row count), to this shard's experts of `layer`."""
        wire = [pb.ExpertBlock(expert=e, rows=n) for e, n in blocks]
        request = pb.ExpertRequest(layer=layer, blocks=wire)
        return self._send("experts", request, "rows", rows)

    def echo(self, data: bytes) -> bytes:
        """Round trip `data` through the peer's Echo, blocking: the benchmarks' baseline."""
        raise NotImplementedError

    @property
    def collective(self) -> bool:
        """Do this client's tensors go over a collective group (a member peer, its pair not broken)?"""
        return False

    def _send(self, name: str, request, field: str, x: torch.Tensor):
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GrpcClient(Client):
    """Kinds grpc, gloo, nccl: one long-lived channel (over a collective group: one call in flight at a
    time)."""

    def __init__(self, config: TransportConfig, address: str, group: collective.Group | None = None,
                 rank: int | None = None):
        self.address = address
        self._group: collective.Group | None = group if rank is not None else None
        self._rank: int = rank if group is not None and rank is not None else -1  # -1: no collective pair
        self.collective_calls = 0
        self._tags = itertools.count()  # each collective call's own pair of tags
        self._timeout, self._max_bytes = config.timeout_s, config.max_bytes
        self._metadata = ((TOKEN_METADATA, config.token),) if config.token else None  # on every call
        self._channel = grpc.insecure_channel(address, options=_options(config))
        self._methods = {"attention": rpc.AttentionStub(self._channel).Forward,
                         "experts": rpc.ExpertShardStub(self._channel).Forward}
        self._echo = rpc.EchoStub(self._channel).Echo

    def echo(self, data: bytes) -> bytes:
        """Round trip `data` through the peer's Echo service, blocking: the benchmarks' baseline."""
        try:
            return self._echo(pb.EchoMessage(data=data), timeout=self._timeout, metadata=self._metadata).data
        except grpc.RpcError as e:
            raise TransportError(e.code().name, f"{self.address}: {e.details()}") from e

    @property
    def collective(self) -> bool:
        return self._group is not None and self._group.usable(self._rank)

    def _send(self, name: str, request, field: str, x: torch.Tensor) -> Pending:
        method = self._methods[name]
        if not self.collective or x.numel() == 0:
            encode(x, getattr(request, field))
            return self._call(method, request, field, x.shape)
        g = self._group
        assert g is not None  # self.collective
        x = x.to(g.device).contiguous()
        wire = describe(x, getattr(request, field))  # refuses a dtype the wire lacks before any op is posted
        wire.rank, wire.tag = g.rank, 2 * (next(self._tags) % (1 << 29)) + 1  # the reply's: tag + 1
        out = torch.empty_like(x)  # the reply: same shape and dtype
        works = []
        try:
            works.append(g.send(x, self._rank, wire.tag))
            works.append(g.recv(out, self._rank, wire.tag + 1))
        except Exception as e:  # gloo refuses to post to a peer whose connection closed (it died)
            self._break(f"posting an op: {e}", (works, x, out))
            encode(x, getattr(request, field))
            return self._call(method, request, field, x.shape)
        return Pending(self, method, request, field, x.shape,
                       (method, request, x, works, out, time.monotonic() + self._timeout))

    def _call(self, method, request, field: str, shape: torch.Size) -> Pending:
        return Pending(self, method, request, field, shape)

    def _invoke(self, method, request, deadline: float):
        """One blocking call (Pending says in which thread) with what is left of its deadline."""
        return method(request, timeout=max(deadline - time.monotonic(), 0.0), metadata=self._metadata)

    def _break(self, why: str, unfinished: tuple) -> None:
        log.warning("data plane: collective pair with %s (rank %d) failed (%s); gRPC from now on",
                    self.address, self._rank, why)
        if self._group is not None:
            self._group.break_pair(self._rank, unfinished)

    def close(self) -> None:
        self._channel.close()


class StreamClient(Client):
    """Kind tcp: each call a frame on one of a pool of connections (cluster/dataplane/stream.py), sent at once from
    the caller's thread, its reply read by result() in the waiting thread."""

    _METHODS = {"attention": (stream.ATTENTION, pb.AttentionReply), "experts": (stream.EXPERTS, pb.ExpertReply)}

    def __init__(self, config: TransportConfig, address: str):
        self.address = address
        self._timeout, self._max_bytes = config.timeout_s, config.max_bytes
        self._channel = stream.Channel(address, config.token, config.max_bytes)

    def echo(self, data: bytes) -> bytes:
        payload = pb.EchoMessage(data=data).SerializeToString()
        call = self._channel.send(stream.ECHO, payload, time.monotonic() + self._timeout)
        return pb.EchoMessage.FromString(self._reply(call)).data

    def _reply(self, call: stream.Call) -> bytearray:
        try:
            return call.reply()
        except stream.StreamError as e:
            raise TransportError(e.code, f"{self.address}: {e.message}") from None

    def _send(self, name: str, request, field: str, x: torch.Tensor) -> _StreamPending:
        encode(x, getattr(request, field))
        method, reply_type = self._METHODS[name]
        call = self._channel.send(method, request.SerializeToString(), time.monotonic() + self._timeout)
        return _StreamPending(self, call, reply_type, field, x.shape)

    def close(self) -> None:
        self._channel.close()


class _StreamPending:
    """A kind-tcp call in flight (its request sent). result(): the reply tensor, or TransportError."""

    __slots__ = ("_call", "_client", "_field", "_reply_type", "_shape")

    def __init__(self, client: StreamClient, call: stream.Call, reply_type: Any, field: str, shape: torch.Size):
        self._client, self._call, self._reply_type, self._field, self._shape = client, call, reply_type, field, shape

    def result(self) -> torch.Tensor:
        payload = self._client._reply(self._call)
        try:
            reply = self._reply_type.FromString(payload)
        except DecodeError as e:
            raise TransportError("INTERNAL", f"{self._client.address}: bad reply: {e}") from e
        return _result(self._client, reply, self._field, self._shape)


def connect(config: TransportConfig, address: str, group: collective.Group | None = None,
            rank: int | None = None) -> Client:
    """A client for the server at `address` ("host:port"); connects lazily, on the first call. With the
    caller's collective group and the server's rank there, tensors go over the group."""
    _check_kind(config)
    if config.kind == "tcp":
        return StreamClient(config, address)
    return GrpcClient(config, address, group, rank)
