"""Cross-caller batching in an expert shard (actors/batching.py): calls for the same layer that wait at the
same moment run as one compute per expert, each caller getting exactly what it would have got alone; a lone
call computes at once in its caller's thread; layers are never mixed; a bad call fails alone.

The shard is a real ExpertShard in this process (the tiny Mixtral, reference kernel, fp32) behind its real
data-plane server, called by real transport clients from threads. A Gate around the shard's experts stage
holds the first compute, so the calls sent meanwhile queue behind it (which is when batching happens);
the test waits until the shard counts them queued, then lets the compute go. No sleeps in the batcher.
"""

import threading
import time
from concurrent import futures
from dataclasses import dataclass
from functools import partial

import pytest
import torch

from actors.common import WorkerSpec
from actors.expert_shard import ExpertShard
from cluster.dataplane.transport import TransportConfig, TransportError, connect
from kernels.engine import EngineConfig
from kernels.moe import blocks_of

PAIRS = [(0, 1), (0, 4), (0, 6), (1, 2), (1, 5)]  # layer 0: experts 1, 4, 6; layer 1: 2, 5
DIM = 64  # the tiny Mixtral's


def make_rows(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


@dataclass
class Compute:
    """One run of a layer's experts stage, as the Gate saw it."""

    layer: int
    thread: int
    blocks: list  # (expert, first row, count)
    rows: torch.Tensor  # [M, D]
    out: torch.Tensor | None = None  # [M, D]


class Gate:
    """Wraps each layer's experts stage of `shard`: records every compute, holds the first until `release`
    is set and fails the computes numbered in `fail` (0 the first)."""

    def __init__(self, shard: ExpertShard, fail: tuple[int, ...] = ()):
        self.computes: list[Compute] = []
        self.entered, self.release, self.fail = threading.Event(), threading.Event(), fail
        for layer, run in list(shard.run.items()):
            shard.run[layer] = partial(self._run, layer, run)  # the batcher reads shard.run at each compute

    def _run(self, layer, run, rows, blocks):
        compute = Compute(layer, threading.get_ident(), list(blocks), rows.clone())
        self.computes.append(compute)
        if len(self.computes) == 1:
            self.entered.set()
            self.release.wait(60)  # a hang guard only: the test sets it
        if len(self.computes) - 1 in self.fail:
            raise RuntimeError("kernel exploded")
        compute.out = run(rows, blocks)
        return compute.out


def assert_batched(compute: Compute, calls: list, alone) -> None:
    """`calls` [((blocks, rows), output)] were computed as this one batch: every row of theirs went to its
    own expert's block of the batch, and its output is, bit for bit, the batch's output for that row. And
    each output is what the call gets alone, to float rounding: CPU GEMMs (MKL) round a row differently
    with the number of rows around it (1e-6 relative), so batched results are not bitwise the unbatched ones.
    `alone(layer, blocks, rows)`: the call's output alone."""
    expert_at = [e for e, _, n in compute.blocks for _ in range(n)]  # the batch's rows' experts
    assert compute.out is not None and len(expert_at) == sum(rows.shape[0] for (_, rows), _ in calls)
    for (blocks, rows), out in calls:
        for row, expert, got in zip(rows, [e for e, n in blocks for _ in range(n)], out, strict=True):
            [at] = [i for i, r in enumerate(compute.rows) if torch.equal(r, row)]  # random rows: all distinct
            assert expert_at[at] == expert and torch.equal(got, compute.out[at])
        torch.testing.assert_close(out, alone(compute.layer, blocks, rows), rtol=1e-4, atol=1e-4)


def until(check, what: str, seconds: float = 60):
    """Wait (polling) for `check()`: the calls to queue in another thread. A hang guard, not a timing check."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


class Callers:
    """Calls to `shard` over a real transport client, each from a thread of its own."""

    def __init__(self, shard: ExpertShard, config: TransportConfig):
        self.shard, self.client = shard, connect(config, shard.address())
        self.pool = futures.ThreadPoolExecutor(8)
        self.alone = {l: run for l, run in shard.run.items()}  # the unbatched stages, before any Gate wraps them

    def expected(self, layer: int, blocks, rows: torch.Tensor) -> torch.Tensor:
        """What the call computes alone: the layer's experts stage on its rows only."""
        with torch.inference_mode():
            return self.alone[layer](rows, blocks_of(blocks))

    def send(self, layer: int, blocks, rows: torch.Tensor, barrier: threading.Barrier | None = None):
        def call():
            if barrier is not None:
                barrier.wait()
            return self.client.experts(layer, blocks, rows).result()

        return self.pool.submit(call)

    def queued(self, layer: int, blocks, rows: torch.Tensor):
        """Send a call and return once the shard has queued it (behind a held compute)."""
        n = self.shard.batcher.waiting()
        future = self.send(layer, blocks, rows)
        until(lambda: self.shard.batcher.waiting() == n + 1, f"layer {layer}'s call to queue")
        return future

    def close(self):
        self.pool.shutdown()
        self.client.close()


@pytest.fixture
def kind() -> str:
    return "tcp"  # the default; tests about the calls themselves run on both kinds that carry the bytes


BOTH_KINDS = pytest.mark.parametrize("kind", ["tcp", "grpc"])


@pytest.fixture
def shard(hf_mixtral, kind):
    config = TransportConfig(kind=kind, timeout_s=60, token="the-pipeline-token")
    s = ExpertShard(WorkerSpec(str(hf_mixtral), EngineConfig(), config, torch.get_num_threads()), PAIRS)
    callers = Callers(s, config)
    yield s, callers
    callers.close()
    s.server.stop()


@BOTH_KINDS
def test_same_layer_calls_waiting_together_run_as_one_batch(shard):
    """Three callers queue (at once, from a barrier) behind a held compute: one compute serves them all, one
    GEMM per expert over all their rows (the layer's experts ascending), each row's result handed back to
    its caller. The held call ran alone: bit for bit its unbatched result."""
    s, callers = shard
    gate = Gate(s)
    first = ([(4, 3), (1, 2)], make_rows(5, 0))
    first_call = callers.send(0, *first)
    assert gate.entered.wait(60)
    queued = [([(1, 5), (6, 1)], make_rows(6, 1)), ([(6, 4), (4, 2), (1, 1)], make_rows(7, 2)),
              ([(4, 6)], make_rows(6, 3))]
    barrier = threading.Barrier(len(queued))
    calls = [callers.send(0, *c, barrier=barrier) for c in queued]
    until(lambda: s.batcher.waiting() == len(queued), "three calls to queue")
    gate.release.set()
    outs = [call.result() for call in calls]
    assert torch.equal(first_call.result(), callers.expected(0, *first))
    # expert 1: 5 + 1 rows, expert 4: 2 + 6, expert 6: 1 + 4, whatever order the three arrived in
    assert [c.blocks for c in gate.computes] == [blocks_of(first[0]), blocks_of([(1, 6), (4, 8), (6, 5)])]
    assert_batched(gate.computes[1], list(zip(queued, outs, strict=True)), callers.expected)
    info = s.info()
    assert {k: info[k] for k in ("calls", "batches", "callers_per_batch", "rows_per_expert_call")} == {
        "calls": 4, "batches": 2, "callers_per_batch": 2.0, "rows_per_expert_call": (5 + 19) / (2 + 3)}


def test_a_lone_call_computes_at_once_in_its_own_thread(shard):
    """Nothing queued, nothing computing: the call leads its own batch of one in the caller's thread, never
    waits on the batcher's condition and starts no thread; its result is bit for bit the unbatched one."""
    s, callers = shard
    gate = Gate(s)
    gate.release.set()

    class Counted(threading.Condition):
        waits = 0

        def wait(self, timeout=None):
            Counted.waits += 1
            return super().wait(timeout)

    s.batcher._cond = Counted()
    threads = set(threading.enumerate())
    blocks, rows = [(5, 3), (2, 4)], make_rows(7, 4)
    assert torch.equal(s.forward(1, blocks, rows), callers.expected(1, blocks, rows))
    assert [(c.layer, c.thread, c.blocks) for c in gate.computes] == [(1, threading.get_ident(), blocks_of(blocks))]
    assert Counted.waits == 0 and set(threading.enumerate()) == threads
    assert (s.info()["batches"], s.info()["callers_per_batch"]) == (1, 1.0)


def test_calls_of_different_layers_are_not_merged(shard):
    """Queued in the order layer 1, layer 0, layer 1 behind a held layer-0 compute: the oldest call's layer
    goes next, with the other call of its layer; then the layer-0 call alone. One layer per batch."""
    s, callers = shard
    gate = Gate(s)
    held = ([(1, 2)], make_rows(2, 5))
    first = callers.send(0, *held)
    assert gate.entered.wait(60)
    x, y, z = ([(5, 2), (2, 1)], make_rows(3, 6)), ([(6, 3)], make_rows(3, 7)), ([(2, 4)], make_rows(4, 8))
    calls = [callers.queued(1, *x), callers.queued(0, *y), callers.queued(1, *z)]
    gate.release.set()
    assert torch.equal(first.result(), callers.expected(0, *held))
    assert torch.equal(calls[1].result(), callers.expected(0, *y))
    assert [(c.layer, c.blocks) for c in gate.computes] == [
        (0, blocks_of([(1, 2)])), (1, blocks_of([(2, 5), (5, 2)])), (0, blocks_of([(6, 3)]))]
    assert_batched(gate.computes[1], [(x, calls[0].result()), (z, calls[2].result())], callers.expected)
    assert (s.info()["calls"], s.info()["batches"]) == (4, 3)


@BOTH_KINDS
def test_a_bad_call_fails_alone_and_at_once(shard):
    """Calls naming an expert the shard lacks, or rows of the wrong dim, get INVALID_ARGUMENT while the good
    calls queued beside them still wait (they are refused before queueing); the good ones then succeed."""
    s, callers = shard
    gate = Gate(s)
    held = ([(4, 2)], make_rows(2, 9))
    first = callers.send(0, *held)
    assert gate.entered.wait(60)
    good = [([(6, 2), (1, 1)], make_rows(3, 10)), ([(1, 4)], make_rows(4, 11))]
    calls = [callers.queued(0, *g) for g in good]
    with pytest.raises(TransportError) as missing:
        callers.send(0, [(1, 1), (2, 2)], make_rows(3, 12)).result()
    assert missing.value.code == "INVALID_ARGUMENT"
    assert "experts [2] of layer 0 are not on this shard" in missing.value.message
    with pytest.raises(TransportError) as wrong_dim:
        callers.send(0, [(1, 2)], torch.zeros(2, DIM // 2)).result()
    assert wrong_dim.value.code == "INVALID_ARGUMENT"
    assert "rows have dim 32, the model has 64" in wrong_dim.value.message
    assert not any(c.done() for c in [first, *calls]) and s.batcher.waiting() == len(good)
    gate.release.set()
    outs = [c.result() for c in calls]
    assert torch.equal(first.result(), callers.expected(0, *held))
    assert_batched(gate.computes[1], list(zip(good, outs, strict=True)), callers.expected)
    assert (s.info()["calls"], s.info()["batches"]) == (3, 2)


def test_a_failed_batch_fails_each_of_its_callers_and_the_shard_keeps_serving(shard):
    """The batched compute raises: both callers of that batch get the error (INTERNAL); the held call before
    it and a call after it succeed."""
    s, callers = shard
    gate = Gate(s, fail=(1,))
    held = ([(6, 1)], make_rows(1, 13))
    first = callers.send(0, *held)
    assert gate.entered.wait(60)
    doomed = [callers.queued(0, [(1, 2)], make_rows(2, 14)), callers.queued(0, [(4, 3)], make_rows(3, 15))]
    gate.release.set()
    assert torch.equal(first.result(), callers.expected(0, *held))
    for call in doomed:
        with pytest.raises(TransportError) as failed:
            call.result()
        assert failed.value.code == "INTERNAL" and "kernel exploded" in failed.value.message
    after = ([(5, 2)], make_rows(2, 16))
    assert torch.equal(callers.send(1, *after).result(), callers.expected(1, *after))
    assert (s.info()["calls"], s.info()["batches"]) == (4, 3)
