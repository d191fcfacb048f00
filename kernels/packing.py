"""Weights laid out for fast CPU decode, made from a loaded model after load (`pack_`).

Two things, neither of which changes a checkpoint name, a module or a state_dict shape:
- fused linears: wq|wk|wv of an attention and w1|w3 of a SwiGLU FFN stacked into one weight, so a
  decode step runs one GEMV where it ran three (or two), and RoPE once over q|k. Each part's weight
  becomes a view of the stack, so memory is not doubled and the unfused modules (the reference path,
  `forward_native`) still run, on the same numbers;
- fp32 on CPU: plain linears of the fast path (`linear`, `call`) run moeray's C kernel at decode sizes
  (kernels/native.py: 2-4x MKL's GEMV at 1 to 16 rows on an AMD EPYC), which reads weights [out, in] as
  stored. Where the kernel does not build, MKL runs, and its GEMV (one to a few rows) is ~2.5x faster on a
  weight stored transposed (in-major) when out > in (measured on a Xeon, LM head 32000x512 and 2048x512,
  1536x512: 16 vs 6 GB/s) and slower when out < in (512x1024: 7 vs 15 GB/s); so there such weights are stored
  transposed, seen as the same [out, in] through a view (`fast_layout`). bf16 showed no such gap: left as is.

bf16 linears (attention projections, FFNs and experts, LM head) on CPU are held prepacked for oneDNN instead
(`PackedLinear`, made by `prepack`): torch's bf16 F.linear runs oneDNN too, but reorders the weight on every
call; on the prepacked weight the same kernel gives the same bits (checked at load on a probe) 1.3-1.7x
faster at 1 to 16 rows (measured, AVX-512 with AMX; small bench model, int8 experts: a batch-1 step 25%
faster; an expert's three linears 1.5-1.6x at 1-4 rows, two threads). The weight is held once, in oneDNN's
layout; `weight` unpacks it for the reference path. wq|wk|wv and w1|w3 are one prepacked stack each (`fuse`),
each of those linears a `PackedPart` of it: one call for the three (2.2x at 1-16 rows) or two (1.15x), same bits
(oneDNN splits the outputs, not the sum over inputs). Not for experts that a fused kernel stacks (it reads their
nn.Linear weights: model.pack_(experts=False)) nor fp32 (our kernel, or MKL on the fast layout).

A fused weight remembers the Parameters it was made of: if a module is replaced later (quantized,
loaded again), `Fused.current` is False and the layer runs its reference path, never stale weights. So do the
weights of an attention, an FFN or a MoE layer's experts as moeray's C kernels read them (`Native`, made by
`native_attention` / `native_ffns`: fp32 or int8 on CPU; the decode path of those modules).
Shapes: D dim, F hidden, O out features, I in features.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from kernels import native

W = TypeVar("W")


def fast_layout(w: torch.Tensor) -> torch.Tensor:
    """w [O, I] in the memory layout the CPU linear of the fast path reads fastest (see the module docstring),
    same values."""
    if (w.device.type == "cpu" and w.dtype == torch.float32 and w.shape[0] > w.shape[1]
            and native.library() is None):
        return w.t().contiguous().t()  # [O, I], stored [I, O]: for MKL's GEMV
    return w.contiguous()


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x, w) for x [..., I] and w [O, I], by moeray's C kernel where it runs: fp32 on CPU, 1 to
    native.MAX_ROWS rows, w as stored by fast_layout, no autograd (kernels/native.py)."""
    if (w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        if (y := native.linear(x.reshape(-1, x.shape[-1]), w)) is not None:
            return y.view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x), by `linear` if m is a plain bias-free nn.Linear (any other module, a quantized or prepacked
    linear, runs its own forward)."""
    if type(m) is nn.Linear and m.bias is None:
        return linear(x, m.weight)
    return m(x)


@dataclass
class Fused:
    """Linears stacked along their outputs, computed by one call: `weight` a tensor [sum O, I] (parts[i] the
    Parameter of linear i, a view of it) or that stack prepacked for oneDNN (parts[i] the PackedPart that
    replaced linear i)."""

    weight: torch.Tensor | PackedLinear
    parts: tuple[nn.Module | nn.Parameter, ...]
    sizes: list[int]  # each part's O

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [..., I] -> [..., sum O]
        w = self.weight
        return linear(x, w) if isinstance(w, torch.Tensor) else w(x)

    def current(self, *linears: nn.Module) -> bool:
        """Whether `linears` are still what this was made of (none was replaced since)."""
        return all(p is m or p is getattr(m, "weight", None) for m, p in zip(linears, self.parts, strict=True))


@torch.no_grad()
def fuse(owner: nn.Module, names: tuple[str, ...], prepacked: bool = True) -> Fused | None:
    """Stacks `owner`'s plain bias-free nn.Linears `names` (same dtype, device, in features) into one weight:
    prepacked for oneDNN where `prepacked` and the weights can be (bf16 on CPU; each linear replaced by a
    PackedPart of the stack), else in the fast layout with each linear's weight a view of it. None (nothing
    changed) for anything else: a quantized linear, weights still on the meta device."""
    linears = [getattr(owner, n) for n in names]
    if not all(type(m) is nn.Linear and m.bias is None for m in linears):
        return None
    ws: list[torch.Tensor] = [m.weight for m in linears]  # type: ignore[misc]  # nn.Linear's, checked above
    if any(w.is_meta for w in ws) or len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
        return None
    sizes = [int(w.shape[0]) for w in ws]
    if prepacked and can_prepack(ws[0]):
        stack = PackedLinear(torch.cat(ws))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        parts = tuple(PackedPart(stack, start, size) for start, size in zip(starts, sizes, strict=True))
        for n, part in zip(names, parts, strict=True):
            setattr(owner, n, part)
        return Fused(stack, parts, sizes)
    weight = fast_layout(torch.cat(ws))  # [sum O, I]
    params = []
    for m, part in zip(linears, weight.split(sizes), strict=True):
        m.weight = nn.Parameter(part, requires_grad=False)
        params.append(m.weight)
    return Fused(weight, tuple(params), sizes)


@torch.no_grad()
def relayout(linear: nn.Module) -> None:
    """A plain nn.Linear's weight in the fast layout, in place (same values, same shape)."""
    if type(linear) is nn.Linear and not linear.weight.is_meta:
        linear.weight = nn.Parameter(fast_layout(linear.weight), requires_grad=False)


HUGE_PAGE = 2 << 20  # bytes of a transparent huge page on x86-64 and most arm64 kernels


@torch.no_grad()
def into_huge_pages_(tensors: Iterable[torch.Tensor]) -> int:
    """Moves the memory of `tensors` (CPU, strided; others are left) into one anonymous mapping advised for
    transparent huge pages (madvise MADV_HUGEPAGE: used where /sys/kernel/mm/transparent_hugepage/enabled says
    madvise or always), in place: each keeps its dtype, shape, strides and values, and tensors that shared memory
    still share it. Decode streams every weight once a step, and with 4 KB pages each 4 KB of it is a TLB miss
    (in a VM, a two-level page walk) and a stop for the hardware prefetcher. Weights safetensors read in place
    (its private file mapping) have their file pages let go as they move (madvise MADV_PAGEOUT), so the process
    does not hold the model twice until the last one moves. Returns the bytes moved."""
    by_storage: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        if t.device.type == "cpu" and t.layout == torch.strided and not t.is_meta:
            by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    # the longest storage that starts at p (safetensors gives each tensor its own; a sliced one is shorter)
    sources = {p: max((t.untyped_storage() for t in ts), key=lambda u: u.nbytes()) for p, ts in by_storage.items()}
    total = sum(-(-u.nbytes() // 64) * 64 for u in sources.values())
    if not total or not hasattr(mmap, "MADV_HUGEPAGE"):  # Linux only: elsewhere moving would give nothing
        return 0
    # private and anonymous (a shared mapping is shmem: another setting); pages are made on first write
    area = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    arena = torch.frombuffer(area, dtype=torch.uint8)  # holds `area` while any tensor of it lives
    at = -arena.data_ptr() % HUGE_PAGE  # the first huge page boundary
    files = _file_mappings()
    for p, ts in by_storage.items():
        old = sources.pop(p)  # held no longer than this turn: its memory goes once its tensors have moved
        n = old.nbytes()
        arena[at : at + n].copy_(torch.empty(0, dtype=torch.uint8).set_(old))
        new = arena[at : at + n].untyped_storage()
        for t in ts:
            t.set_(new, at // t.element_size() + t.storage_offset(), t.shape, t.stride())
        at += -(-n // 64) * 64
        if any(lo <= p < hi for lo, hi in files):  # clean file pages: dropped, read again if ever touched
            lo, hi = -(-p // mmap.PAGESIZE) * mmap.PAGESIZE, (p + n) // mmap.PAGESIZE * mmap.PAGESIZE
            if hi > lo:
                _libc().madvise(lo, hi - lo, MADV_PAGEOUT)  # best effort: EINVAL before Linux 5.4
    if hasattr(_libc(), "malloc_trim"):  # glibc: the heap's free pages, those of the storages left, to the OS
        _libc().malloc_trim(0)
    return total


MADV_PAGEOUT = 21  # Linux's (5.4+); Python's mmap module does not always export it


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _file_mappings() -> list[tuple[int, int]]:
    """[start, end) of this process's mappings of files (/proc/self/maps lines with an inode)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[4] != "0":
            lo, hi = fields[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., I] @ the prepacked weight [O, I]^T -> [..., O]."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


@functools.cache
def onednn_bf16() -> bool:
    """Whether this process runs oneDNN's bf16 linear on a prepacked weight, giving F.linear's bits: oneDNN
    built in, a CPU it supports bf16 on, and a probe (a few row counts) equal to F.linear."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        g = torch.Generator().manual_seed(0)
        w = torch.randn(96, 64, generator=g).bfloat16()
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        xs = [torch.randn(n, 64, generator=g).bfloat16() for n in (1, 3, 16)]
        return torch.equal(packed.to_dense(), w) and all(torch.equal(_onednn_linear(x, packed), F.linear(x, w))
                                                         for x in xs)
    except (RuntimeError, AttributeError):  # an op this build lacks, a CPU oneDNN refuses
        return False


class PackedLinear(nn.Module):
    """A bias-free bf16 CPU nn.Linear with its weight held prepacked for oneDNN (see the module docstring).
    forward runs the oneDNN kernel; `weight` unpacks it (same values), forward_native is F.linear on that."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.prepacked = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)  # [O, I], opaque

    @property
    def weight(self) -> torch.Tensor:
        return self.prepacked.to_dense()  # [O, I]

    @property
    def nbytes(self) -> int:
        return self.out_features * self.in_features * self.prepacked.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., I] -> [..., O]
        return _onednn_linear(x, self.prepacked)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16, prepacked for oneDNN"


class PackedPart(nn.Module):
    """Outputs [start, start + size) of a stacked PackedLinear: one of the linears `fuse` stacked. Run alone (the
    reference path) it computes the whole stack and keeps its part: the same bits (oneDNN splits the outputs,
    not the sum over inputs; tests/test_engine.py checks it)."""

    def __init__(self, stack: PackedLinear, start: int, size: int):
        super().__init__()
        self.stack, self.start = stack, start
        self.in_features, self.out_features = stack.in_features, size

    @property
    def weight(self) -> torch.Tensor:
        return self.stack.weight[self.start : self.start + self.out_features]  # [O, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., I] -> [..., O]
        return self.stack(x)[..., self.start : self.start + self.out_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, part of a prepacked stack"


def can_prepack(w: torch.Tensor) -> bool:
    """Whether weight `w` can be held as a PackedLinear: bf16 on CPU, and onednn_bf16()."""
    return not w.is_meta and w.device.type == "cpu" and w.dtype == torch.bfloat16 and onednn_bf16()


@torch.no_grad()
def prepack(linear: nn.Module) -> PackedLinear | None:
    """`linear` as a PackedLinear if it is a plain bias-free nn.Linear whose weight can_prepack; else None."""
    if type(linear) is not nn.Linear or linear.bias is not None or not can_prepack(linear.weight):
        return None
    return PackedLinear(linear.weight)


_changes = 0  # see changes()


def _changed(*_: object) -> None:
    global _changes
    _changes += 1


nn.modules.module.register_module_module_registration_hook(_changed)
nn.modules.module.register_module_parameter_registration_hook(_changed)


def changes() -> int:
    """A count that moves whenever any module of this process gets a submodule or a parameter, set or replaced
    (torch's global registration hooks): while it stays, every `Native.current` stays what it was, so a caller
    that checked them all may skip checking again (Transformer.native_layers, each decode step)."""
    return _changes


@dataclass
class Native(Generic[W]):
    """Weights moeray's C kernels read (native.SwiGLUWeights: a MoE layer's experts or one FFN;
    native.AttentionWeights: an attention), with the linears they were read from: `current` is False once any
    was replaced (quantized, loaded again), and the caller runs its torch path."""

    weights: W
    linears: tuple[nn.Module, ...]

    def current(self, linears: tuple[nn.Module, ...]) -> bool:
        return all(a is b for a, b in zip(linears, self.linears, strict=True))


def ffn_linears(ffns: Iterable[nn.Module]) -> tuple[nn.Module, ...]:
    """w1, w3, w2 of each FeedForward in `ffns`, in order. Read from each module's child table, not through
    nn.Module.__getattr__ (1 us each: a MoE layer's check of its 24 linears took 4% of a batch-1 step)."""
    return tuple(cast(nn.Module, ff._modules[n]) for ff in ffns for n in ("w1", "w3", "w2"))


def attention_linears(attn: nn.Module) -> tuple[nn.Module, ...]:
    """wq, wk, wv, wo of an Attention (as ffn_linears reads them)."""
    return tuple(cast(nn.Module, attn._modules[n]) for n in ("wq", "wk", "wv", "wo"))


def native_weight(m: nn.Module) -> native.Weight | None:
    """A linear's weight as the C kernels read it: a plain fp32 nn.Linear's, or what the module offers
    (QuantLinear.native_weight: int8 on the CPU kernel, weight-only or W8A8; BF16Linear's)."""
    if type(m) is nn.Linear and m.bias is None and m.weight.dtype == torch.float32 and not m.weight.is_meta:
        return native.Weight(m.weight.detach())
    offer = getattr(m, "native_weight", None)
    return offer() if offer is not None else None


def _native_weights(linears: tuple[nn.Module, ...]) -> list[native.Weight] | None:
    weights = []
    for m in linears:
        if (w := native_weight(m)) is None:
            return None
        weights.append(w)
    return weights


def native_ffns(ffns: list[nn.Module]) -> Native[native.SwiGLUWeights] | None:
    """Native weights of `ffns` (FeedForwards) if the C kernels read all their weights (all fp32 or all int8, on
    CPU, shapes they take: native.SwiGLUWeights.of), else None."""
    linears = ffn_linears(ffns)
    if (weights := _native_weights(linears)) is None:
        return None
    held = native.SwiGLUWeights.of([(w1, w3, w2) for w1, w3, w2 in zip(*[iter(weights)] * 3, strict=True)])
    return None if held is None else Native(held, linears)


def native_attention(attn: nn.Module) -> Native[native.AttentionWeights] | None:
    """Native weights of an Attention if the C kernels read wq, wk, wv and wo (all fp32 or all int8, on CPU),
    else None."""
    linears = attention_linears(attn)
    if (weights := _native_weights(linears)) is None:
        return None
    held = native.AttentionWeights.of(*weights)
    return None if held is None else Native(held, linears)
