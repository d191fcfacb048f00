"""The data plane: how a router's per-layer tensors reach attention and expert-shard actors and back.

The ONE module that knows the wire. Actors call `serve` with plain-torch handlers, routers call
`connect` and get a Client; neither sees gRPC, and `TransportConfig.kind` picks the transport (only
"grpc" for now; NCCL will come behind the same two functions).

gRPC here means: one channel per peer, reused by every call (HTTP/2 multiplexes concurrent calls over
it); unary calls issued as futures, so a router fans out to all the shards of a layer and then waits
for all; tensors as raw bytes (cluster.codec, never pickle); a deadline on every call; the same
message-size limit on both ends. Servers check every request before their handler sees it.

Peers prove they belong to the same pipeline with a shared secret, `TransportConfig.token`: the Client
sends it as metadata on every call, and the server refuses a call without it (UNAUTHENTICATED) before
it decodes a byte. start_workers generates one per pipeline replica and hands it to the attention
actors, the expert shards and the router through Ray's control plane. An empty token (tests that start
servers by hand) checks nothing. The token authenticates; it does not encrypt: the channels are
plaintext, so on a network where others can read the traffic the data plane also needs TLS (not built).

Shapes: T new tokens of a step, D model dim, R expert rows of a request.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import secrets
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from types import SimpleNamespace

import grpc
import torch

from cluster.codec import DTYPES, decode, encode
from cluster.rpc import dataplane_pb2 as pb
from cluster.rpc import dataplane_pb2_grpc as rpc
from kernels.cache import StepSeq

log = logging.getLogger(__name__)

KINDS = ("grpc",)
TOKEN_METADATA = "moeray-dataplane-token"  # the call metadata carrying TransportConfig.token


@dataclass
class TransportConfig:
    """How actors and routers talk on the data plane; one per pipeline, the same on both ends."""

    kind: str = "grpc"  # which transport; only "grpc" so far
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


def with_token(config: TransportConfig) -> TransportConfig:
    """`config` itself if it has a token, else a copy with a fresh one (32 random bytes, URL-safe): what a
    pipeline replica gives all of its actors, so they accept calls from each other and no one else."""
    return config if config.token else dataclasses.replace(config, token=secrets.token_urlsafe(32))


AttentionHandler = Callable[[int, int, "list[StepSeq] | None", torch.Tensor], torch.Tensor]
"""(step, layer, seqs or None when the request carries none, hidden [T, D]) -> hidden [T, D]."""
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


class Server:
    def __init__(self, server: grpc.Server, address: str):
        self._server = server
        self.address = address  # "host:port" actually bound (peers of a 0.0.0.0 server need the node's IP)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls; in-flight ones get `grace` seconds (None: cancelled now)."""
        self._server.stop(grace).wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _options(config: TransportConfig) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", config.max_bytes), ("grpc.max_receive_message_length", config.max_bytes)]


def _unary(name: str, body: Callable):
    """A gRPC method running `body(request) -> reply`, with exceptions turned into status codes:
    ValueError (CodecError included) and KeyError mean the request was wrong -> INVALID_ARGUMENT;
    anything else is this server's fault -> INTERNAL, logged. Either way the server keeps serving."""

    def method(request, context):
        try:
            return body(request)
        except (ValueError, KeyError) as e:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, e.args[0] if isinstance(e, KeyError) and e.args else e
        except Exception as e:
            log.exception("%s failed", name)
            code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
        context.abort(code, f"{name}: {message}")  # raises; outside the except so no chained traceback

    return method


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
    limit = config.max_bytes

    def forward_attention(request: pb.AttentionRequest) -> pb.AttentionReply:
        hidden = decode(request.hidden, max_bytes=limit, ndim=2)  # [T, D]
        seqs = [StepSeq(list(s.block_table), s.start, s.n) for s in request.seqs] or None
        if seqs is not None:
            if any(s.start < 0 or s.n < 0 or min(s.block_table, default=0) < 0 for s in seqs):
                raise ValueError("seqs need start >= 0, n >= 0 and block ids >= 0")
            if (n := sum(s.n for s in seqs)) != hidden.shape[0]:
                raise ValueError(f"seqs have {n} new tokens in all, hidden has {hidden.shape[0]} rows")
        out = attention(request.step, request.layer, seqs, hidden)
        reply = pb.AttentionReply()
        encode(_checked(out, hidden), reply.hidden)
        return reply

    def forward_experts(request: pb.ExpertRequest) -> pb.ExpertReply:
        rows = decode(request.rows, max_bytes=limit, ndim=2)  # [R, D]
        blocks = [(b.expert, b.rows) for b in request.blocks]
        counts = [n for _, n in blocks]
        if any(n < 0 for n in counts) or sum(counts) != rows.shape[0]:
            raise ValueError(f"block row counts {counts} sum to {sum(counts)}, rows tensor has {rows.shape[0]} rows")
        reply = pb.ExpertReply()
        encode(_checked(experts(request.layer, blocks, rows), rows), reply.rows)
        return reply

    if not config.token and config.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("data plane on %s without a token: any peer that reaches it can call it", config.host)
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
    return Server(server, f"{host}:{bound}")


# ---- client ----------------------------------------------------------------------------------------


class Pending:
    """A call in flight. result() waits for the reply and decodes it: decoding happens only there,
    in the caller's thread, after the caller has issued all the calls it wants to overlap."""

    __slots__ = ("_future", "_field", "_shape", "_client")

    def __init__(self, future: grpc.Future, field: str, shape: torch.Size, client: Client):
        self._future, self._field, self._shape, self._client = future, field, shape, client

    def result(self) -> torch.Tensor:
        """The reply tensor, with the request's shape; TransportError if the call or its reply is bad."""
        try:
            reply = self._future.result()
        except grpc.RpcError as e:
            raise TransportError(e.code().name, f"{self._client.address}: {e.details()}") from e
        try:
            return decode(getattr(reply, self._field), max_bytes=self._client._max_bytes, ndim=2,
                          dims=dict(enumerate(self._shape)))
        except ValueError as e:
            raise TransportError("INTERNAL", f"{self._client.address}: bad reply: {e}") from e


class Client:
    """Calls one peer over one long-lived channel; safe to use from several threads."""

    def __init__(self, config: TransportConfig, address: str):
        self.address = address
        self._timeout, self._max_bytes = config.timeout_s, config.max_bytes
        self._metadata = ((TOKEN_METADATA, config.token),) if config.token else None  # on every call
        self._channel = grpc.insecure_channel(address, options=_options(config))
        self._attention = rpc.AttentionStub(self._channel).Forward
        self._experts = rpc.ExpertShardStub(self._channel).Forward
        self._echo = rpc.EchoStub(self._channel).Echo

    def attention(self, step: int, layer: int, seqs: list[StepSeq] | None, hidden: torch.Tensor) -> Pending:
        """Send hidden [T, D] to layer `layer`; seqs None (or []) arrives as None."""
        wire = [pb.StepSeq(block_table=s.block_table, start=s.start, n=s.n) for s in seqs or ()]
        request = pb.AttentionRequest(step=step, layer=layer, seqs=wire)
        encode(hidden, request.hidden)
        return self._call(self._attention, request, "hidden", hidden.shape)

    def experts(self, layer: int, blocks: list[tuple[int, int]], rows: torch.Tensor) -> Pending:
        """Send rows [R, D], in blocks of (expert, row count), to this shard's experts of `layer`."""
        wire = [pb.ExpertBlock(expert=e, rows=n) for e, n in blocks]
        request = pb.ExpertRequest(layer=layer, blocks=wire)
        encode(rows, request.rows)
        return self._call(self._experts, request, "rows", rows.shape)

    def echo(self, data: bytes) -> bytes:
        """Round trip `data` through the peer's Echo service, blocking: the benchmarks' baseline."""
        try:
            return self._echo(pb.EchoMessage(data=data), timeout=self._timeout, metadata=self._metadata).data
        except grpc.RpcError as e:
            raise TransportError(e.code().name, f"{self.address}: {e.details()}") from e

    def _call(self, method, request, field: str, shape: torch.Size) -> Pending:
        return Pending(method.future(request, timeout=self._timeout, metadata=self._metadata), field, shape, self)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(config: TransportConfig, address: str) -> Client:
    """A client for the server at `address` ("host:port"); connects lazily, on the first call."""
    _check_kind(config)
    return Client(config, address)
