"""Paged KV cache, with a rolling buffer for sliding-window attention.

KV memory is one pool of fixed-size blocks per layer, allocated once from the config, so it is
bounded; a sequence owns a block table and gives its blocks back when it ends. Its *ring* is
`len(block_table) * block_size` slots, and position p lives at ring index `p % ring`:
- no sliding window: the table covers the whole sequence (ring >= length), so nothing wraps;
- sliding window W: the table covers W rounded up to whole blocks, and old positions are
  overwritten in place (Mistral-7B's rolling buffer). Attention masks by position, never by slot.

Who owns what: the scheduler owns block tables (kernels/blocks.py); whoever runs attention owns the
pool (KVCache) and receives tables through AttentionMetadata. In the single-process engine both
are local; in the pipeline the router schedules and the attention actors hold the pools.

Shapes: B sequences in the step, N most new tokens of one sequence, C most cached slots of one
sequence, T new tokens in all, S = num_blocks * block_size pool slots, KV kv-heads, hd head_dim.
"""

from __future__ import annotations

import array
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

import torch


def longs(values: Iterable[int]) -> torch.Tensor:
    """int64 [n] of `values`, made on CPU from a buffer: 1.3 us where torch.tensor(list) takes 4.6 (9.7 at 40 values),
    and a decode step makes a few (its tokens, the rows it samples, what its metadata is made of)."""
    buf = array.array("q", values)
    return torch.frombuffer(buf, dtype=torch.int64) if buf else torch.empty(0, dtype=torch.int64)


def blocks_for(num_tokens: int, block_size: int, window: int | None) -> int:
    """Blocks a sequence of `num_tokens` needs: all of it, or only its window (rolling buffer)."""
    tokens = num_tokens if window is None else min(num_tokens, window)
    return -(-tokens // block_size)


def ring_positions(length: int, ring: int) -> torch.Tensor:
    """The position held at each ring index after positions 0..length-1 were written; -1 if empty.

    Position p is written at index p % ring, so index i holds the latest q < length with
    q = i (mod ring), that is q = (length - 1) - ((length - 1 - i) mod ring).
    Example, ring 8 (window 6 in blocks of 4 -> 2 blocks):
        length 5   -> [0, 1, 2, 3, 4, -1, -1, -1]
        length 11  -> [8, 9, 10, 3, 4, 5, 6, 7]     (positions 0..2 were overwritten by 8..10)
    With ring >= length (no window) this is just [0, 1, ..., length-1, -1, ...].
    """
    i = torch.arange(ring)
    q = (length - 1) - torch.remainder(length - 1 - i, ring)
    return torch.where(q >= 0, q, -1)


def _slots(block_table: list[int], block_size: int) -> torch.Tensor:
    """Pool slot of every ring index: [ring]."""
    table = torch.tensor(block_table, dtype=torch.long)
    return (table[:, None] * block_size + torch.arange(block_size)).flatten()


@dataclass
class StepSeq:
    """One sequence's part of a step: its block table, tokens already cached, tokens new this step."""

    block_table: list[int]
    start: int
    n: int


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, built once and shared by all layers.

    New tokens of all sequences are flat ([T, ...]); attention pads them to [B, N] and puts each
    sequence's cached ring [C] in front of its new keys, with a mask built from positions.
    """

    positions: torch.Tensor  # [T] position of each new token
    q_index: torch.Tensor  # [B, N] flat token index of each (sequence, new token); pads -> 0
    unpad: torch.Tensor  # [T] index into the flattened [B * N] of each token
    ctx_slots: torch.Tensor  # [B, C] pool slot of each cached ring index; pads -> 0
    mask: torch.Tensor  # [B, 1, N, C + N] True = may attend
    write_slots: torch.Tensor  # [W] pool slot to write ...
    write_index: torch.Tensor  # [W] ... with this new token's k/v

    @classmethod
    def build(cls, seqs: list[StepSeq], block_size: int, window: int | None) -> AttentionMetadata:
        B, N = len(seqs), max(s.n for s in seqs)
        C = max((len(s.block_table) * block_size if s.start else 0) for s in seqs)
        far = window if window is not None else 1 << 62  # a key this far back is out of the window
        mask = torch.ones(B, N, C + N, dtype=torch.bool)  # padded query rows attend to all: no NaN
        q_index = torch.zeros(B, N, dtype=torch.long)
        ctx_slots = torch.zeros(B, C, dtype=torch.long)
        positions, unpad, write_slots, write_index = [], [], [], []
        t = 0
        for b, s in enumerate(seqs):
            ring = len(s.block_table) * block_size
            assert s.start + s.n <= ring or window is not None, "block table too short"
            slots = _slots(s.block_table, block_size)  # [ring]
            qpos = torch.arange(s.start, s.start + s.n)  # [n]
            mask[b, : s.n] = False
            if s.start:
                kpos = ring_positions(s.start, ring)  # [ring]
                ctx_slots[b, :ring] = slots
                mask[b, : s.n, :ring] = (kpos >= 0) & (qpos[:, None] - kpos < far)
            mask[b, : s.n, C : C + s.n] = (qpos[None, :] <= qpos[:, None]) & (qpos[:, None] - qpos[None, :] < far)
            q_index[b, : s.n] = torch.arange(t, t + s.n)
            unpad.append(torch.arange(b * N, b * N + s.n))
            positions.append(qpos)
            first = max(0, s.n - ring)  # only the last `ring` new tokens survive the write
            write_slots.append(slots[qpos[first:] % ring])
            write_index.append(torch.arange(t + first, t + s.n))
            t += s.n
        return cls(
            positions=torch.cat(positions),
            q_index=q_index,
            unpad=torch.cat(unpad),
            ctx_slots=ctx_slots,
            mask=mask[:, None],
            write_slots=torch.cat(write_slots),
            write_index=torch.cat(write_index),
        )

    def to(self, device: torch.device | str) -> AttentionMetadata:
        """The same metadata on `device` (built on CPU: many tiny ops; copied once per step, not per layer)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def decode_extent(seqs: list[StepSeq], block_size: int) -> tuple[list[int], list[int], int, list[list[int]]]:
    """What a decode step's metadata is made from: each sequence's position (its new token's) and ring size, C (the
    most keys a sequence reads: min(ring, position + 1)) and each block table's first ceil(C / block_size) blocks,
    0 past its end."""
    starts = [s.start for s in seqs]
    rings = [len(s.block_table) * block_size for s in seqs]
    C = max(min(r, p + 1) for p, r in zip(starts, rings, strict=True))
    width = -(-C // block_size)
    return starts, rings, C, [(s.block_table + [0] * width)[:width] for s in seqs]


@dataclass
class DecodeMetadata:
    """AttentionMetadata for a step in which every sequence has one new token (a decode step), built
    without a per-sequence loop of tensor ops: the new k/v are written to the pool first, then each
    sequence's keys are read from the pool alone, no concatenation of cached and new keys.

    Writing first is safe with one new token at position p: the slot it takes held position p - ring,
    which is unused (no window: ring > p) or out of the window (ring >= W). Its keys are the ring after
    the write, ring indices [0, C_b) with C_b = min(ring, p + 1), index i holding position
    p - ((p - i) mod ring) (ring_positions(p + 1, ring)).
    """

    positions: torch.Tensor  # [B] position of each new token
    ctx_slots: torch.Tensor  # [B, C] pool slot of each ring index, the new token's included; pads -> 0
    mask: torch.Tensor  # [B, 1, 1, C] True = may attend
    write_slots: torch.Tensor  # [B] pool slot of each new token's k/v

    @classmethod
    def build(cls, seqs: list[StepSeq], block_size: int, window: int | None) -> DecodeMetadata:
        """Per-sequence numbers in Python, then a dozen tensor ops for the whole batch (its start of every step:
        78 -> 39 us at one sequence, 116 -> 63 at 16)."""
        assert all(s.n == 1 for s in seqs), "a decode step has one new token per sequence"
        starts, rings, C, padded = decode_extent(seqs, block_size)
        assert window is not None or all(p < r for p, r in zip(starts, rings, strict=True)), "block table too short"
        tables = torch.tensor(padded)  # [B, C / block_size]
        slots = (tables[:, :, None] * block_size + torch.arange(block_size)).flatten(1)[:, :C]  # [B, C]
        i = torch.arange(C)  # [C] ring index
        p = torch.tensor(starts)  # [B]
        if window is None:  # the ring holds the whole sequence: index i holds position i, up to p
            mask = i <= p[:, None]  # [B, C]
        else:
            ring = torch.tensor(rings)  # [B]
            kpos = p[:, None] - torch.remainder(p[:, None] - i, ring[:, None])  # [B, C] position at ring index i
            mask = (i < ring[:, None]) & (kpos >= 0) & (p[:, None] - kpos < window)  # [B, C]
        at = [p % r for p, r in zip(starts, rings, strict=True)]  # ring index of each new token
        write = torch.tensor([s.block_table[w // block_size] * block_size + w % block_size
                              for s, w in zip(seqs, at, strict=True)])
        return cls(positions=p, ctx_slots=torch.where(mask, slots, 0), mask=mask[:, None, None], write_slots=write)

    def to(self, device: torch.device | str) -> DecodeMetadata:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def step_metadata(seqs: list[StepSeq], block_size: int, window: int | None) -> AttentionMetadata | DecodeMetadata:
    """The attention metadata of a step: DecodeMetadata when every sequence has one new token, else the
    general AttentionMetadata (prefill chunks, mixed steps)."""
    if all(s.n == 1 for s in seqs):
        return DecodeMetadata.build(seqs, block_size, window)
    return AttentionMetadata.build(seqs, block_size, window)


class KVCache:
    """The K and V pools of a contiguous range of layers: [layers, S, KV, hd] each."""

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, first_layer: int = 0, device: torch.device | str = "cpu"):
        shape = (n_layers, num_blocks * block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size, self.first_layer = block_size, first_layer

    @property
    def device(self) -> torch.device:
        return self.k.device

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pools of global layer i: ([S, KV, hd], [S, KV, hd])."""
        return self.k[i - self.first_layer], self.v[i - self.first_layer]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
