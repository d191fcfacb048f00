"""KV cache index math: the rolling buffer and the step's attention mask, against brute force."""

import random

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import paged_attention
from kernels.cache import (
    AttentionMetadata,
    BlockAllocator,
    CacheFull,
    DecodeMetadata,
    StepSeq,
    blocks_for,
    ring_positions,
    step_metadata,
)


def test_ring_positions_docstring_example():
    assert ring_positions(5, 8).tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    assert ring_positions(11, 8).tolist() == [8, 9, 10, 3, 4, 5, 6, 7]
    assert ring_positions(0, 4).tolist() == [-1, -1, -1, -1]


def test_blocks_for_window():
    assert blocks_for(100, 16, None) == 7
    assert blocks_for(100, 16, 40) == 3
    assert blocks_for(10, 16, 40) == 1


def test_allocator_bounds():
    a = BlockAllocator(4)
    got = a.allocate(3)
    with pytest.raises(CacheFull):
        a.allocate(2)
    a.free(got)
    assert a.num_free == 4


@pytest.mark.parametrize("window", [None, 5, 12])
def test_paged_attention_equals_full_attention(window):
    """Random sequences fed in random chunks through the paged cache == one masked attention over
    each whole sequence (causal + sliding window), computed directly."""
    rnd = random.Random(window or 0)
    torch.manual_seed(0)
    H, KV, hd, bs = 4, 2, 8, 4
    lengths = [rnd.randint(1, 30) for _ in range(5)]
    q_all = [torch.randn(n, H, hd) for n in lengths]
    k_all = [torch.randn(n, KV, hd) for n in lengths]
    v_all = [torch.randn(n, KV, hd) for n in lengths]
    pool_k, pool_v = torch.zeros(200 * bs, KV, hd), torch.zeros(200 * bs, KV, hd)
    alloc = BlockAllocator(200)
    tables = [alloc.allocate(blocks_for(n, bs, window)) for n in lengths]
    done, out = [0] * len(lengths), [[] for _ in lengths]
    while any(d < n for d, n in zip(done, lengths, strict=True)):
        live = [i for i, (d, n) in enumerate(zip(done, lengths, strict=True)) if d < n and rnd.random() < 0.8]
        if not live:
            continue
        chunk = {i: rnd.randint(1, lengths[i] - done[i]) for i in live}
        meta = AttentionMetadata.build([StepSeq(tables[i], done[i], chunk[i]) for i in live], bs, window)
        sl = {i: slice(done[i], done[i] + chunk[i]) for i in live}
        o = paged_attention(torch.cat([q_all[i][sl[i]] for i in live]), torch.cat([k_all[i][sl[i]] for i in live]),
                            torch.cat([v_all[i][sl[i]] for i in live]), pool_k, pool_v, meta)
        for i, part in zip(live, o.split([chunk[i] for i in live]), strict=True):
            out[i].append(part)
            done[i] += chunk[i]
    for i, n in enumerate(lengths):
        pos = torch.arange(n)
        allowed = (pos[None] <= pos[:, None]) & ((pos[:, None] - pos[None]) < (window or n + 1))
        ref = F.scaled_dot_product_attention(q_all[i].transpose(0, 1), k_all[i].transpose(0, 1),
                                             v_all[i].transpose(0, 1), attn_mask=allowed, enable_gqa=True)
        torch.testing.assert_close(torch.cat(out[i]), ref.transpose(0, 1))


@pytest.mark.parametrize("window", [None, 5, 12])
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_decode_path_equals_general_path(window, batch):
    """A decode step (one new token per sequence) through DecodeMetadata == through the general
    AttentionMetadata: same output, same pools after. Cached lengths 0..40 (windows wrap), scattered
    block tables, sequences of unequal context side by side."""
    rnd = random.Random(batch)
    torch.manual_seed(batch)
    H, KV, hd, bs = 4, 2, 8, 4
    free = list(range(1, 400))  # block 0 is also the padding slot: no table holds it here
    rnd.shuffle(free)  # scattered tables, not in allocation order
    cached = [rnd.randint(0, 40) for _ in range(batch)]
    tables = [[free.pop() for _ in range(blocks_for(c + rnd.randint(1, 9), bs, window))] for c in cached]
    pool = torch.randn(400 * bs, KV, hd), torch.randn(400 * bs, KV, hd)  # garbage where nothing was written
    seqs = [StepSeq(t, c, 1) for t, c in zip(tables, cached, strict=True)]
    q, k, v = torch.randn(len(seqs), H, hd), torch.randn(len(seqs), KV, hd), torch.randn(len(seqs), KV, hd)
    meta = step_metadata(seqs, bs, window)
    assert isinstance(meta, DecodeMetadata)
    fast_pools, ref_pools = [p.clone() for p in pool], [p.clone() for p in pool]
    fast = paged_attention(q, k, v, *fast_pools, meta)
    ref = paged_attention(q, k, v, *ref_pools, AttentionMetadata.build(seqs, bs, window))
    torch.testing.assert_close(fast, ref)
    for a, b in zip(fast_pools, ref_pools, strict=True):
        assert torch.equal(a, b)
