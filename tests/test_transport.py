"""The data plane through real servers on loopback, of both kinds that carry the tensors in their
messages (gRPC, and frames over plain TCP: each test that starts a server runs for both), the codec,
and the committed stubs.

Malformed requests go straight to the server, bypassing Client (RawPeer), as a buggy or hostile peer
would send them; after each one the same server must still answer a good request exactly. The servers
here have a pipeline token, as every server of a real pipeline has; calls without it are refused.
"""

import dataclasses
import logging
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.dataplane import stream
from cluster.dataplane.codec import CodecError, decode, encode
from cluster.dataplane.transport import (
    TOKEN_METADATA,
    BadRequest,
    TransportConfig,
    TransportError,
    connect,
    flush,
    serve,
    with_token,
)
from cluster.rpc import dataplane_pb2 as pb
from kernels.cache import StepSeq

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
MB = 1 << 20
TWO = [StepSeq([0], 0, 2)]  # one sequence of two new tokens: the seqs of a [2, D] attention call
CONFIG = TransportConfig(max_message_mb=1, timeout_s=10, token="the-pipeline-token")
SLOW_LAYER, BAD_REQUEST_LAYER, RUNTIME_ERROR_LAYER, KEY_ERROR_LAYER = 99, 98, 97, 96


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def expected_experts(layer: int, blocks: list[tuple[int, int]], rows: torch.Tensor) -> torch.Tensor:
    """What `Shard` returns: each block's rows * 2 + layer + expert, so a block mix-up shows."""
    out, start = torch.empty_like(rows), 0
    for e, n in blocks:
        out[start : start + n] = rows[start : start + n] * 2 + (layer + e)
        start += n
    return out


class Shard:
    """Expert and attention handlers that record what arrived; some layers misbehave on purpose."""

    def __init__(self):
        self.seen = []
        self.release = threading.Event()  # lets SLOW_LAYER's handler end early at teardown

    def _misbehave(self, layer):
        if layer == SLOW_LAYER:
            self.release.wait(5)
        if layer == BAD_REQUEST_LAYER:
            raise BadRequest("layer 98 is not on this shard")
        if layer == RUNTIME_ERROR_LAYER:
            raise RuntimeError("kernel exploded")
        if layer == KEY_ERROR_LAYER:  # a bug: looking up something of its own that is not there
            raise KeyError("layer 96's weights")

    def experts(self, layer, blocks, rows):
        self.seen.append((layer, blocks, rows.clone()))
        self._misbehave(layer)
        return expected_experts(layer, blocks, rows)

    def attention(self, step, layer, seqs, hidden):
        self.seen.append((step, layer, seqs, hidden.clone()))
        self._misbehave(layer)
        return hidden - layer, {"expert_rows": [len(seqs), 0, 2], "round_trips": layer, "placement_version": 2**40}


@pytest.fixture(scope="module", params=["grpc", "tcp"])
def config(request):
    """CONFIG, of each kind in turn."""
    return dataclasses.replace(CONFIG, kind=request.param)


@pytest.fixture(scope="module")
def shard(config):
    shard = Shard()
    server = serve(config, attention=shard.attention, experts=shard.experts)
    shard.address = server.address
    yield shard
    shard.release.set()
    server.stop()


@pytest.fixture(scope="module")
def client(config, shard):
    with connect(config, shard.address) as client:
        yield client


class RawPeer:
    """A peer we do not control: it sends the bytes it is given, with no size limit, on a gRPC channel
    of its own (no serializers) or a TCP connection of its own per call, after a hello with `token`
    (None: no token at all; on TCP, no hello). Each call returns (status code name, details)."""

    PATHS = {"experts": "/moeray.dataplane.v1.ExpertShard/Forward",
             "attention": "/moeray.dataplane.v1.Attention/Forward"}
    METHODS = {"experts": stream.EXPERTS, "attention": stream.ATTENTION}

    def __init__(self, kind: str, address: str):
        self.kind, self.address = kind, address
        self.channel = grpc.insecure_channel(address) if kind == "grpc" else None

    def experts(self, request: pb.ExpertRequest) -> tuple[str, str]:
        return self.send("experts", request.SerializeToString())

    def attention(self, request: pb.AttentionRequest) -> tuple[str, str]:
        return self.send("attention", request.SerializeToString())

    def send(self, service: str, payload: bytes, token: str | None = CONFIG.token) -> tuple[str, str]:
        if self.kind == "grpc":
            metadata = None if token is None else ((TOKEN_METADATA, token),)
            try:
                self.channel.unary_unary(self.PATHS[service])(payload, timeout=10, metadata=metadata)
            except grpc.RpcError as e:
                return e.code().name, e.details()
            return "OK", ""
        host, port = self.address.rsplit(":", 1)
        hello = b"" if token is None else stream.MAGIC + len(token).to_bytes(2, "little") + token.encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(hello + stream.FRAME.pack(len(payload), self.METHODS[service]) + payload)
            with sock.makefile("rb") as reader:
                n, status = stream.FRAME.unpack(reader.read(stream.FRAME.size))
                return stream.CODES[status], reader.read(n).decode()

    def close(self):
        if self.channel is not None:
            self.channel.close()


@pytest.fixture(scope="module")
def raw(config, shard):
    peer = RawPeer(config.kind, shard.address)
    yield peer
    peer.close()


# ---- round trips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_round_trip_is_bit_exact(client, shard, dtype):
    rows = torch.randn(7, 16).to(dtype)
    blocks = [(0, 3), (5, 0), (6, 4)]
    out = client.experts(3, blocks, rows).result()
    layer, seen_blocks, seen_rows = shard.seen[-1]
    assert (layer, seen_blocks) == (3, blocks) and same_bits(seen_rows, rows)
    assert same_bits(out, expected_experts(3, blocks, rows))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_round_trip_carries_seqs(client, shard, dtype):
    hidden = torch.randn(5, 8).to(dtype)
    seqs = [StepSeq([4, 0, 7], 17, 1), StepSeq([2], 0, 4)]
    out, report = client.attention(2**40, 1, seqs, hidden).result()
    step, layer, seen_seqs, seen_hidden = shard.seen[-1]
    assert (step, layer, seen_seqs) == (2**40, 1, seqs) and all(type(s) is StepSeq for s in seen_seqs)
    assert same_bits(seen_hidden, hidden) and same_bits(out, hidden - 1)
    # the step's report comes back with every field, those the handler left out as zeros
    assert report == {"expert_rows": [2, 0, 2], "calls": 0, "round_trips": 1, "retries": 0, "recoveries": 0,
                      "placement_version": 2**40, "collective_calls": 0, "collective_peers": 0,
                      "micro_batches": 0}


def test_empty_and_non_contiguous_tensors(client):
    assert client.experts(0, [], torch.empty(0, 4)).result().shape == (0, 4)
    rows = torch.randn(8, 6)[::2, 1:]  # [4, 5], strided
    assert same_bits(client.experts(1, [(2, 4)], rows).result(), expected_experts(1, [(2, 4)], rows.contiguous()))


def test_echo_returns_the_same_bytes(client):
    data = torch.randint(0, 256, (100_000,), dtype=torch.uint8).numpy().tobytes()
    assert client.echo(data) == data and client.echo(b"") == b""


def test_fan_out_to_four_servers_runs_concurrently(config):
    """Each handler waits on a 4-party barrier, so the calls only succeed if all 4 are in flight at
    once: the client must not block on a call before issuing the next (a deterministic check)."""
    barrier = threading.Barrier(4, timeout=5)

    def scaled(k):
        def handler(layer, blocks, rows):
            barrier.wait()
            return rows * k + layer
        return handler

    servers = [serve(config, experts=scaled(k)) for k in range(1, 5)]
    clients = [connect(config, s.address) for s in servers]
    try:
        rows = [torch.randn(3, 4) for _ in servers]
        pending = [c.experts(7, [(0, 3)], r) for c, r in zip(clients, rows, strict=True)]
        for k, (p, r) in enumerate(zip(pending, rows, strict=True), start=1):
            assert same_bits(p.result(), r * k + 7)
    finally:
        for c in clients:
            c.close()
        for s in servers:
            s.stop()


@pytest.fixture
def threads_started_here(monkeypatch):
    """The threads this test's own thread starts from now on (servers start theirs from their own)."""
    caller, started = threading.current_thread(), []
    start = threading.Thread.start

    def recording(thread):
        if threading.current_thread() is caller:
            started.append(thread.name)
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recording)
    return started


def test_several_threads_share_a_client(config):
    """Four threads call one server through one client at once; the handler waits on a 4-party barrier,
    so they only succeed if all 4 calls are in flight together (gRPC: on one channel; tcp: on 4 pooled
    connections)."""
    barrier = threading.Barrier(4, timeout=5)

    def handler(layer, blocks, rows):
        barrier.wait()
        return rows + layer

    with serve(config, experts=handler) as server, connect(config, server.address) as shared:
        got = {}

        def call(k):
            got[k] = shared.experts(k, [(0, 2)], torch.ones(2, 3)).result()

        callers = [threading.Thread(target=call, args=(k,)) for k in range(4)]
        for t in callers:
            t.start()
        for t in callers:
            t.join()
        assert sorted(got) == [0, 1, 2, 3] and all(same_bits(got[k], torch.ones(2, 3) + k) for k in got)


def test_calls_start_no_thread_per_call(config, shard, threads_started_here):
    """A call waited for at once runs in the caller's thread, and a fan-out's overlapping calls go from a
    pool started once (kind tcp starts none); gRPC futures would start a polling thread per call
    (~0.3 ms each)."""
    with connect(config, shard.address) as a, connect(config, shard.address) as b:
        rows = torch.randn(3, 8)

        def fan_out():
            for p in [a.experts(1, [(0, 3)], rows), b.experts(2, [(0, 3)], rows)]:
                p.result()

        fan_out()  # may start the pool's thread
        pool = list(threads_started_here)
        for layer in range(10):
            assert same_bits(a.experts(layer, [(0, 3)], rows).result(), expected_experts(layer, [(0, 3)], rows))
            fan_out()
    assert threads_started_here == pool and len(pool) <= 1, threads_started_here


def test_a_call_dropped_unsent_is_never_sent_and_any_thread_may_wait(config, client, shard):
    """gRPC: the latest call a thread issued waits unsent for the next call or a wait: if its caller drops
    it first, nobody can wait for it, so it never reaches the server."""
    if config.kind != "grpc":
        pytest.skip("kind tcp sends each call as it is issued")
    rows = torch.randn(2, 8)
    seen = len(shard.seen)
    client.experts(5, [(0, 2)], rows)  # dropped: not sent ...
    pending = client.experts(6, [(0, 2)], rows)  # ... not even when the next call is issued
    got = []
    waiter = threading.Thread(target=lambda: got.append(pending.result()))
    waiter.start()
    waiter.join()
    assert same_bits(got[0], expected_experts(6, [(0, 2)], rows))
    assert [layer for layer, _, _ in shard.seen[seen:]] == [6]


def test_flush_sends_a_call_before_anyone_waits_for_it(client, shard):
    """Two micro-batches: an attention actor computes one half's attention while the other half's expert
    calls are away, so they must leave when issued, not when waited for (gRPC's latest call otherwise waits)."""
    rows = torch.randn(2, 8)
    seen = len(shard.seen)
    pending = client.experts(7, [(0, 2)], rows)
    flush()
    deadline = time.monotonic() + 10
    while len(shard.seen) == seen:  # the server runs it while nobody waits
        assert time.monotonic() < deadline, "the call was not sent"
        time.sleep(0.01)
    assert shard.seen[-1][0] == 7 and same_bits(pending.result(), expected_experts(7, [(0, 2)], rows))


# ---- errors ----------------------------------------------------------------------------------------


def tensor(shape, data=None, dtype=pb.DTYPE_FLOAT32):
    return pb.Tensor(dtype=dtype, shape=shape, data=bytes(4 * 4 * 8) if data is None else data)


def good_rows():
    return tensor([4, 8], torch.arange(32, dtype=torch.float32).numpy().tobytes())


BAD_EXPERT_REQUESTS = {
    "unknown dtype": (pb.ExpertRequest(blocks=[pb.ExpertBlock(rows=4)], rows=tensor([4, 8], dtype=77)),
                      "unknown tensor dtype 77"),
    "no tensor": (pb.ExpertRequest(blocks=[pb.ExpertBlock(rows=4)]), "unknown tensor dtype 0"),
    "bytes mismatch": (pb.ExpertRequest(blocks=[pb.ExpertBlock(rows=4)], rows=tensor([4, 8], bytes(100))),
                       "tensor data has 100 bytes, shape [4, 8] float32 needs 128"),
    "negative dim": (pb.ExpertRequest(rows=tensor([-4, -8], b"")), "tensor shape [-4, -8] has a negative dim"),
    "rank 3": (pb.ExpertRequest(blocks=[pb.ExpertBlock(rows=4)], rows=tensor([4, 8, 1])), "has rank 3"),
    "huge shape": (pb.ExpertRequest(rows=tensor([2**40, 2**40], b"\0")),
                   "needs 4835703278458516698824704 bytes, over the limit of 1048576"),
    "counts": (pb.ExpertRequest(blocks=[pb.ExpertBlock(expert=1, rows=1), pb.ExpertBlock(expert=2, rows=2)],
                                rows=good_rows()), "block row counts [1, 2] sum to 3, rows tensor has 4 rows"),
    "negative count": (pb.ExpertRequest(blocks=[pb.ExpertBlock(rows=5), pb.ExpertBlock(rows=-1)], rows=good_rows()),
                       "block row counts [5, -1]"),
    "handler BadRequest": (pb.ExpertRequest(layer=BAD_REQUEST_LAYER, blocks=[pb.ExpertBlock(rows=4)], rows=good_rows()),
                           "layer 98 is not on this shard"),
}


def assert_still_serving(client):
    rows = torch.randn(4, 8)
    assert same_bits(client.experts(2, [(1, 1), (3, 3)], rows).result(), expected_experts(2, [(1, 1), (3, 3)], rows))


@pytest.mark.parametrize("case", BAD_EXPERT_REQUESTS)
def test_bad_expert_request_is_invalid_argument(raw, client, case):
    request, message = BAD_EXPERT_REQUESTS[case]
    code, details = raw.experts(request)
    assert code == "INVALID_ARGUMENT" and message in details, details
    assert_still_serving(client)


@pytest.mark.parametrize("seqs, message", [
    ([pb.StepSeq(n=3)], "seqs have 3 new tokens in all, hidden has 4 rows"),
    ([pb.StepSeq(n=4, start=-1)], "start >= 0"),
    ([pb.StepSeq(n=4, block_table=[1, -2])], "block ids >= 0"),
])
def test_bad_attention_request_is_invalid_argument(raw, client, seqs, message):
    code, details = raw.attention(pb.AttentionRequest(seqs=seqs, hidden=good_rows()))
    assert code == "INVALID_ARGUMENT" and message in details, details
    assert_still_serving(client)


def test_oversized_message_is_resource_exhausted(raw, client):
    big = tensor([MB // 32 + 8, 8], bytes((MB // 32 + 8) * 32))  # just over 1 MiB of data
    code, _ = raw.experts(pb.ExpertRequest(blocks=[pb.ExpertBlock(rows=MB // 32 + 8)], rows=big))  # the server refuses
    assert code == "RESOURCE_EXHAUSTED"
    with pytest.raises(TransportError) as e:  # refused by Client's own channel before sending
        client.experts(0, [(0, MB // 32 + 8)], torch.zeros(MB // 32 + 8, 8)).result()
    assert e.value.code == "RESOURCE_EXHAUSTED"
    assert_still_serving(client)


def test_handler_errors_map_to_status_codes(client, raw):
    with pytest.raises(TransportError) as e:
        client.experts(BAD_REQUEST_LAYER, [(0, 2)], torch.zeros(2, 8)).result()
    assert e.value.code == "INVALID_ARGUMENT" and "layer 98 is not on this shard" in e.value.message
    assert_still_serving(client)
    for send in (lambda: client.experts(RUNTIME_ERROR_LAYER, [(0, 2)], torch.zeros(2, 8)).result(),
                 lambda: client.attention(0, RUNTIME_ERROR_LAYER, TWO, torch.zeros(2, 8)).result()):
        with pytest.raises(TransportError) as e:
            send()
        assert e.value.code == "INTERNAL" and "RuntimeError: kernel exploded" in e.value.message
        assert_still_serving(client)


@pytest.mark.parametrize("service", ["experts", "attention"])
def test_a_key_error_in_a_handler_is_internal_and_logged_not_a_bad_request(client, caplog, service):
    """A KeyError (or ValueError) from a handler's own code is the server's bug, not the caller's: INTERNAL,
    which the router retries elsewhere (INVALID_ARGUMENT it would not), with the traceback in the log."""
    send = {"experts": lambda: client.experts(KEY_ERROR_LAYER, [(0, 2)], torch.zeros(2, 8)).result(),
            "attention": lambda: client.attention(0, KEY_ERROR_LAYER, TWO, torch.zeros(2, 8)).result()}[service]
    with caplog.at_level(logging.ERROR, logger="cluster.dataplane.transport"), pytest.raises(TransportError) as e:
        send()
    assert e.value.code == "INTERNAL" and "KeyError" in e.value.message and "layer 96's weights" in e.value.message
    [logged] = [r for r in caplog.records if r.name == "cluster.dataplane.transport" and r.levelno >= logging.ERROR]
    assert logged.exc_info[0] is KeyError and f"{service} failed" in logged.getMessage()
    assert_still_serving(client)


def test_handler_returning_a_wrong_shape_is_internal(config):
    with serve(config, experts=lambda layer, blocks, rows: rows[:1]) as server, connect(config, server.address) as c:
        with pytest.raises(TransportError) as e:
            c.experts(0, [(0, 3)], torch.zeros(3, 2)).result()
        assert e.value.code == "INTERNAL" and "handler returned torch.float32 [1, 2], expected" in e.value.message


def test_deadline_exceeded_leaves_the_client_usable(config, shard):
    with connect(dataclasses.replace(config, timeout_s=0.5), shard.address) as c:
        with pytest.raises(TransportError) as e:
            c.experts(SLOW_LAYER, [(0, 1)], torch.zeros(1, 8)).result()
        assert e.value.code == "DEADLINE_EXCEEDED"
        assert_still_serving(c)


def test_unknown_peer_is_unavailable_and_unknown_kind_is_refused(config):
    with serve(config) as server:
        address = server.address
    with connect(config, address) as c, pytest.raises(TransportError) as e:
        c.echo(b"x")
    assert e.value.code == "UNAVAILABLE"
    with pytest.raises(ValueError, match="unknown transport kind 'mpi'"):
        TransportConfig(kind="mpi")


# ---- the pipeline token ----------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["", "not-the-pipeline-token", CONFIG.token + "x", CONFIG.token[:-1]])
def test_a_caller_without_the_pipeline_token_is_unauthenticated(config, shard, client, token):
    """Client (Router's way of calling) with a missing or wrong token: every method refused with
    UNAUTHENTICATED (which the router does not retry); the server keeps serving its own pipeline."""
    seen = len(shard.seen)
    with connect(dataclasses.replace(config, token=token), shard.address) as stranger:
        for call in (lambda: stranger.experts(0, [(0, 2)], torch.zeros(2, 8)).result(),
                     lambda: stranger.attention(0, 0, TWO, torch.zeros(2, 8)).result(),
                     lambda: stranger.echo(b"hello")):
            with pytest.raises(TransportError) as e:
                call()
            assert e.value.code == "UNAUTHENTICATED", e.value
            assert "token" in e.value.message and CONFIG.token not in str(e.value)
    assert len(shard.seen) == seen  # no handler ran
    assert_still_serving(client)


def test_the_token_is_checked_before_the_request_is_decoded(config, raw, client):
    """Bytes that are no protobuf at all: without the token, UNAUTHENTICATED (they were never parsed);
    with it, the server gets as far as parsing them and fails there: gRPC's own "could not deserialize"
    (INTERNAL), or kind tcp's INVALID_ARGUMENT."""
    garbage = b"\xff" * 64
    parsed = {"grpc": "INTERNAL", "tcp": "INVALID_ARGUMENT"}[config.kind]
    for token, expected in ((None, "UNAUTHENTICATED"), ("wrong", "UNAUTHENTICATED"), (CONFIG.token, parsed)):
        code, details = raw.send("experts", garbage, token=token)
        assert code == expected, details
    assert_still_serving(client)


def test_a_server_restarted_on_the_same_port_is_called_again(config):
    """A client's channel (gRPC) or pooled connection (tcp) to a server that stopped is not reused as is:
    a new server on the same port answers the next call."""
    rows = torch.randn(2, 4)
    with serve(config, experts=lambda layer, blocks, rows: rows + 1) as first, connect(config, first.address) as c:
        assert same_bits(c.experts(0, [(0, 2)], rows).result(), rows + 1)
        first.stop()
        port = int(first.address.rsplit(":", 1)[1])
        with serve(config, experts=lambda layer, blocks, rows: rows + 2, port=port):
            assert same_bits(c.experts(0, [(0, 2)], rows).result(), rows + 2)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.binary(max_size=64))
def test_tcp_server_survives_any_bytes_after_the_hello(shard, client, config, frames):
    """kind tcp: whatever follows a good hello (truncated or huge lengths, unknown methods, bad payloads),
    the server answers an error or drops that connection, and keeps serving others."""
    if config.kind != "tcp":
        pytest.skip("frames are kind tcp's")
    host, port = shard.address.rsplit(":", 1)
    hello = stream.MAGIC + len(CONFIG.token).to_bytes(2, "little") + CONFIG.token.encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(hello + frames)
        sock.shutdown(socket.SHUT_WR)  # a truncated frame ends here: the server sees the end, not a stall
        with sock.makefile("rb") as reader:
            while len(header := reader.read(stream.FRAME.size)) == stream.FRAME.size:
                n, status = stream.FRAME.unpack(header)
                assert status < len(stream.CODES) and len(reader.read(n)) == n
    assert_still_serving(client)


def test_with_token_makes_one_secret_per_pipeline():
    fresh = [with_token(TransportConfig(timeout_s=5)) for _ in range(2)]
    assert fresh[0].token != fresh[1].token and len(fresh[0].token) >= 43 and fresh[0].timeout_s == 5
    assert with_token(CONFIG) is CONFIG  # a configured token is kept
    assert CONFIG.token not in repr(CONFIG)  # configs get logged


# ---- codec -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_codec_round_trip(dtype):
    x = torch.randn(6, 5).to(dtype)
    for t in (x, x[:, ::2], x.t(), x[0, 0], x[:0]):  # strided, transposed, scalar, empty
        msg = encode(t)
        assert list(msg.shape) == list(t.shape) and len(msg.data) == t.numel() * t.element_size()
        assert same_bits(decode(msg, max_bytes=MB), t.contiguous())


def test_decoded_tensor_owns_its_memory():
    msg = encode(torch.ones(3))
    decode(msg, max_bytes=MB).fill_(7)  # writes into the decoded buffer ...
    assert decode(msg, max_bytes=MB).tolist() == [1.0, 1.0, 1.0]  # ... never into the message's


@pytest.mark.parametrize("msg, kwargs, message", [
    (tensor([4, 8], dtype=0), {}, "unknown tensor dtype 0"),
    (tensor([4, 8], bytes(100)), {}, "tensor data has 100 bytes, shape [4, 8] float32 needs 128"),
    (tensor([4, -8], b""), {}, "negative dim"),
    (tensor([4, 8]), dict(ndim=3), "tensor has rank 2 (shape [4, 8]), expected 3"),
    (tensor([4, 8]), dict(dims={1: 16}), "tensor shape [4, 8] should have size 16 at dim 1"),
    (tensor([4, 8]), dict(dims={2: 1}), "should have size 1 at dim 2"),
    (tensor([4, 8]), dict(max_bytes=127), "needs 128 bytes, over the limit of 127"),
    (tensor([2**40, 2**40], b""), {}, "over the limit"),
    (tensor([0, 2**62, 2**62], b""), {}, "cannot be represented"),
])
def test_codec_rejects(msg, kwargs, message):
    with pytest.raises(CodecError) as e:
        decode(msg, **{"max_bytes": MB, **kwargs})
    assert message in str(e.value)


def test_encode_rejects_unsupported_dtypes():
    with pytest.raises(CodecError, match="cannot send a torch.int64 tensor"):
        encode(torch.zeros(2, dtype=torch.long))


dims = st.one_of(st.integers(0, 5), st.integers(-(2**63), 2**63 - 1))


@settings(max_examples=300, deadline=None)
@given(dtype=st.integers(-(2**31), 2**31 - 1) | st.sampled_from([1, 2, 3]), shape=st.lists(dims, max_size=4),
       data=st.binary(max_size=64), max_bytes=st.integers(0, 128), ndim=st.none() | st.integers(0, 4))
def test_decode_returns_a_right_sized_tensor_or_raises_codec_error(dtype, shape, data, max_bytes, ndim):
    msg = pb.Tensor(dtype=dtype, shape=shape, data=data)
    try:
        t = decode(msg, max_bytes=max_bytes, ndim=ndim)
    except CodecError:
        return
    assert t.nbytes == len(data) and list(t.shape) == shape and t.view(-1).view(torch.uint8).numpy().tobytes() == data


# ---- generated stubs -------------------------------------------------------------------------------


def test_committed_stubs_equal_regenerated(tmp_path):
    pytest.importorskip("grpc_tools")
    from grpc_tools.grpc_version import VERSION as tools_version

    from cluster.rpc import dataplane_pb2_grpc
    from cluster.rpc.generate import generate

    if tools_version != dataplane_pb2_grpc.GRPC_GENERATED_VERSION:
        pytest.skip(f"stubs were generated by grpcio-tools {dataplane_pb2_grpc.GRPC_GENERATED_VERSION}, "
                    f"this is {tools_version}")
    committed = Path(dataplane_pb2_grpc.__file__).parent
    for path in generate(tmp_path):
        stale = f"{path.name} differs from a fresh generation: run python -m cluster.rpc.generate"
        assert path.read_bytes() == (committed / path.name).read_bytes(), stale
