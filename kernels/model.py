"""Mixtral / Mistral transformer. Module names equal Mistral's checkpoint names, so a state dict from
kernels/checkpoint.py loads as is.

Block: h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h)); feed_forward is a
MoeLayer (Mixtral) or a dense SwiGLU FeedForward (Mistral-7B). No biases anywhere.
Tokens of all sequences in a step are flat: [T, D]; attention un-flattens them through
AttentionMetadata. Shapes: T tokens, D dim, H heads, KV kv-heads, hd head_dim, V vocab, S sampled rows.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kernels.args import ModelArgs
from kernels.attention import paged_attention
from kernels.cache import AttentionMetadata, KVCache
from kernels.checkpoint import Checkpoint
from kernels.moe import Blocks, expert_rows, moe
from kernels.rope import apply_rope, rope_freqs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in fp32 whatever the weights' dtype
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        T, a = x.shape[0], self.args
        q = apply_rope(self.wq(x).view(T, a.n_heads, a.head_dim), freqs)  # [T, H, hd]
        k = apply_rope(self.wk(x).view(T, a.n_kv_heads, a.head_dim), freqs)  # [T, KV, hd]
        v = self.wv(x).view(T, a.n_kv_heads, a.head_dim)  # [T, KV, hd]
        o = paged_attention(q, k, v, *kv, meta)  # [T, H, hd]
        return self.wo(o.reshape(T, -1))  # [T, D]


class FeedForward(nn.Module):
    """SwiGLU, w2(silu(w1 x) * w3 x): one Mixtral expert, or Mistral-7B's dense FFN. Calls its linears
    (not their weights), so quantized ones (kernels/quant.py) run their own forward."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoeLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.k = args.moe.num_experts_per_tok
        self.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(args.dim, args.hidden_dim) for _ in range(args.moe.num_experts))
        # run(rows, blocks) -> out: the experts stage; kernels.fused_moe.use_kernel swaps in the fused one
        self.run_experts: Callable[[torch.Tensor, Blocks], torch.Tensor] = partial(expert_rows, experts=self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moe(x, self.gate.weight, self.k, self.run_experts)


class AttentionBlock(nn.Module):
    """The attention half of a layer: h = x + attention(attention_norm(x)). What an attention actor hosts."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)

    def forward(self, x, freqs, kv, meta) -> torch.Tensor:
        return x + self.attention(self.attention_norm(x), freqs, kv, meta)


class TransformerBlock(AttentionBlock):
    """A whole layer: the attention half, then h + feed_forward(ffn_norm(h))."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoeLayer(args) if args.moe else FeedForward(args.dim, args.hidden_dim)

    def forward(self, x, freqs, kv, meta) -> torch.Tensor:
        h = super().forward(x, freqs, kv, meta)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.output.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.output.weight.device

    def forward(self, tokens: torch.Tensor, meta: AttentionMetadata, cache: KVCache,
                logits_index: torch.Tensor) -> torch.Tensor:
        """tokens [T] new tokens of the step -> fp32 logits [S, V] of the rows in logits_index [S]."""
        freqs = rope_freqs(meta.positions, self.args.head_dim, self.args.rope_theta)  # [T, hd/2]
        h = self.tok_embeddings(tokens)  # [T, D]
        for i, layer in enumerate(self.layers):
            h = layer(h, freqs, cache.layer(i), meta)
        return self.output(self.norm(h[logits_index])).float()  # [S, V]: the LM head only where we sample

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32,
                        progress: Callable[[int, int], None] | None = None,
                        device: torch.device | str = "cpu") -> Transformer:
        return load_into(build(cls, checkpoint.args), checkpoint, dtype=dtype, progress=progress, device=device)


class RouterLayer(nn.Module):
    """What the router needs of a layer: ffn_norm and, for MoE, the gate (names as in the checkpoint)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = nn.Module()
        if args.moe:
            self.feed_forward.gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)


class RouterPart(nn.Module):
    """The weights of the model that are neither attention nor experts: embeddings, per-layer ffn_norm
    and gate, final norm and LM head. The pipeline's router holds these."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(RouterLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)


def expert_prefix(args: ModelArgs, layer: int, expert: int) -> str:
    """Checkpoint prefix of one expert's FeedForward; a dense model's FFN is its layer's only expert."""
    if args.moe:
        return f"layers.{layer}.feed_forward.experts.{expert}."
    if expert != 0:
        raise ValueError(f"a dense model has one FFN per layer (expert 0), not expert {expert}")
    return f"layers.{layer}.feed_forward."


def build(cls: type[nn.Module], *args) -> nn.Module:
    """A module on the meta device: shapes only, to be filled by load_into."""
    with torch.device("meta"):
        return cls(*args)


def load_into(module: nn.Module, checkpoint: Checkpoint, prefix: str = "", dtype: torch.dtype = torch.float32,
              progress: Callable[[int, int], None] | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """Fills a module built on the meta device (no random init, no double memory) with the checkpoint's
    tensors `prefix + name`, reading only those, straight to `device`. Any module whose names are
    checkpoint names works: the whole model, one AttentionBlock (prefix "layers.3."), one expert
    (prefix ".../experts.5.")."""
    names = list(module.state_dict())
    tensors = checkpoint.load([prefix + n for n in names], dtype=dtype, progress=progress, device=device)
    module.load_state_dict({n: tensors[prefix + n] for n in names}, strict=True, assign=True)
    return module.eval()
