"""KV cache index math: the rolling buffer and the step's attention mask, against brute force."""

import random

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import paged_attention
from kernels.blocks import BlockPool, CacheFull, block_names
from kernels.cache import AttentionMetadata, DecodeMetadata, StepSeq, blocks_for, ring_positions, step_metadata


def test_ring_positions_docstring_example():
    assert ring_positions(5, 8).tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    assert ring_positions(11, 8).tolist() == [8, 9, 10, 3, 4, 5, 6, 7]
    assert ring_positions(0, 4).tolist() == [-1, -1, -1, -1]


def test_blocks_for_window():
    assert blocks_for(100, 16, None) == 7
    assert blocks_for(100, 16, 40) == 3
    assert blocks_for(10, 16, 40) == 1


def test_allocator_bounds():
    a = BlockPool(4)
    got = a.allocate(3)
    with pytest.raises(CacheFull):
        a.allocate(2)
    a.free(got)
    assert a.num_free == 4


def test_block_names_chain_from_position_zero():
    a, b = block_names(list(range(10)), 4, []), block_names([9] + list(range(1, 10)), 4, [])
    assert len(a) == 2 and len(set(a + b)) == 4  # one token differs in block 0: every later name differs too
    assert block_names(list(range(10)), 4, a[:1]) == a  # extended from a prefix of names
    assert block_names([0, 1, 2, 3, 0, 1, 2, 3], 4, [])[1] != block_names([0, 1, 2, 3], 4, [])[0]


def test_prefix_blocks_are_shared_counted_and_evicted_least_recent_first():
    pool = BlockPool(4)
    names = block_names(list(range(12)), 4, [])
    first = pool.allocate(3)
    for block, name in zip(first, names, strict=True):
        pool.name(block, name)
    assert pool.lookup(names) == first
    assert pool.lookup(block_names([99] + list(range(1, 12)), 4, [])) == []  # names chain from position 0
    pool.take(pool.lookup(names[:2]))  # a second sequence shares the first two blocks
    pool.free(first)  # the first sequence ends: its third block is cached, unreferenced; the two are still held
    assert pool.num_free == 2 and pool.unreferenced(first) == 1
    assert pool.lookup(names) == first  # still named
    other = pool.allocate(2)  # the free block first, then the cached one (evicted: it forgets its name)
    assert first[2] in other and pool.lookup(names) == first[:2]
    pool.free(other)
    pool.free(first[:2])
    assert pool.num_free == 4 and pool.lookup(names) == first[:2]
    pool.forget()
    assert pool.lookup(names) == [] and pool.num_free == 4


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
    alloc = BlockPool(200)
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
