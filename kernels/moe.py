"""Mixture of experts as four stages: route -> dispatch -> experts -> combine.

`moe` runs the four in a row; the experts stage is whatever the MoE layer was given (an
ExpertsStage): FeedForward modules in this process (`expert_rows`), the fused kernel, or, in the
pipeline, expert shards behind a transport, each receiving per expert it holds one contiguous block of
rows (the dispatch order is sorted by expert).

Shapes: T tokens, D model dim, F expert hidden dim, E experts, k experts per token, R = T * k rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

Blocks = list[tuple[int, int, int]]  # (expert, first row, row count): one expert's contiguous rows
ExpertsStage = Callable[[torch.Tensor, Blocks], torch.Tensor]  # rows [R, D] in blocks -> [R, D], same order
Wait = Callable[[], torch.Tensor]  # waits for a result started earlier and returns it


def blocks_of(counts: Iterable[tuple[int, int]], first: int = 0) -> Blocks:
    """(expert, row count) of consecutive blocks -> (expert, first row, row count), the first block at
    row `first`: [(3, 2), (0, 4)] -> [(3, 0, 2), (0, 2, 4)]. Dispatch order, and an expert shard's
    message (which names its blocks by count only), both lay rows out this way."""
    out = []
    for e, n in counts:
        out.append((e, first, n))
        first += n
    return out


def route(x: torch.Tensor, gate_weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k experts per token and their weights: softmax over the k chosen logits, in fp32.

    Equal to softmax -> top-k -> renormalize (transformers) and to top-k -> softmax (Mistral).
    x [T, D], gate_weight [E, D] -> weights [T, k] fp32, experts [T, k] long.
    """
    logits = F.linear(x, gate_weight)  # [T, E]
    top, experts = torch.topk(logits.float(), k, dim=-1)  # [T, k]
    return torch.softmax(top, dim=-1), experts


@dataclass
class Dispatch:
    """Rows (token, choice) sorted by expert, so each expert's rows are one contiguous block."""

    token: torch.Tensor  # [R] token index of each row
    weight: torch.Tensor  # [R] routing weight of each row (fp32)
    counts: list[int]  # [E] rows per expert, in expert order

    def blocks(self) -> Blocks:
        """(expert, first row, row count) for each expert that has rows."""
        return [b for b in blocks_of(enumerate(self.counts)) if b[2]]


def dispatch(weights: torch.Tensor, experts: torch.Tensor, num_experts: int) -> Dispatch:
    """weights, experts [T, k] -> rows grouped by expert (stable: token order within an expert)."""
    k = experts.shape[1]
    flat = experts.flatten()  # [R]
    order = torch.argsort(flat, stable=True)  # [R]
    return Dispatch(
        token=order // k,
        weight=weights.flatten()[order],
        counts=torch.bincount(flat, minlength=num_experts).tolist(),
    )


ExpertFn = Callable[[torch.Tensor], torch.Tensor]


class ExpertFns(Protocol):
    """experts[e] is expert e's function: a list or nn.ModuleList of them, or a dict of the experts held."""

    def __getitem__(self, e: int, /) -> ExpertFn: ...


def expert_rows(rows: torch.Tensor, blocks: Blocks, experts: ExpertFns) -> torch.Tensor:
    """Apply each expert to its block of rows. rows [R', D] -> [R', D], same order.

    `blocks` is (expert, first row, count) relative to `rows`; `experts[e]` is expert e's function.
    """
    out = torch.empty_like(rows)
    for e, start, n in blocks:
        out[start : start + n] = experts[e](rows[start : start + n])
    return out


def combine(y: torch.Tensor, plan: Dispatch, num_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's expert outputs. y [R, D] in dispatch order -> [T, D]."""
    weighted = (y.float() * plan.weight[:, None]).to(y.dtype)  # [R, D]
    return torch.zeros(num_tokens, y.shape[1], dtype=y.dtype, device=y.device).index_add_(0, plan.token, weighted)


def start(experts: ExpertsStage, rows: torch.Tensor, blocks: Blocks) -> Wait:
    """Start the experts stage on `rows`; what it returns waits for the result [R, D]. A stage with a
    `start(rows, blocks) -> Wait` method (the pipeline's stand-in for expert shards) sends the rows now, so
    the caller computes something else while they are away; any other stage runs now."""
    begin = getattr(experts, "start", None)
    if begin is not None:
        return begin(rows, blocks)
    out = experts(rows, blocks)
    return lambda: out


def moe_start(x: torch.Tensor, gate_weight: torch.Tensor, k: int, experts: ExpertsStage) -> Wait:
    """The MoE layer in two halves: route, dispatch and start `experts` now; the returned Wait waits for
    them and combines. x [T, D] -> (later) [T, D]."""
    weights, chosen = route(x, gate_weight, k)  # [T, k] each
    plan = dispatch(weights, chosen, gate_weight.shape[0])
    wait = start(experts, x[plan.token], plan.blocks())
    return lambda: combine(wait(), plan, x.shape[0])  # rows [R, D] -> tokens [T, D]


def moe_token(x: torch.Tensor, gate_weight: torch.Tensor, k: int, experts: ExpertFns) -> torch.Tensor:
    """`moe` for one token, its experts in this process (`experts[e]`): a decode step at batch 1 in about
    half the small ops (20 a layer, not 36). One token's k rows need no dispatch: each chosen expert runs on
    x itself, and the outputs are summed as combine's index_add_ sums them (in expert order, each weighted in
    fp32 and rounded to x's dtype, the sum in fp32 rounded once), so the result is moe's bit for bit
    (tests/test_moe.py). x [1, D] -> [1, D]."""
    weights, chosen = route(x, gate_weight, k)  # [1, k] each
    out = torch.zeros_like(x, dtype=torch.float32)  # [1, D]
    for e, w in sorted(zip(chosen[0].tolist(), weights[0].tolist(), strict=True)):  # combine's order: by expert
        out += (experts[e](x).float() * w).to(x.dtype)  # [1, D]
    return out.to(x.dtype)


def moe(x: torch.Tensor, gate_weight: torch.Tensor, k: int, experts: ExpertsStage) -> torch.Tensor:
    """The whole MoE layer: route, dispatch, run `experts` on their blocks of rows, combine.

    `experts(rows [R, D], blocks) -> [R, D]` is where the experts are: local modules in one process,
    expert shards behind a transport in the pipeline. x [T, D] -> [T, D].
    """
    return moe_start(x, gate_weight, k, experts)()
