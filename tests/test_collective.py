"""Transport kinds gloo and nccl: serve/connect with the tensors over a process group, across processes.

This process is rank 0 (the caller, as a router is); data-plane servers run in child processes, ranks
1..4 of one gloo group, plus one server outside it. Every result is compared bit for bit with the
same call over plain gRPC to the same server, and each test checks which way the tensors went.
"""

import multiprocessing as mp
import os
import signal

import pytest
import torch

from cluster.dataplane.codec import CodecError, allocate, decode, describe, encode
from cluster.dataplane.transport import (
    CALLER,
    BadRequest,
    TransportConfig,
    TransportError,
    connect,
    join,
    rendezvous,
    serve,
)
from cluster.rpc import dataplane_pb2 as pb
from kernels.cache import StepSeq

CONFIG = TransportConfig(kind="gloo", timeout_s=10, token="the-pipeline-token")
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
ERROR_LAYER = 98
HEALTHY, FAILING, KILLED, WRONG_TOKEN = 1, 2, 3, 4  # ranks, one per test that breaks a pair


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def experts(layer, blocks, rows):  # [R, D] -> [R, D]: each block scaled by its expert, plus the layer
    if layer == ERROR_LAYER:
        raise BadRequest("no such layer here")
    out, at = rows.clone(), 0
    for e, n in blocks:
        out[at : at + n] = rows[at : at + n] * (e + 1) + layer
        at += n
    return out


def attention(step, layer, seqs, hidden):  # [T, D] -> ([T, D], report)
    return hidden * 3 - step + layer * 0.5 + sum(s.start for s in seqs), {"calls": step}


def peer(conn, config):
    """A child process: a data-plane server that joins a group when told to, until told to stop."""
    torch.set_num_threads(1)
    server = serve(config, attention=attention, experts=experts)
    conn.send((server.address, os.getpid()))
    while (cmd := conn.recv())[0] == "join":
        try:
            server.join(*cmd[1:])
            conn.send(None)
        except Exception as e:
            conn.send(repr(e))
    server.stop(None)


@pytest.fixture(scope="module")
def net():
    """{"group": rank 0's group, "members": {rank: (address, pid)}, "outsider": address}."""
    ctx = mp.get_context("spawn")
    children = []
    for _ in range(5):
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=peer, args=(child, CONFIG), daemon=True)
        proc.start()
        children.append((proc, conn))
    peers = [conn.recv() for _, conn in children]
    members = children[:4]
    world = len(members) + 1
    store, address = rendezvous(CONFIG, "127.0.0.1", world)
    for rank, (_, conn) in enumerate(members, 1):
        conn.send(("join", address, world, rank))
    group = join(CONFIG, store, world, CALLER)
    assert [conn.recv() for _, conn in members] == [None] * len(members)
    yield {"group": group, "members": {rank: peers[rank - 1] for rank in range(1, world)}, "outsider": peers[4][0]}
    for proc, conn in children:
        if proc.is_alive():
            conn.send(("stop",))
            proc.join(5)
        proc.kill()


def member(net, rank, config=CONFIG):
    return connect(config, net["members"][rank][0], net["group"], rank)


def rows_of(dtype, n=6, d=16, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trips_over_the_group_are_bit_exact_with_grpc(net, dtype):
    address = net["members"][HEALTHY][0]
    with member(net, HEALTHY) as over_group, connect(CONFIG, address) as plain:
        assert over_group.collective and not plain.collective
        rows, hidden = rows_of(dtype), rows_of(dtype, n=5, seed=1)
        seqs = [StepSeq([0, 3], 4, 2), StepSeq([1], 0, 3)]
        calls = [("experts", (1, [(0, 2), (5, 4)], rows)),
                 ("experts", (0, [(3, 3)], rows.t().contiguous()[:, :3].t())),  # non-contiguous rows
                 ("attention", (7, 1, seqs, hidden)), ("attention", (8, 0, seqs, hidden))]
        for name, args in calls:
            got, want = getattr(over_group, name)(*args).result(), getattr(plain, name)(*args).result()
            if name == "attention":
                assert got[1] == want[1] and got[1]["calls"] == args[0]  # the report, beside the tensor
                got, want = got[0], want[0]
            assert same_bits(got, want), name
        assert over_group.collective_calls == len(calls) and plain.collective_calls == 0
        # no rows: nothing to move, plain gRPC
        assert over_group.experts(0, [], torch.zeros(0, 16, dtype=dtype)).result().shape == (0, 16)
        assert over_group.collective_calls == len(calls)


def test_calls_in_flight_together_on_one_pair_are_matched_by_their_tags(net):
    """Two micro-batches: an attention actor has two calls to the same shard in flight, which the shard may
    run in either order; each call's tags keep its tensors apart."""
    client = member(net, HEALTHY)
    batches = [rows_of(torch.float32, n=n, seed=n) for n in (3, 3, 5, 1)]
    pending = [client.experts(layer, [(2, len(rows))], rows) for layer, rows in enumerate(batches)]
    for layer, (rows, call) in enumerate(zip(batches, pending, strict=True)):
        assert same_bits(call.result(), rows * 3 + layer)
    assert client.collective_calls == len(batches)


def test_fan_out_to_several_members_at_once(net):
    """The router's pattern: calls to several peers in flight together, one per peer."""
    rows = rows_of(torch.float32)
    clients = [member(net, rank) for rank in (HEALTHY, FAILING)]
    pending = [c.experts(1, [(2, 6)], rows) for c in clients]
    assert all(same_bits(p.result(), rows * 3 + 1) for p in pending)
    assert [c.collective_calls for c in clients] == [1, 1]


def test_a_peer_outside_the_group_is_called_over_grpc(net):
    rows = rows_of(torch.float32)
    with connect(CONFIG, net["outsider"], net["group"], None) as c:
        assert not c.collective
        assert same_bits(c.experts(1, [(0, 6)], rows).result(), rows + 1) and c.collective_calls == 0


def test_a_failed_call_breaks_the_pair_and_the_peer_is_called_over_grpc_from_then_on(net):
    rows = rows_of(torch.float32)
    c = member(net, FAILING)
    assert same_bits(c.experts(0, [(1, 6)], rows).result(), rows * 2) and c.collective
    with pytest.raises(TransportError) as err:  # over the group, then re-sent over gRPC: the same error
        c.experts(ERROR_LAYER, [(1, 6)], rows).result()
    assert err.value.code == "INVALID_ARGUMENT" and "no such layer" in err.value.message
    assert not c.collective and not member(net, FAILING).collective  # the pair, not just this client
    calls = c.collective_calls
    assert same_bits(c.experts(1, [(1, 6)], rows).result(), rows * 2 + 1) and c.collective_calls == calls
    assert member(net, HEALTHY).collective  # other pairs are untouched


def test_the_pipeline_token_still_guards_the_call(net):
    rows = rows_of(torch.float32)
    wrong = TransportConfig(kind="gloo", timeout_s=10, token="not-the-pipeline-token")
    with pytest.raises(TransportError) as err:
        member(net, WRONG_TOKEN, wrong).experts(0, [(0, 6)], rows).result()
    assert err.value.code == "UNAUTHENTICATED"
    c = member(net, WRONG_TOKEN)  # the pair is broken (a send nobody received): gRPC, and still exact
    assert not c.collective and same_bits(c.experts(0, [(0, 6)], rows).result(), rows)


def test_a_server_that_is_not_the_rank_claimed_refuses_and_the_call_is_re_sent_over_grpc(net):
    """A worker restarted on the port of an old member, say: it has no group, so it refuses the
    collective request; the Client breaks the pair and re-sends the call with its bytes."""
    rows = rows_of(torch.float32)
    with connect(CONFIG, net["outsider"], net["group"], KILLED) as c:
        assert same_bits(c.experts(2, [(3, 6)], rows).result(), rows * 4 + 2)
        assert not c.collective and c.collective_calls == 0


def test_a_dead_member_does_not_disturb_the_others(net):
    address, pid = net["members"][KILLED]
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(TransportError) as err:
        connect(CONFIG, address).experts(0, [(0, 6)], rows_of(torch.float32)).result()
    assert err.value.code == "UNAVAILABLE"
    dead = member(net, KILLED)
    with pytest.raises(TransportError) as err:  # the group cannot post to it: the call goes over gRPC
        dead.experts(0, [(0, 6)], rows_of(torch.float32)).result()
    assert err.value.code == "UNAVAILABLE" and not dead.collective
    c = member(net, HEALTHY)
    rows = rows_of(torch.bfloat16, n=9)
    assert same_bits(c.experts(0, [(4, 9)], rows).result(), rows * 5) and c.collective_calls == 1


def test_only_rank_0_calls_and_kind_grpc_has_no_group(net):
    with pytest.raises(ValueError, match="has no collective group"):
        join(TransportConfig(), "tcp://127.0.0.1:1", 2, 1)
    with pytest.raises(ValueError, match="unknown transport kind"):
        TransportConfig(kind="mpi")
    assert TransportConfig(kind="nccl").kind == "nccl"


def test_a_collective_header_is_checked_as_bytes_are_and_never_decoded():
    msg = describe(torch.zeros(3, 4), pb.Tensor())
    assert msg.collective and not msg.data
    cpu = torch.device("cpu")
    assert allocate(msg, max_bytes=48, device=cpu, ndim=2, dims={1: 4}).shape == (3, 4)
    for kwargs, message in [(dict(max_bytes=47), "over the limit"), (dict(max_bytes=48, ndim=3), "rank 2"),
                            (dict(max_bytes=48, dims={1: 5}), "size 5")]:
        with pytest.raises(CodecError, match=message):
            allocate(msg, device=cpu, **kwargs)
    with pytest.raises(CodecError, match="sent over a collective group"):
        decode(msg, max_bytes=48)
    with pytest.raises(CodecError, match="does not announce"):
        allocate(encode(torch.zeros(3, 4)), max_bytes=48, device=cpu)


def nccl_peer(conn, config, rendezvous_address):
    torch.cuda.set_device(1)
    server = serve(config, attention=attention, experts=experts)
    conn.send(server.address)
    server.join(rendezvous_address, 2, 1)
    conn.send(None)
    conn.recv()
    server.stop(None)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between two processes needs two GPUs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nccl_round_trips_gpu_to_gpu_bit_exact_with_grpc(dtype):
    config = TransportConfig(kind="nccl", timeout_s=30, token="t")
    torch.cuda.set_device(0)
    store, address = rendezvous(config, "127.0.0.1", 2)
    conn, child = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=nccl_peer, args=(child, config, address), daemon=True)
    proc.start()
    try:
        server_address = conn.recv()
        group = join(config, store, 2, CALLER)
        assert conn.recv() is None
        rows, hidden = rows_of(dtype).cuda(), rows_of(dtype, n=5, seed=1).cuda()
        with connect(config, server_address, group, 1) as gpu, connect(config, server_address) as plain:
            got = gpu.experts(1, [(0, 2), (5, 4)], rows).result()
            assert got.device.type == "cuda" and same_bits(got.cpu(), plain.experts(1, [(0, 2), (5, 4)], rows).result())
            got, _ = gpu.attention(3, 0, [StepSeq([0], 0, 5)], hidden).result()
            assert same_bits(got.cpu(), plain.attention(3, 0, [StepSeq([0], 0, 5)], hidden).result()[0])
            assert gpu.collective_calls == 2
        conn.send("stop")
    finally:
        proc.join(10)
        proc.kill()
