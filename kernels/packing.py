"""Weights laid out for fast CPU decode, made from a loaded model after load (`pack_`).

Two things, neither of which changes a checkpoint name, a module or a state_dict shape:
- fused linears: wq|wk|wv of an attention and w1|w3 of a SwiGLU FFN stacked into one weight, so a
  decode step runs one GEMV where it ran three (or two), and RoPE once over q|k. Each part's weight
  becomes a view of the stack, so memory is not doubled and the unfused modules (the reference path,
  `forward_native`) still run, on the same numbers;
- memory layout: torch's CPU fp32 GEMV (one to a few rows) is ~2.5x faster on a weight [out, in]
  stored transposed (in-major) when out > in (measured on the LM head 32000x512 and on 2048x512,
  1536x512: 16 vs 6 GB/s), and slower when out < in (512x1024: 7 vs 15 GB/s); so such weights are
  stored transposed, seen as the same [out, in] through a view. bf16 showed no such gap: left as is.

A fused weight remembers the Parameters it was made of: if a module is replaced later (quantized,
loaded again), `Fused.current` is False and the layer runs its reference path, never stale weights.
Shapes: D dim, F hidden, O out features, I in features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def fast_layout(w: torch.Tensor) -> torch.Tensor:
    """w [O, I] in the memory layout torch's CPU GEMV reads fastest (see the module docstring), same values."""
    if w.device.type == "cpu" and w.dtype == torch.float32 and w.shape[0] > w.shape[1]:
        return w.t().contiguous().t()  # [O, I], stored [I, O]
    return w.contiguous()


@dataclass
class Fused:
    """Linears stacked along their outputs: weight [sum O, I]; parts[i] the Parameter of linear i, a view."""

    weight: torch.Tensor
    parts: tuple[nn.Parameter, ...]
    sizes: list[int]  # each part's O

    def current(self, *linears: nn.Module) -> bool:
        """Whether `linears` still hold the weights this was made of (none was replaced since)."""
        return all(getattr(m, "weight", None) is p for m, p in zip(linears, self.parts, strict=True))


@torch.no_grad()
def fuse(*linears: nn.Module) -> Fused | None:
    """Stacks plain bias-free nn.Linear weights (same dtype, device, in features) into one, in the fast
    layout, and makes each linear's weight a view of it. None (nothing changed) for anything else:
    a quantized linear, weights still on the meta device."""
    if not all(type(m) is nn.Linear and m.bias is None for m in linears):
        return None
    ws: list[torch.Tensor] = [m.weight for m in linears]  # type: ignore[misc]  # nn.Linear's, checked above
    if any(w.is_meta for w in ws) or len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
        return None
    weight = fast_layout(torch.cat(ws))  # [sum O, I]
    sizes = [int(w.shape[0]) for w in ws]
    parts = []
    for m, part in zip(linears, weight.split(sizes), strict=True):
        m.weight = nn.Parameter(part, requires_grad=False)
        parts.append(m.weight)
    return Fused(weight, tuple(parts), sizes)


@torch.no_grad()
def relayout(linear: nn.Module) -> None:
    """A plain nn.Linear's weight in the fast layout, in place (same values, same shape)."""
    if type(linear) is nn.Linear and not linear.weight.is_meta:
        linear.weight = nn.Parameter(fast_layout(linear.weight), requires_grad=False)
