"""Mixtral / Mistral transformer. Module names equal Mistral's checkpoint names, so a state dict from
kernels/checkpoint.py loads as is.

Block: h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h)); feed_forward is a
MoeLayer (Mixtral) or a dense SwiGLU FeedForward (Mistral-7B). No biases anywhere.
Tokens of all sequences in a step are flat: [T, D]; attention un-flattens them through
AttentionMetadata. Shapes: T tokens, D dim, H heads, KV kv-heads, hd head_dim, V vocab, S sampled rows,
R expert rows (T * k: one per token and chosen expert, in dispatch order).

This forward is the only one, however the model is spread (gpt-fast's tp.py idea: where the parts run
is decided outside `forward`). Its seams, filled by whoever builds the model:
- layers: Transformer(layers=...) replaces the whole stack of layers with a stand-in (the pipeline's
  router: one call per attention actor, each running its range of layers);
- experts: the MoE layer's experts stage `experts(rows, blocks)`: FeedForward modules here (Experts),
  the fused kernel (kernels/fused_moe.py), or a stand-in given by Transformer(experts=...) (an attention
  actor: expert shards). A dense FFN given a stage is that stage's one expert.
Layers run by `run_layers`, on one batch or on micro-batches in ping-pong: each layer's attention of one
micro-batch runs while the other's experts are away (a stand-in whose `start` sends without waiting;
local experts simply run in turn), and the result is the same as one batch's.
Every role builds the Transformer on the meta device and loads only the tensors it holds (kernels/build.py):
the router's, built with a layers stand-in, has no layers at all; an attention actor's loads its layers'
attention, ffn_norm and gate, and the rest stay shapes, never allocated.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from kernels import native
from kernels.args import ModelArgs, MoeArgs
from kernels.attention import paged_attention
from kernels.cache import AttentionMetadata, DecodeMetadata, KVCache, StepSeq, step_metadata
from kernels.checkpoint import Checkpoint
from kernels.moe import Blocks, ExpertsStage, Wait, expert_rows, moe_start, moe_token, start
from kernels.native import AttentionWeights, LayerParts, Layers, SwiGLUWeights
from kernels.packing import (
    Fused,
    Native,
    attention_linears,
    call,
    changes,
    ffn_linears,
    fuse,
    into_huge_pages_,
    native_attention,
    native_ffns,
    native_weight,
    prepack,
    relayout,
)
from kernels.rope import apply_rope, inv_freq, rope_freqs

LayersStage = Callable[[torch.Tensor, Any], torch.Tensor]  # (h [T, D] embedded, step) -> h after every layer


def token_rows(seqs: list[StepSeq], cache: KVCache) -> list[StepSeq] | None:
    """A step as decode rows (each new token its own one-token sequence: its sequence's block table, its position,
    in the step's token order), where that is the same attention: every sequence has one new token, or, for a step of
    at most native.MAX_ROWS tokens, a prompt chunk's keys are written to the pools first and each of its tokens reads
    the keys up to its own from there, as decode does. Not where its writes would wrap its ring (a later token would
    overwrite a key an earlier one reads), nor into a pool that rounds them (a chunk's attention reads its own keys
    as computed, not as stored); else None."""
    if all(s.n == 1 for s in seqs):
        return seqs
    if (sum(s.n for s in seqs) > native.MAX_ROWS or cache.k.dtype != torch.float32
            or any(s.start + s.n > len(s.block_table) * cache.block_size for s in seqs)):
        return None
    return [StepSeq(s.block_table, s.start + i, 1) for s in seqs for i in range(s.n)]


class Step:
    """What every layer's attention reads in one step: where the step's tokens are (meta), their RoPE
    rotations (freqs) and the KV pools (cache). Built once per step, by `begin`. A step on CPU where the kernels run
    and its tokens are decode rows (token_rows: a decode step, or a small one with prompt chunks) holds `decode`
    (native.DecodeInputs), from which moeray_layers makes its metadata and RoPE in its own call; meta, freqs and
    decode_args are made from it (one C call, native.decode_meta_of) only where something else reads them (a call a
    half-layer, the torch path)."""

    def __init__(self, cache: KVCache, decode: native.DecodeInputs | None = None,
                 meta: AttentionMetadata | DecodeMetadata | None = None, freqs: torch.Tensor | None = None):
        self.cache, self.decode = cache, decode
        if decode is None:
            self.__dict__.update(meta=meta, freqs=freqs)  # meta's and freqs', made

    @classmethod
    def begin(cls, seqs: list[StepSeq], args: ModelArgs, cache: KVCache) -> Step:
        """The per-step prologue, in the single-process engine and in an attention actor alike. The
        metadata is built on CPU (many tiny ops) and copied to the cache's device once, not per layer; a step on
        CPU whose tokens are decode rows (token_rows), where the kernels run, holds what its rows' metadata is made
        of (native.decode_inputs): a prompt of up to MAX_ROWS tokens then runs as a decode step does, every layer in
        one call (a 16-token prompt with all weights W8A8: 7.8 -> 4.3 ms)."""
        if (rows := token_rows(seqs, cache)) and (step := cls.of_rows(rows, args, cache)):
            return step
        meta = step_metadata(seqs, cache.block_size, args.sliding_window).to(cache.device)
        return cls(cache, meta=meta, freqs=rope_freqs(meta.positions, args.head_dim, args.rope_theta))  # [T, hd/2]

    @classmethod
    def of_rows(cls, rows: list[StepSeq], args: ModelArgs, cache: KVCache, steps: int = 1) -> Step | None:
        """A Step holding `decode` (native.decode_inputs) for decode rows, or for `steps` decode steps of them in
        one call; None where the kernels do not run (not on CPU, no library)."""
        if cache.device.type != "cpu" or (decode := native.decode_inputs(
                rows, cache.block_size, args.sliding_window, inv_freq(args.head_dim, args.rope_theta, cache.device),
                steps)) is None:
            return None
        return cls(cache, decode)

    @functools.cached_property
    def made(self) -> tuple[DecodeMetadata, torch.Tensor, torch.Tensor]:
        """`decode`'s metadata, RoPE [B, hd/2, 2] and mask [B, C] (native.decode_meta_of)."""
        assert self.decode is not None
        return native.decode_meta_of(self.decode)

    @functools.cached_property
    def meta(self) -> AttentionMetadata | DecodeMetadata:
        return self.made[0]

    @functools.cached_property
    def freqs(self) -> torch.Tensor:  # [T, hd/2]
        return torch.view_as_complex(self.made[1])

    @functools.cached_property
    def decode_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A decode step (`decode`) as moeray's C attention block reads it, made once for all its layers: RoPE
        [B, hd/2, 2] (cos, sin), write slots [B], read slots [B, C] and mask [B, C]."""
        made, rope, mask = self.made
        return rope, made.write_slots, made.ctx_slots, mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # statistics in fp32 whatever the weights' dtype
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class Attention(nn.Module):
    packed: Fused | None = None  # wq|wk|wv in one weight (kernels/packing.py), once pack_ made it
    native: Native[AttentionWeights] | None = None  # wq, wk, wv, wo as moeray's C attention block reads them (pack_)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def native_weights(self) -> AttentionWeights | None:
        """wq, wk, wv, wo as moeray's C kernels read them, unless one was replaced since pack_ (or none)."""
        c = self.native
        return c.weights if c is not None and c.current(attention_linears(self)) else None

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata | DecodeMetadata) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.qkv(x, freqs)
        o = paged_attention(q, k, v, *kv, meta)  # [T, H, hd]
        return call(self.wo, o.reshape(T, -1))  # [T, D]

    def qkv(self, x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, D] -> q [T, H, hd], k and v [T, KV, hd], q and k rotated: one GEMV over the packed
        weight and one RoPE over q|k, or the reference path (qkv_native) if there is no packed weight."""
        f, a = self.packed, self.args
        if f is None or not f.current(self.wq, self.wk, self.wv):
            return self.qkv_native(x, freqs)
        T, H, KV, hd = x.shape[0], a.n_heads, a.n_kv_heads, a.head_dim
        y = f(x)  # [T, (H + 2 KV) hd]
        qk = apply_rope(y[:, : (H + KV) * hd].view(T, H + KV, hd), freqs)  # [T, H + KV, hd]
        return qk[:, :H], qk[:, H:], y[:, (H + KV) * hd :].view(T, KV, hd)

    def qkv_native(self, x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T, a = x.shape[0], self.args
        q = apply_rope(self.wq(x).view(T, a.n_heads, a.head_dim), freqs)  # [T, H, hd]
        k = apply_rope(self.wk(x).view(T, a.n_kv_heads, a.head_dim), freqs)  # [T, KV, hd]
        v = self.wv(x).view(T, a.n_kv_heads, a.head_dim)  # [T, KV, hd]
        return q, k, v


class FeedForward(nn.Module):
    """SwiGLU, w2(silu(w1 x) * w3 x): one Mixtral expert, or Mistral-7B's dense FFN. Calls its linears
    (not their weights), so quantized ones (kernels/quant.py) and bf16 ones prepacked for oneDNN
    (kernels/packing.py) run their own forward. Once pack_ has stacked w1|w3 (plain fp32 linears), one GEMV
    computes both; forward_native is the reference."""

    packed: Fused | None = None  # w1|w3 in one weight [2F, D] (kernels/packing.py)
    native: Native[SwiGLUWeights] | None = None  # w1, w3, w2 as moeray's C FFN reads them (fp32 or int8 on CPU; pack_)

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, D] -> [n, D]
        if (y := self.native_call(x)) is not None:
            return y
        f = self.packed
        if f is None or not f.current(self.w1, self.w3):
            return self.forward_native(x)
        gate, up = f(x).chunk(2, dim=-1)  # [n, F] each
        return call(self.w2, F.silu(gate) * up)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def native_weights(self) -> SwiGLUWeights | None:
        """w1, w3, w2 as moeray's C kernels read them, unless one was replaced since pack_ (or none)."""
        c = self.native
        return c.weights if c is not None and c.current(ffn_linears([self])) else None

    def native_call(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor | None:
        """self(x), or given `norm` the FFN half of a layer x + self(norm(x)), in one call of moeray's C FFN kernel
        where it runs (fp32 or int8 weights on CPU, up to native.MAX_ROWS rows; kernels/native.py); else None."""
        w = self.native_weights()
        return None if w is None else w.ffn(x, None if norm is None else (norm.weight, norm.eps))


class Experts(nn.ModuleList):
    """The experts stage in this process: expert e's FeedForward on its block of rows, one after another."""

    def forward(self, rows: torch.Tensor, blocks: Blocks) -> torch.Tensor:  # [R, D] -> [R, D]
        return expert_rows(rows, blocks, self)


class MoeLayer(nn.Module):
    """route -> dispatch -> experts -> combine (kernels/moe.py). As in mistral-inference, the experts are
    given: Experts, FusedExperts (kernels/fused_moe.py) or a stand-in for expert shards."""

    native: Native[SwiGLUWeights] | None = None  # the experts as moeray's C MoE kernel reads them (pack_)

    def __init__(self, experts: ExpertsStage, gate: nn.Linear, args: MoeArgs):
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.k = args.num_experts_per_tok

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        return self.start(x)()

    def start(self, x: torch.Tensor) -> Wait:  # [T, D] -> (later) [T, D]
        """Up to native.MAX_ROWS tokens (decode) take the C MoE kernel where it runs (native_call); else one
        token takes moe_token, which equals moe bit for bit in half the ops; anything else (more tokens,
        fused kernels, stand-ins) moe_start."""
        if (out := self.native_call(x)) is not None:
            return lambda: out
        if x.shape[0] == 1 and type(self.experts) is Experts:
            y = moe_token(x, self.gate.weight, self.k, self.experts)
            return lambda: y
        return moe_start(x, self.gate.weight, self.k, self.experts)

    def native_call(self, x: torch.Tensor, norm: RMSNorm | None = None) -> torch.Tensor | None:
        """self(x), or given `norm` the FFN half of a layer x + self(norm(x)), the whole layer in one call of
        moeray's C MoE kernel where it runs: the experts here (Experts), their weights read by the kernels
        (native_weights), up to native.MAX_ROWS tokens; else None."""
        w = self.native_weights()
        return None if w is None else w.moe(x, self.gate.weight, self.k,
                                            None if norm is None else (norm.weight, norm.eps))

    def native_weights(self) -> SwiGLUWeights | None:
        """The experts' weights as moeray's C kernels read them (`native`: fp32 or int8 on CPU), if the experts are
        here (Experts) and none was replaced since pack_; else None."""
        c = self.native
        if c is None or type(self.experts) is not Experts or not c.current(ffn_linears(self.experts)):
            return None
        return c.weights


class SoleExpert(nn.Module):
    """A dense FFN run by an experts stage (the pipeline's expert shards): the layer's one expert, 0, takes
    every token as a row, with weight 1."""

    def __init__(self, experts: ExpertsStage):
        super().__init__()
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]: here rows are tokens
        return self.start(x)()

    def start(self, x: torch.Tensor) -> Wait:  # [T, D] -> (later) [T, D]
        return start(self.experts, x, [(0, 0, x.shape[0])])


def feed_forward(args: ModelArgs, experts: ExpertsStage | None = None) -> nn.Module:
    """A layer's FFN half: a MoeLayer (Mixtral) or a FeedForward (Mistral-7B), with its experts here unless
    `experts` is given (then a dense FFN is that stage's sole expert)."""
    if args.moe:
        gate = nn.Linear(args.dim, args.moe.num_experts, bias=False)  # before the experts: the order of random init
        if experts is None:
            experts = Experts(FeedForward(args.dim, args.hidden_dim) for _ in range(args.moe.num_experts))
        return MoeLayer(experts, gate, args.moe)
    return FeedForward(args.dim, args.hidden_dim) if experts is None else SoleExpert(experts)


class TransformerBlock(nn.Module):
    """Layer `layer_id`: h = x + attention(attention_norm(x)), then h + feed_forward(ffn_norm(h)); given
    `experts`, a stand-in for the layer's experts, its FFN runs them (see feed_forward)."""

    def __init__(self, args: ModelArgs, layer_id: int, experts: ExpertsStage | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = feed_forward(args, experts)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        return self.start(x, step)()

    def start(self, x: torch.Tensor, step: Step) -> Wait:
        """The layer up to its experts, started: attention over the KV cache of `step`, ffn_norm, and the
        FFN started (a MoE layer: routed, its rows sent); the Wait finishes it. x [T, D] -> (later) [T, D]. On CPU
        at decode sizes the C kernels take each half of the layer in one call where they run (native_attention;
        the FFN's native_call with ffn_norm and the residual)."""
        kv = step.cache.layer(self.layer_id)
        h = self.native_attention(x, step, kv)
        if h is None:
            h = x + self.attention(self.attention_norm(x), step.freqs, kv, step.meta)  # [T, D]
        ff = self.feed_forward
        if isinstance(ff, MoeLayer | FeedForward) and (out := ff.native_call(h, self.ffn_norm)) is not None:
            return lambda: out  # h + ff(ffn_norm(h)) in one C call
        if isinstance(ff, MoeLayer | SoleExpert):
            wait = ff.start(self.ffn_norm(h))
        else:
            y = ff(self.ffn_norm(h))
            wait = lambda: y  # noqa: E731
        return lambda: h + wait()

    def native_attention(self, x: torch.Tensor, step: Step,
                         kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        """x + attention(attention_norm(x)) of a decode step on CPU by moeray's C attention block (one call:
        norm, QKV, RoPE, KV write, attention over the pools in place, wo, residual; kernels/native.py) where it
        runs: fp32, weights fp32 or int8, up to native.MAX_ROWS sequences; else None (the torch path runs)."""
        if step.decode is None or x.device.type != "cpu":
            return None
        if (w := self.attention.native_weights()) is None:
            return None
        rope, write_slots, slots, mask = step.decode_args
        return w.block(x, self.attention_norm.weight, self.attention_norm.eps, rope, *kv, write_slots, slots, mask,
                       self.attention.args.n_heads)

    def native_parts(self) -> LayerParts | None:
        """This layer as moeray_layers reads it (Transformer.native_layers): both halves' weights as the C kernels
        read them (an FFN, or a MoE layer with its experts here); else None."""
        ff = self.feed_forward
        a = self.attention.native_weights()
        f = ff.native_weights() if isinstance(ff, MoeLayer | FeedForward) else None
        if a is None or f is None:
            return None
        gate, k = (ff.gate.weight, ff.k) if isinstance(ff, MoeLayer) else (None, 0)
        return LayerParts(a, (self.attention_norm.weight, self.attention_norm.eps), f,
                          (self.ffn_norm.weight, self.ffn_norm.eps), gate, k)


class Transformer(nn.Module):
    """`layers`, when given, is a stand-in for the whole stack of layers, and the model holds none (the
    pipeline's router); `experts(i)`, when given, fills layer i's experts seam (see TransformerBlock)."""

    def __init__(self, args: ModelArgs, layers: LayersStage | None = None,
                 experts: Callable[[int], ExpertsStage] | None = None):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers_stand_in = layers
        self.layers = nn.ModuleList(() if layers else (TransformerBlock(args, i, experts(i) if experts else None)
                                                       for i in range(args.n_layers)))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self._native_layers: tuple[tuple[int, int, int], Layers | None] | None = None  # native_layers': (key, it)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype  # not the LM head's: a quantized one would dequantize to say

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(self, tokens: torch.Tensor, step: Any, logits_index: torch.Tensor) -> torch.Tensor:
        """tokens [T] new tokens of the step -> fp32 logits [S, V] of the rows in logits_index [S]. `step` goes
        to the layers: a Step (Step.begin) for layers here, what the stand-in takes otherwise."""
        if self.layers_stand_in is None and (logits := self.native_layers(tokens, step, logits_index)) is not None:
            return logits
        h = self.tok_embeddings(tokens)  # [T, D]
        if self.layers_stand_in is not None:
            h = self.layers_stand_in(h, step)
        else:
            [h] = self.run_layers([h], [step], range(len(self.layers)))
        return call(self.output, self.norm(h[logits_index])).float()  # [S, V]: the LM head only where we sample

    def native_layers(self, tokens: torch.Tensor, step: Step, logits_index: torch.Tensor) -> torch.Tensor | None:
        """A decode step on CPU from its tokens to its logits in one call of moeray's C kernels (native.Layers) where
        every layer runs them (TransformerBlock.native_parts): its layers the same bits as run_layers, which calls
        them a half-layer at a time, without Python between them; the embedding and the final norm (C's RMSNorm:
        within an ulp of torch's) without their torch ops, each slowed by the weights just streamed; the LM head
        (where the kernels read it) the same bits as its own call on those rows. tokens [B] -> fp32 logits [S, V] of
        the rows logits_index [S] (as forward); else None."""
        if (step.decode is None or (stack := self._stack(tokens, step.cache)) is None
                or (out := stack.run(tokens, step.decode, self.args.n_heads, logits_index)) is None):
            return None
        return out if stack.head is not None else call(self.output, out[logits_index]).float()

    def decode_steps(self, tokens: torch.Tensor, step: Step,
                     steps: int) -> tuple[list[list[int]], list[list[float]]] | None:
        """`steps` greedy decode steps in one call of moeray's C kernels (native.Layers.run_steps), where a step runs in
        one (native_layers, with the LM head in it): `step` holds decode_inputs(..., steps) of the sequences, tokens
        [B] the first step's -> each step's chosen tokens and their logprobs [steps][B], the same as `steps` calls of
        forward each followed by sampling's greedy path; else None."""
        if step.decode is None or (stack := self._stack(tokens, step.cache)) is None:
            return None
        return stack.run_steps(tokens, step.decode, self.args.n_heads, steps)

    def _stack(self, tokens: torch.Tensor, cache: KVCache) -> Layers | None:
        """The model's layers as one C call takes them with these KV pools (native.Layers), checked again only when
        a module of the process changed or the pools did; None where they do not run there."""
        if tokens.device.type != "cpu" or not self.layers:
            return None
        key = changes(), cache.k.data_ptr(), cache.v.data_ptr()
        if self._native_layers is None or self._native_layers[0] != key:  # a module or the cache changed: check all
            blocks: list[TransformerBlock] = list(self.layers)  # type: ignore[arg-type]  # ModuleList erases it
            parts = [p for block in blocks if (p := block.native_parts()) is not None]
            pools = [cache.layer(b.layer_id) for b in blocks]
            self._native_layers = key, Layers.of(parts, [k for k, _ in pools], [v for _, v in pools],
                                                 self.tok_embeddings.weight, (self.norm.weight, self.norm.eps),
                                                 native_weight(self.output)) if len(parts) == len(blocks) else None
        return self._native_layers[1]

    def run_layers(self, hs: list[torch.Tensor], steps: list[Step], layers: Iterable[int]) -> list[torch.Tensor]:
        """Runs `layers` (consecutive) on micro-batches: hs[i] [T_i, D] the hidden states of the tokens in
        steps[i], each micro-batch's sequences disjoint from the others'. Ping-pong: layer l of micro-batch i
        starts once layer l - 1 of it has finished, and that wait comes after the other micro-batches have
        started layer l - 1, so with experts away (a stand-in) one micro-batch's attention runs while the
        others' experts compute. One micro-batch is the plain layer-by-layer forward."""
        waits: list[Wait | None] = [None] * len(hs)
        hs = list(hs)
        for l in layers:
            for i, wait in enumerate(waits):
                if wait is not None:
                    hs[i] = wait()
                block: TransformerBlock = self.layers[l]  # type: ignore[assignment]  # ModuleList erases it
                waits[i] = block.start(hs[i], steps[i])
        return [h if wait is None else wait() for h, wait in zip(hs, waits, strict=True)]


def pack_(module: nn.Module, experts: bool = True) -> nn.Module:
    """Packs the loaded weights of `module` (a Transformer, a role's part of one, a FeedForward) for fast
    CPU decode, in place (kernels/packing.py): wq|wk|wv and w1|w3 fused into one weight each, other plain
    linears in the fast layout; in bf16 on CPU every linear is held prepacked for oneDNN instead (the fused ones
    as one stack, their parts PackedParts; the others PackedLinears: no Parameter, so not in state_dict), but
    for experts when `experts` is False (a fused expert kernel reads their nn.Linear weights). Where moeray's C
    kernels read the final weights (fp32 or int8 on CPU: kernels/native.py), each Attention, FeedForward and
    MoeLayer with its experts here gets them as `native` (their decode path). Every CPU weight but an embedding
    table's then lives in one mapping advised for transparent huge pages (packing.into_huge_pages_; a weight
    replaced later leaves its bytes there until the others go). Names, shapes and values unchanged; call it after
    loading (and quantizing), on the weights' final device. Returns `module`."""
    for m in list(module.modules()):
        if isinstance(m, Attention):
            m.packed = fuse(m, ("wq", "wk", "wv"))
            _prepack(m, "wo")
        elif isinstance(m, FeedForward):
            m.packed = fuse(m, ("w1", "w3"), prepacked=experts)
            if experts:
                _prepack(m, "w2")
        elif isinstance(m, Transformer):
            _prepack(m, "output")
    fused = [f for m in module.modules() if (f := getattr(m, "packed", None))]
    in_stacks = {id(p) for f in fused for p in f.parts}
    for m in module.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in in_stacks:
            relayout(m)
    # the streamed weights: not an embedding table's (a row a token; safetensors' file pages, as read)
    into_huge_pages_([*(t for m in module.modules() if not isinstance(m, nn.Embedding)
                        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))),
                      *(f.weight for f in fused if isinstance(f.weight, torch.Tensor))])
    for m in module.modules():  # after fusing and moving: the C kernels read the final weights, where they are
        if isinstance(m, FeedForward):
            m.native = native_ffns([m])
        elif isinstance(m, Attention):
            m.native = native_attention(m)
        elif isinstance(m, MoeLayer) and type(m.experts) is Experts:
            m.native = native_ffns(list(m.experts))
    return module


def _prepack(owner: nn.Module, name: str) -> None:
    """Replaces `owner`'s linear `name` by a PackedLinear if it can be one (bf16 on CPU)."""
    if (packed := prepack(getattr(owner, name))) is not None:
        setattr(owner, name, packed)


def expert_prefix(args: ModelArgs, layer: int, expert: int) -> str:
    """Checkpoint prefix of one expert's FeedForward; a dense model's FFN is its layer's only expert."""
    if args.moe:
        return f"layers.{layer}.feed_forward.experts.{expert}."
    if expert != 0:
        raise ValueError(f"a dense model has one FFN per layer (expert 0), not expert {expert}")
    return f"layers.{layer}.feed_forward."


M = TypeVar("M", bound=nn.Module)


def build(cls: type[M], *args, **kwargs) -> M:
    """A module on the meta device: shapes only, to be filled by load_into."""
    with torch.device("meta"):
        return cls(*args, **kwargs)


def load_into(module: nn.Module, checkpoint: Checkpoint, prefix: str = "", dtype: torch.dtype = torch.float32,
              progress: Callable[[int, int], None] | None = None, device: torch.device | str = "cpu",
              names: Iterable[str] | None = None) -> nn.Module:
    """Fills a module built on the meta device (no random init, no double memory) with the checkpoint's
    tensors `prefix + name`, reading only those, straight to `device`. Any module whose names are
    checkpoint names works: the whole model, one expert (prefix ".../experts.5."). `names`: only these
    of the module's names (a role holding part of a model): the others stay on the meta device."""
    held = list(module.state_dict())
    if names is not None:
        names = list(names)
        if unknown := sorted(set(names) - set(held)):
            raise KeyError(f"{type(module).__name__} has no tensors {unknown}")
        held = names
    tensors = checkpoint.load([prefix + n for n in held], dtype=dtype, progress=progress, device=device)
    module.load_state_dict({n: tensors[prefix + n] for n in held}, strict=names is None, assign=True)
    return module.eval()
