"""The experts stage as one fused Triton kernel pair, behind the interface of kernels.moe.expert_rows.

`expert_rows(rows, blocks, experts)` calls each expert's FeedForward on its block of rows: 3 matmuls
and 2 elementwise ops per expert, one launch each. `fused_expert_rows(rows, blocks, stacked)` does
the same for every block in two launches (kernels/fused_moe_triton.py): a grouped GEMM over w13 =
[w1; w3] with silu(w1 x) * w3 x in its epilogue, then a grouped GEMM over w2. It reads each expert's
weights once per tile of rows, accumulates in fp32, and takes bf16, fp16 or fp32.

`StackedExperts` holds the weights it needs, stacked once from FeedForward modules; by default the
modules' weights become views of the stack, so memory is not doubled and both paths stay usable.
`expert_runner(experts, kernel)` returns either path as `run(rows, blocks)`, the experts stage that
kernels.moe.moe takes (an expert shard's, over the experts it holds); `use_kernel(model, kernel)` gives
every MoeLayer of a model the stage FusedExperts, the same FeedForward modules on the fused kernels.

Triton is optional: it is imported only when the fused path runs. `available(device)` tells whether
it can: triton importable and a CUDA device, or TRITON_INTERPRET=1 (Triton's interpreter, which runs
the kernels on CPU tensors in numpy: for correctness tests, not speed). Set TRITON_INTERPRET before
anything imports triton (torch._dynamo does, and transformers imports that): Triton fixes the mode for
the whole process then.
Shapes: R rows, D model dim, F expert hidden dim, E experts held.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from kernels.model import Experts, FeedForward, MoeLayer
from kernels.moe import Blocks, expert_rows

KERNELS = ("reference", "triton")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """Whether the fused kernels run in Triton's interpreter: TRITON_INTERPRET as triton reads it, or,
    once the kernels are loaded, as it was then (Triton fixes the mode per process when imported)."""
    if importlib.util.find_spec("triton") is None:
        return False
    loaded = sys.modules.get("kernels.fused_moe_triton")
    if loaded is not None:
        return loaded.INTERPRETED
    from triton import knobs

    return bool(knobs.runtime.interpret)


def available(device: torch.device | str | None = None) -> bool:
    """Whether the fused kernels can run on tensors on `device` (default: CUDA if present, else CPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if interpreting():
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


@dataclass
class StackedExperts:
    """One layer's experts as two stacked weights: w13 [E, 2F, D] (w1 rows, then w3 rows) and w2 [E, D, F].
    `index[e]` is expert e's position along E (a shard holds some experts of a layer, not all)."""

    w13: torch.Tensor  # [E, 2F, D]
    w2: torch.Tensor  # [E, D, F]
    index: dict[int, int]

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Mapping[int, nn.Module] | Iterable[nn.Module],
                     share: bool = True) -> StackedExperts:
        """Stacks FeedForward experts (keyed by expert id, or in order: ids 0..n-1). With `share`,
        each module's w1 / w3 / w2 weight is replaced by a view of the stack and the module's own
        copy is freed: one copy of the weights, which the module and the kernel both read."""
        items = list(experts.items() if isinstance(experts, Mapping) else enumerate(experts))
        if not items:
            raise ValueError("no experts to stack")
        ffs: list[FeedForward] = []
        for e, ff in items:
            kinds = {type(getattr(ff, n)) for n in ("w1", "w2", "w3")}
            if kinds != {nn.Linear}:
                raise ValueError(f"expert {e}: the fused kernel takes nn.Linear weights, got "
                                 f"{sorted(k.__name__ for k in kinds)}; quantized experts run on the reference path")
            if not isinstance(ff, FeedForward):
                raise TypeError(f"expert {e}: the fused kernel stacks FeedForward modules, got {type(ff).__name__}")
            ffs.append(ff)
        w1 = ffs[0].w1.weight  # [F, D]
        F, D = w1.shape
        if w1.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"the fused kernel takes {SUPPORTED_DTYPES}, not {w1.dtype}")
        w13 = torch.empty(len(items), 2 * F, D, dtype=w1.dtype, device=w1.device)  # [E, 2F, D]
        w2 = torch.empty(len(items), D, F, dtype=w1.dtype, device=w1.device)  # [E, D, F]
        for i, ff in enumerate(ffs):
            w13[i, :F].copy_(ff.w1.weight)
            w13[i, F:].copy_(ff.w3.weight)
            w2[i].copy_(ff.w2.weight)
            if share:
                for lin, view in ((ff.w1, w13[i, :F]), (ff.w3, w13[i, F:]), (ff.w2, w2[i])):
                    lin.weight = nn.Parameter(view, requires_grad=lin.weight.requires_grad)
        return cls(w13, w2, {e: i for i, (e, _) in enumerate(items)})


def fused_expert_rows(rows: torch.Tensor, blocks: Blocks, experts: StackedExperts) -> torch.Tensor:
    """kernels.moe.expert_rows with the fused kernels: rows [R, D] -> [R, D], same order.

    `blocks` is (expert id, first row, count) relative to `rows`; `experts` holds every expert named
    there. Rows outside every block are left unwritten, as in expert_rows.
    """
    if rows.dtype != experts.w13.dtype:
        raise ValueError(f"rows are {rows.dtype}, the experts' weights {experts.w13.dtype}")
    if rows.device != experts.w13.device:
        raise ValueError(f"rows are on {rows.device}, the experts' weights on {experts.w13.device}")
    if rows.shape[1] != experts.w13.shape[2]:
        raise ValueError(f"rows have dim {rows.shape[1]}, the experts {experts.w13.shape[2]}")
    work = [(experts.index[e], start, n) for e, start, n in blocks if n]  # KeyError: an expert not held
    if not work:
        return torch.empty_like(rows)
    from kernels.fused_moe_triton import grouped_swiglu

    return grouped_swiglu(rows.contiguous(), work, experts.w13, experts.w2)


def _check_available(device: torch.device) -> None:
    """Before stacking, which re-points the modules' weights: RuntimeError if the kernels cannot run here."""
    if not available(device):
        raise RuntimeError(f"moe kernel 'triton' needs triton and a CUDA device (or TRITON_INTERPRET=1); "
                           f"weights are on {device}, triton "
                           f"{'found' if importlib.util.find_spec('triton') else 'not installed'}")


def _device(experts: Mapping[int, nn.Module] | Iterable[nn.Module]) -> torch.device:
    first = next(iter(experts.values() if isinstance(experts, Mapping) else experts))
    return next(itertools.chain(first.parameters(), first.buffers())).device


def expert_runner(experts: Mapping[int, nn.Module] | Sequence[nn.Module],
                  kernel: str = "reference") -> Callable[[torch.Tensor, Blocks], torch.Tensor]:
    """`run(rows, blocks) -> out` for these experts (one layer's, keyed by expert id) with `kernel`:
    "reference" (expert_rows: each FeedForward in turn) or "triton" (stacks them once, fused_expert_rows).
    """
    if kernel == "reference":
        return partial(expert_rows, experts=experts)
    if kernel == "triton":
        _check_available(_device(experts))
        return partial(fused_expert_rows, experts=StackedExperts.from_experts(experts))
    raise ValueError(f"moe kernel must be one of {KERNELS}, got {kernel!r}")


class FusedExperts(Experts):
    """A MoE layer's experts stage on the fused kernels: the same FeedForward modules (so checkpoint names
    and the reference path still work on them), their weights views of one stack."""

    def __init__(self, experts: Experts):
        _check_available(_device(experts))
        super().__init__(experts)
        self.stacked = StackedExperts.from_experts(self)

    def forward(self, rows: torch.Tensor, blocks: Blocks) -> torch.Tensor:  # [R, D] -> [R, D]
        return fused_expert_rows(rows, blocks, self.stacked)


def use_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Gives every MoeLayer of `model` its experts on `kernel` ("reference": Experts, "triton": FusedExperts);
    returns model. Call it after the weights are loaded (and not before quantizing: quantized experts stay
    reference)."""
    if kernel not in KERNELS:
        raise ValueError(f"moe kernel must be one of {KERNELS}, got {kernel!r}")
    for m in [m for m in model.modules() if isinstance(m, MoeLayer)]:
        if not isinstance(m.experts, Experts):
            raise TypeError(f"use_kernel: a MoE layer's experts run elsewhere ({type(m.experts).__name__}), "
                            f"not here")
        m.experts = FusedExperts(m.experts) if kernel == "triton" else Experts(m.experts)
    return model
