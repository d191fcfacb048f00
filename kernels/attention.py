"""Attention over the paged KV cache for a step of many sequences (prefill and decode mixed).

The pools may be narrower than the activations (engine.kv_cache_dtype bfloat16 with fp32 weights): k/v are
rounded to the pools' dtype when stored, and attention computes on cached keys as stored, in fp32 on CPU
(`compute_dtype`) and in the activations' dtype elsewhere; the output is cast back to q's dtype. Why fp32 on
CPU: torch's CPU SDPA in bf16 gives a sequence results that depend on how long the other sequences of its
step are (its blocking follows the padded length), so bf16 greedy tokens depended on what a request was batched
with (tests/test_engine.py::test_bf16_tokens_do_not_depend_on_batching); in fp32 such differences vanish in the
rounding back to bf16, at about 1% of a bf16 decode step (attention alone: 55 -> 66 us a layer at batch 1,
172 -> 210 at 16, 64 cached keys).
Shapes as in kernels/cache.py; H query heads, KV kv-heads (GQA: H is a multiple of KV).
"""

import torch
import torch.nn.functional as F

from kernels import native
from kernels.cache import AttentionMetadata, DecodeMetadata


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    meta: AttentionMetadata | DecodeMetadata) -> torch.Tensor:
    """q [T, H, hd], k/v [T, KV, hd] of the new tokens -> [T, H, hd]; then stores k/v in the pools.
    A decode step (DecodeMetadata) goes to decode_attention.

    Keys are each sequence's cached ring followed by its new keys; the mask (built from positions)
    does causality, the sliding window and padding. New k/v are written after attention so a
    rolling buffer that wraps within the step cannot overwrite keys this step still needs.
    """
    if isinstance(meta, DecodeMetadata):
        return decode_attention(q, k, v, k_pool, v_pool, meta)
    B, N = meta.q_index.shape
    dt = compute_dtype(q)
    keys, values = k[meta.q_index].to(dt), v[meta.q_index].to(dt)  # [B, N, KV, hd]
    if meta.ctx_slots.shape[1]:
        keys = torch.cat([gather(k_pool, meta.ctx_slots).to(dt), keys], dim=1)  # [B, C + N, KV, hd]
        values = torch.cat([gather(v_pool, meta.ctx_slots).to(dt), values], dim=1)
    out = F.scaled_dot_product_attention(
        q[meta.q_index].to(dt).transpose(1, 2),  # [B, H, N, hd]
        keys.transpose(1, 2),  # [B, KV, C + N, hd]
        values.transpose(1, 2),
        attn_mask=meta.mask,  # [B, 1, N, C + N]
        enable_gqa=True,
    )  # [B, H, N, hd]
    k_pool[meta.write_slots] = k[meta.write_index].to(k_pool.dtype)
    v_pool[meta.write_slots] = v[meta.write_index].to(v_pool.dtype)
    return out.transpose(1, 2).reshape(B * N, *q.shape[1:])[meta.unpad].to(q.dtype)  # [T, H, hd]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                     meta: DecodeMetadata) -> torch.Tensor:
    """paged_attention for one new token per sequence (T = B): writes k/v first (see DecodeMetadata),
    then reads each sequence's keys from the pool: on CPU in place by moeray's C kernel (kernels/native.py),
    else (and as the reference: decode_attention_native) one gather and SDPA. -> [B, H, hd]."""
    k_pool.index_copy_(0, meta.write_slots, k.to(k_pool.dtype))  # one slot per sequence: no two writes collide
    v_pool.index_copy_(0, meta.write_slots, v.to(v_pool.dtype))
    if q.device.type == "cpu" and (out := native.decode_attention(q, k_pool, v_pool, meta.ctx_slots,
                                                                  meta.mask[:, 0, 0])) is not None:
        return out.to(q.dtype)
    return decode_attention_native(q, k_pool, v_pool, meta)


def decode_attention_native(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            meta: DecodeMetadata) -> torch.Tensor:
    """decode_attention's reads of the pools (the new k/v already written) by a gather and torch's SDPA."""
    dt = compute_dtype(q)
    out = F.scaled_dot_product_attention(
        q[:, :, None].to(dt),  # [B, H, 1, hd]
        gather(k_pool, meta.ctx_slots).to(dt).transpose(1, 2),  # [B, KV, C, hd]
        gather(v_pool, meta.ctx_slots).to(dt).transpose(1, 2),
        attn_mask=meta.mask,  # [B, 1, 1, C]
        enable_gqa=True,
    )  # [B, H, 1, hd]
    return out[:, :, 0].to(q.dtype)


def gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """pool[slots] ([S, KV, hd] at [B, C] -> [B, C, KV, hd]) as one index_select: the same copy, 4-5x faster
    on CPU than advanced indexing at decode sizes (measured, 16 sequences x 46 slots, bf16)."""
    return pool.index_select(0, slots.flatten()).view(*slots.shape, *pool.shape[1:])


def compute_dtype(q: torch.Tensor) -> torch.dtype:
    """What attention computes in for activations like q: fp32 on CPU, q's dtype elsewhere (module docstring)."""
    return torch.float32 if q.device.type == "cpu" else q.dtype
