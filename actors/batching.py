"""Cross-caller batching for an expert shard: calls for the same layer that wait at the same moment run as
one compute, so each expert does one bigger GEMM instead of one per caller.

Many attention actors (one pool of shards serves several pipeline replicas, and each actor has two
micro-batches in flight) call a shard at once, on the data-plane server's threads. The shard computes
one batch at a time. The caller of the oldest waiting call leads: it takes every waiting call of its
layer, lays their rows out by expert (ascending; within an expert, callers in arrival order), runs the
layer's experts stage once in its own thread, and hands each caller its rows back in the caller's order.
Calls that arrive meanwhile wait for the next batch; calls of other layers too (oldest first, so none
starves). A call that finds nothing computing leads at once: a lone call waits for nothing, and no
timer or thread of its own is involved.

Each row's result depends only on that row mathematically (per-row matmuls and elementwise ops), so a
batched call gets what it would get alone up to float rounding, not bitwise: GEMMs round a row differently
with the number of rows around it (measured on CPU, fp32: MKL's reference path and Triton's interpreted
kernel, full and int8 / int4 experts alike, about 3e-7 of the output's scale). A lone call is the unbatched
compute exactly.
Shapes: R rows of one call, M merged rows of a batch, D model dim.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import groupby

import torch

from kernels.moe import Blocks, blocks_of

Run = Callable[[torch.Tensor, Blocks], torch.Tensor]  # a layer's experts stage: rows [M, D] -> [M, D]


@dataclass(eq=False)
class _Call:
    layer: int
    blocks: list[tuple[int, int]]  # (expert, row count), the rows of each block consecutive
    rows: torch.Tensor  # [R, D]
    done: bool = False
    out: torch.Tensor | None = None  # [R, D]
    error: BaseException | None = None


class Batcher:
    """`batcher(layer, blocks, rows)` computes `run[layer](rows, blocks_of(blocks))`, batched with the calls
    of the same layer waiting at that moment (see the module docstring). `run` is read at each compute, so
    it may be a dict the shard fills or changes later."""

    def __init__(self, run: Mapping[int, Run]):
        self.run = run
        self._cond = threading.Condition()
        self._waiting: list[_Call] = []  # arrival order
        self._computing = False
        self._calls = self._batches = self._gemms = self._rows = 0
        self._busy_s = 0.0

    def __call__(self, layer: int, blocks: list[tuple[int, int]], rows: torch.Tensor) -> torch.Tensor:
        """rows [R, D] -> [R, D]. The caller has checked the call (its experts are in run[layer], the
        counts sum to R): a bad call fails alone, before it is queued with others."""
        call, batch = _Call(layer, blocks, rows), None
        with self._cond:
            self._waiting.append(call)
            while not call.done and (self._computing or self._waiting[0] is not call):
                self._cond.wait()
            if not call.done:  # the oldest call, nothing computing: lead a batch of its layer
                batch = [c for c in self._waiting if c.layer == layer]
                self._waiting = [c for c in self._waiting if c.layer != layer]
                self._computing = True
        if batch is not None:
            self._lead(layer, batch)
        if call.error is not None:
            raise call.error
        assert call.out is not None
        return call.out

    def _lead(self, layer: int, batch: list[_Call]) -> None:
        """Compute `batch` (outside the lock: others queue meanwhile), then hand out the results and wake
        everyone: the callers of this batch return, the oldest other call leads next."""
        t0 = time.perf_counter()
        gemms = rows = 0
        try:
            with torch.inference_mode():
                outs, gemms, rows = self._compute(self.run[layer], batch)
            for c, out in zip(batch, outs, strict=True):
                c.out = out
        except BaseException as e:  # every caller of the batch raises it; the shard keeps serving
            for c in batch:
                c.error = e
        busy = time.perf_counter() - t0
        with self._cond:
            for c in batch:
                c.done = True
            self._computing = False
            self._calls += len(batch)
            self._batches += 1
            self._gemms += gemms
            self._rows += rows
            self._busy_s += busy
            self._cond.notify_all()

    @staticmethod
    def _compute(run: Run, batch: list[_Call]) -> tuple[list[torch.Tensor], int, int]:
        """Each call's output, and the batch's (expert GEMMs, rows)."""
        if len(batch) == 1:  # as unbatched: no copies
            c = batch[0]
            return [run(c.rows, blocks_of(c.blocks))], len({e for e, n in c.blocks if n}), c.rows.shape[0]
        pieces = []  # (expert, first row in the concatenation of all calls' rows, count)
        first = 0
        for c in batch:
            pieces += [p for p in blocks_of(c.blocks, first) if p[2]]
            first += c.rows.shape[0]
        pieces.sort(key=lambda p: p[0])  # stable: callers in arrival order within each expert
        counts = [(e, sum(n for _, _, n in ps)) for e, ps in groupby(pieces, key=lambda p: p[0])]
        every = torch.cat([c.rows for c in batch])  # [sum R, D]
        order = torch.cat([torch.arange(s, s + n) for _, s, n in pieces] or [torch.arange(0)]).to(every.device)  # [M]
        merged = run(every.index_select(0, order), blocks_of(counts))  # [M, D]
        out = merged.new_empty(every.shape)
        out.index_copy_(0, order, merged)  # every row back where its call had it
        return list(out.split([c.rows.shape[0] for c in batch])), len(counts), merged.shape[0]

    def stats(self) -> dict:
        """calls, batches, rows and expert_gemms (in all), rows_per_expert_call (mean rows an expert's GEMM
        took), callers_per_batch, busy_s."""
        with self._cond:
            return {"calls": self._calls, "batches": self._batches, "rows": self._rows, "expert_gemms": self._gemms,
                    "rows_per_expert_call": self._rows / self._gemms if self._gemms else 0.0,
                    "callers_per_batch": self._calls / self._batches if self._batches else 0.0,
                    "busy_s": self._busy_s}

    def waiting(self) -> int:
        """Calls queued behind the batch computing now."""
        with self._cond:
            return len(self._waiting)
