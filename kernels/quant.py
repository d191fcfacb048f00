"""Weight-only int8 / int4 quantization of the experts (96.6 % of Mixtral's 46.7 B parameters;
engine.expert_quant), and optionally of the attention projections and LM head (engine.weight_quant).

Expert weights in bf16 are 90 GB; int8 halves them (45 GB), int4 quarters them (24 GB with bf16
scales, group 128). Activations stay in the model's dtype; a QuantLinear runs one of two paths
(below), each within the stated rounding bounds of the dequantized weight.

Formats, for a weight W [O, I] (O output features, I input features):

  int8   per output channel, symmetric:  W ~ q * s        q int8 [O, I] in [-127, 127], s [O, 1]
  int4   per group of g inputs, asymmetric:  W ~ q * s + m   q in [0, 15], two per byte: uint8 [O, I/2]
         (column 2j in the low nibble, 2j+1 in the high one), s and m [O, I/g]

Error bounds (what the tests check, group by group): every weight is within s/2 of its
dequantized value, for the stored s, whatever the scale dtype. Scales are rounded *up* and int4
offsets *down* when stored in a narrower dtype (bf16), so the grid still covers the group's range and
nothing is clipped. So:

  int8   |W - W'| <= s/2,  s = absmax(row) / 127   (x (1 + 2^-7) at most with bf16 scales)
  int4   |W - W'| <= s/2,  s = (max - min)(group) / 15   (likewise, the range widened by the
         bf16 rounding of min)

plus fp32 rounding of q * s (+ m), about 2^-24 of the weight, and, where the model runs in bf16,
the final cast of W' to bf16 (2^-9 of the weight, the same rounding the bf16 checkpoint already has).
Measured on N(0, 1/I) weights: relative weight error 0.75 % (int8) and 10 % (int4, group 128); on a
whole Mixtral-sized SwiGLU expert's output 1.7 % and 18 %.

Two paths (STYLE.md: the reference beside the fast op; the kernel chosen at load, use_cpu_kernel_):

  forward_native  dequantize W' in x's dtype and F.linear: the reference, any device and dtype. A full
                  pass over the weight per call: a Mixtral-sized expert at 8 rows takes 7.5x its bf16
                  time in int8 and 30x in int4 on CPU.
  forward         on CPU, kernels that read the int8 / int4 weight once and never write W':
                  int8, fp32 activations: moeray's C kernel (kernels/native.py, our format as it is; where
                  there is no C compiler, the reference); bf16 activations: torch's aten._weight_int8pack_mm
                  (our format as it is, scales [O] in bf16);
                  int4, bf16 activations:
                  aten._weight_int4pack_mm_for_cpu (the weight in its packed layout, which depends on the
                  CPU: converted from ours at load time, see use_cpu_kernel_; scales and zeros [G, O, 2] in
                  bf16 with W' = (q - 8) * s + z, so z = m + 8 s); int4, fp32 (or fp16) activations: the
                  same kernel on x rounded to bf16, its output back in x's dtype (what a bf16 model's int4
                  experts compute; an fp32 model is what engine.dtype auto runs a bf16 checkpoint as on a
                  CPU without native bf16, and forward_native there, a dequantized weight a call, was 10x
                  slower at batch 1 with Mixtral's row lengths, 2.6x with the bench's small rows). Everything
                  else (int8 with fp16, or fp32 without the C kernel; GPU) runs forward_native.
                  Measured on 2 threads (bf16, a 1024 x 512 expert matrix): about 4x faster than
                  forward_native at 1 to 4 rows, even at 16, 2x slower from ~64 rows (prefill), where
                  dequantize + one GEMM wins. torch's kernels still run there: each row's result is the
                  same whatever the other rows are (checked), so a sequence's tokens do not depend on what
                  it is batched with, here or in the pipeline's shards; switching paths by row count would.
                  Our int8 kernel for fp32 rows does switch, as the fp32 model's linears do (kernels/native.py):
                  1 to MAX_ROWS rows (a decode step) it, more (prefill) prefill_linear, one GEMM per block of
                  the weight dequantized to fp32 (2x the kernel at 128 rows).

  How far the fast path is from the reference, per output (tests/test_quant.py checks these bounds):
  int8  W' is rounded to bf16 in the reference and not in the kernel: |y - y'| <= 2^-8 |x| @ |W'|^T
        plus the rounding of y to bf16 (2^-8 |y|): fp rounding, nothing else. fp32 activations (C kernel):
        the sums in another order and s applied after them, |y - y'| <= (I + 2) 2^-24 |x| @ |W'|^T.
  int4  the same, plus z = m + 8 s rounded to bf16 (2^-9 |z| per weight): |y - y'| <= 2^-8 |x| @ (|W'| +
        |z|)^T + 2^-8 |y|; fp32 activations, x rounded to bf16 first, 2^-9 |x| @ |W'|^T more.

W8A8 (expert_quant / weight_quant "w8a8"; CPU only): the int8 format above, and at each call every row of x is
quantized to int8 as well, symmetric, one scale a row (dynamic per-token activations, vLLM's W8A8 scheme):
xq = round(x * 127 / m), m = max |x| over the row, then y = (sum_k xq q) * (m / 127) * s with the sum exact in
integers (quantize_rows, w8a8_reference: the reference, any device). On CPU moeray's C kernel computes that bit
for bit (AVX-512 VNNI: 64 weights an instruction, where the weight-only kernel converts each weight to fp32 before
its FMA and is compute-bound at ~19 GB/s; kernels/native.py). Without VNNI (AVX2) it reads 4 rows at a time, so
use_cpu_kernel_ holds the weight with its rows interleaved in groups of 4 (interleave_rows: one sequential stream a
tile); values() gives the rows back. What it gives up: each activation carries a
rounding error up to m / 254 (0.4 % of the row's largest), on top of the weights' (see tests/test_quant.py).

bf16 weights in an fp32 model (expert_quant / weight_quant "bf16", BF16Linear): the weight rounded to bf16 once (half
of fp32's bytes, as a bf16 model's), the activations and every sum in fp32: x @ W'^T with W' the rounded weight,
what transformers computes in fp32 on that weight. On CPU moeray's C kernel makes each weight fp32 (exactly)
before its FMA at 1 to MAX_ROWS rows, prefill_linear past that; elsewhere F.linear on W' in x's dtype.

Shapes: O out features, I in features, G = I / g groups, n rows of x.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kernels.model import Attention, FeedForward, Transformer
from kernels.native import MAX_ROWS, Weight, bf16_linear, int8_linear, w8a8_block, w8a8_linear

BITS = (8, 4)
QGROUP = 4  # W8A8's interleaved layout: rows held together (kernels/csrc/linear.c's QGROUP)
GEMM_BLOCK = 1 << 21  # prefill_linear: weights made fp32 this many at a time (8 MB)


def prefill_linear(x: torch.Tensor, out_features: int, rows: Callable[[slice], torch.Tensor]) -> torch.Tensor | None:
    """x fp32 [n, I] on CPU @ W^T -> fp32 [n, O] for more rows than a decode step (n > MAX_ROWS: a prefill chunk), W
    given a block of output rows at a time in fp32 (rows(slice) -> fp32 [block, I], ~GEMM_BLOCK weights: never the
    whole weight), each block one GEMM (MKL's, as an fp32 model's prefill); None where it does not run (other
    dtypes or devices, MAX_ROWS rows or fewer). moeray's C kernels take 1 to 4 rows a tile and so read the weight
    once per tile: at 128 rows of a bench-model expert 2x slower than this, at 512 rows of its attention 2.5-3x
    (2 threads, AVX2 EPYC). A row's result depends on n here, as with fp32 weights past MAX_ROWS."""
    if not x.is_cpu or x.dtype != torch.float32 or x.shape[0] <= MAX_ROWS:
        return None
    n, I = x.shape
    step = max(16, GEMM_BLOCK // I // 16 * 16)
    y = torch.empty(n, out_features)
    for o in range(0, out_features, step):
        torch.mm(x, rows(slice(o, o + step)).t(), out=y[:, o : o + step])
    return y


def round_toward(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """x (fp32) in `dtype`, rounded up (or down) instead of to nearest: the stored value bounds x."""
    y = x.to(dtype)
    wrong = y.float() < x if up else y.float() > x
    return torch.where(wrong, torch.nextafter(y, torch.full_like(y, float("inf") if up else float("-inf"))), y)


def group_for(in_features: int, group_size: int) -> int:
    """int4 group length along the input: group_size, or the whole row when the row is shorter
    (a tiny model's 64 inputs -> one group of 64). Otherwise it must divide the row."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    g = min(group_size, in_features)
    if in_features % g:
        raise ValueError(f"int4 group_size {group_size} does not divide in_features {in_features}; "
                         f"pass a group_size that does")
    return g


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [O, I] with values 0..15 -> uint8 [O, I/2]: column 2j in the low nibble, 2j+1 high."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [O, I/2] -> uint8 [O, I], values 0..15 (the inverse of pack_int4)."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(1)  # [O, I/2, 2] -> [O, I]


def unpack_cpu_int4(packed: torch.Tensor, block: int) -> torch.Tensor:
    """uint8 [O, I/2] in aten._convert_weight_to_int4pack_for_cpu's layout -> uint8 [O, I], values 0..15.

    That layout is [O/b, I, b/2] bytes: for rows n0 .. n0+b of the weight and input column i, byte j
    holds row n0+j in its low nibble and row n0+b/2+j in its high one; b = cpu_int4_block()."""
    O, I = packed.shape[0], packed.shape[1] * 2
    p = packed.view(O // block, I, block // 2)  # [O/b, I, b/2]
    return torch.stack([p & 0xF, p >> 4], dim=1).permute(0, 1, 3, 2).reshape(O, I)  # [O/b, 2, b/2, I] -> [O, I]


@functools.cache
def cpu_int4_block() -> int | None:
    """The row block b of the CPU int4 kernel's packed layout in this process (64 with AVX-512, 32 with
    AVX2), found by packing a probe; None where it is some other layout (then int4 stays native)."""
    q = torch.randint(0, 16, (192, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    return next((b for b in (64, 32, 16) if torch.equal(unpack_cpu_int4(packed, b).int(), q)), None)


def interleave_rows(q: torch.Tensor, block: int, inverse: bool = False) -> torch.Tensor:
    """int8 [O, I] (I a multiple of block) -> the W8A8 C kernel's layout, [O, I] of the same bytes in another order
    (kernels/csrc/linear.c's QBLK): rows in groups of QGROUP (the last of O % QGROUP rows), each group `block` weights
    of its first row, `block` of its second, ..., then the next `block` of each, so that a tile reading a group's rows
    side by side reads one sequential stream. inverse: back to [O, I] rows."""
    O, I = q.shape
    whole = O - O % QGROUP
    parts = []
    for rows, p in ((slice(0, whole), QGROUP), (slice(whole, O), O % QGROUP)):
        if rows.start < rows.stop:  # (O % QGROUP == 0 leaves the second empty)
            shape = (-1, I // block, p, block) if inverse else (-1, p, I // block, block)
            parts.append(q[rows].reshape(shape).transpose(1, 2).reshape(-1, I))
    return torch.cat(parts)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8's activations: each row of x [..., I] -> (xq int8 [..., I] in [-127, 127], scale fp32 [..., 1]), symmetric:
    xq = round(x * (127 / m)) (ties to even), m = max |x| over the row, scale m / 127; a row of zeros (or with
    an inf or NaN: no scale then) gives zeros."""
    x = x.float()
    m = x.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    c = torch.full_like(m, 127)  # tensor / tensor: IEEE division (127 / m is a reciprocal times 127: an ulp off)
    inv = torch.where((m > 0) & m.isfinite(), c / m, 0)
    q = torch.round(x * inv).nan_to_num_(0).clamp_(-127, 127)
    return q.to(torch.int8), m / c


def w8a8_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8 linear, the reference: x [..., I] (any float dtype) with its rows quantized (quantize_rows) times
    qweight int8 [O, I], the sums exact (integers in fp64), then times the row's scale and scale [O, 1] -> fp32
    [..., O]."""
    xq, sx = quantize_rows(x)
    dot = torch.matmul(xq.double(), qweight.double().T)  # exact: |sums| < 2^53
    return dot.float() * sx * scale.float().view(-1)


class QuantLinear(nn.Module):
    """A bias-free nn.Linear whose weight is stored as int8 or packed int4 (see the module docstring).

    forward() runs the CPU kernel where it can and forward_native otherwise (see the module docstring);
    `weight` is a property that dequantizes, for code that reads weights.
    """

    qweight: torch.Tensor  # int8 [O, I] (W8A8 on the CPU kernel: interleaved, see row_block), or uint8 [O, I/2] packed
    # int4 (in the CPU kernel's layout once packed)
    scale: torch.Tensor  # [O, 1] (int8) or [O, G] (int4)
    offset: torch.Tensor | None  # [O, G], int4 only
    kernel_scale: torch.Tensor | None  # int4 on the CPU kernel: its scales and zeros, bf16 [G, O, 2]

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, scale_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None, w8a8: bool = False):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if w8a8 and bits != 8:
            raise ValueError("w8a8 quantizes int8 weights' activations: bits must be 8")
        self.in_features, self.out_features, self.bits, self.dtype = in_features, out_features, bits, dtype
        self.w8a8 = w8a8  # activations quantized per row too (the module docstring's W8A8)
        if bits == 8:
            self.group_size = in_features  # one scale per output channel
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.ones(out_features, 1, dtype=scale_dtype, device=device))
            self.register_buffer("offset", None)
        else:
            if in_features % 2:
                raise ValueError(f"int4 packs two inputs per byte: in_features must be even, got {in_features}")
            self.group_size = group_for(in_features, group_size)
            groups = in_features // self.group_size
            self.register_buffer("qweight",
                                 torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scale", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
            self.register_buffer("offset", torch.zeros(out_features, groups, dtype=scale_dtype, device=device))
        self.register_buffer("kernel_scale", None, persistent=False)
        self.int4_block: int | None = None  # set while qweight is in the CPU int4 kernel's layout
        self.row_block: int | None = None  # set while qweight is interleaved for the W8A8 kernel (interleave_rows)
        self.cpu_kernel = False  # forward uses the CPU kernel where it can (use_cpu_kernel_)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128,
                    scale_dtype: torch.dtype = torch.bfloat16, cpu_kernel: bool | None = None,
                    w8a8: bool = False) -> QuantLinear:
        """Quantizes `linear.weight` (round to nearest). The result computes in the weight's dtype.
        cpu_kernel: use_cpu_kernel_ after quantizing (default: when the weight is on CPU)."""
        if linear.bias is not None:
            raise ValueError("QuantLinear has no bias (no layer of Mixtral or Mistral has one)")
        w = linear.weight.detach()
        q = cls(w.shape[1], w.shape[0], bits, group_size, dtype=w.dtype, scale_dtype=scale_dtype, device=w.device,
                w8a8=w8a8)
        q.quantize_(w)
        if cpu_kernel or (cpu_kernel is None and w.device.type == "cpu"):
            q.use_cpu_kernel_()
        return q

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Fills qweight / scale / offset from a weight [O, I] of any float dtype."""
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight is {tuple(weight.shape)}, expected {(self.out_features, self.in_features)}")
        w = weight.float()
        self.int4_block = self.kernel_scale = self.row_block = None  # the stored format: use_cpu_kernel_ converts
        self.cpu_kernel = False
        if self.bits == 8:
            absmax = w.abs().amax(dim=1, keepdim=True)  # [O, 1]
            # a tensor divisor: CUDA divides by a Python number as a product with its reciprocal, one ulp off at
            # times, and the scale rounded up then differs from the CPU's (seen on an H200, torch 2.11)
            s = round_toward(absmax / torch.tensor(127.0, device=w.device), self.scale.dtype, up=True)  # [O, 1]
            s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero row: any scale is exact
            self.qweight.copy_(torch.round(w / s.float()).clamp_(-127, 127).to(torch.int8))  # [O, I]
            self.scale.copy_(s)
        else:
            assert self.offset is not None  # int4 has offsets
            wg = w.view(self.out_features, -1, self.group_size)  # [O, G, g]
            m = round_toward(wg.amin(dim=2), self.offset.dtype, up=False)  # [O, G] <= every weight
            s = round_toward((wg.amax(dim=2) - m.float()) / torch.tensor(15.0, device=w.device), self.scale.dtype,
                             up=True)  # [O, G]; a tensor divisor, as for int8
            s = torch.where(s == 0, torch.ones_like(s), s)  # a constant group: q = 0, W' = m = W
            q = torch.round((wg - m.float()[..., None]) / s.float()[..., None]).clamp_(0, 15)  # [O, G, g]
            self.qweight.copy_(pack_int4(q.to(torch.uint8).view(self.out_features, self.in_features)))
            self.scale.copy_(s)
            self.offset.copy_(m)

    @torch.no_grad()
    def use_cpu_kernel_(self) -> bool:
        """Makes forward use torch's packed CPU kernel where it can (CPU, bf16 x); returns
        whether it will. Call once, on CPU, after quantize_. int4 is converted to that kernel's layout in
        place, so it is held once (values() still reads it), and so is W8A8's int8 where moeray's kernel wants its rows
        interleaved (native.w8a8_block); a layout this process does not know, or
        out_features not a multiple of its block, keeps int4 native. Scales must be stored in bf16 (the
        default), the kernels' dtype, so that the fast path stays within fp rounding of the reference."""
        if self.cpu_kernel:
            return True
        if self.qweight.device.type != "cpu" or self.scale.dtype != torch.bfloat16:
            return False
        if self.bits == 8:  # the stored format as it is
            # torch 2.13's AVX-512 int8 kernel reads rows in 32-byte loads: other widths crash it (SIGSEGV)
            self.cpu_kernel = self.in_features % 16 == 0
            if self.cpu_kernel and self.w8a8 and (block := w8a8_block()):
                self.qweight, self.row_block = interleave_rows(self.qweight, block), block
            return self.cpu_kernel
        block = cpu_int4_block()
        if block is None or self.out_features % block:
            return False
        assert self.offset is not None  # int4 has offsets
        s, m = self.scale.float(), self.offset.float()  # [O, G]
        self.kernel_scale = torch.stack([s, m + 8 * s], dim=-1).transpose(0, 1).to(torch.bfloat16).contiguous()
        self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.values().int(), 2)  # [O, I/2]
        self.int4_block, self.cpu_kernel = block, True
        return True

    def values(self) -> torch.Tensor:
        """q [O, I]: int8 in [-127, 127], or uint8 in [0, 15] (int4, unpacked from whichever layout)."""
        if self.bits == 8:
            return self.qweight if self.row_block is None else interleave_rows(self.qweight, self.row_block, True)
        if self.int4_block is None:
            return unpack_int4(self.qweight)
        return unpack_cpu_int4(self.qweight, self.int4_block)

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """The weight's `rows` (default all: [O, I]) in `dtype` (default: the original weight's), as if computed in
        fp32."""
        dtype = dtype or self.dtype
        if self.bits == 8 and self.scale.dtype == dtype:
            # q (8 bits) times s (dtype) is exact in fp32, so this rounds once, like the fp32 path below,
            # and is bit-identical to it; with bf16 it moves half the bytes (2x faster on CPU)
            return self.values()[rows].to(dtype) * self.scale[rows]  # [O, I] * [O, 1]
        if self.bits == 8:
            w = self.values()[rows].float() * self.scale[rows].float()  # [O, I] * [O, 1]
        else:
            assert self.offset is not None  # int4 has offsets
            q = self.values()[rows].view(-1, self.in_features // self.group_size, self.group_size)  # [O, G, g]
            w = (q.float() * self.scale[rows].float()[..., None] + self.offset[rows].float()[..., None]).flatten(1)
        return w.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., I] -> [..., O]
        if not self.cpu_kernel or not x.is_cpu:
            return self.forward_native(x)
        x2 = x.reshape(-1, self.in_features)  # [n, I]
        if self.w8a8:
            y = w8a8_linear(x2.float(), self.qweight, self.scale)
            return self.forward_native(x) if y is None else y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        if self.bits == 8 and (  # fp32 x: prefill's GEMMs past MAX_ROWS rows, else our kernel
                (y := prefill_linear(x2, self.out_features, lambda s: self.dequantize(torch.float32, s))) is not None
                or (y := int8_linear(x2, self.qweight, self.scale)) is not None):
            return y.view(*x.shape[:-1], self.out_features)
        if x.dtype != torch.bfloat16 and self.bits == 8:
            return self.forward_native(x)
        x2 = x2.to(torch.bfloat16).contiguous()  # int4 with fp32 (or fp16) x: the bf16 kernel on x rounded
        if x2.data_ptr() % 64:  # e.g. rows read from a network buffer: the int8 kernel needs aligned rows
            x2 = x2.clone()
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scale.view(-1))  # [n, O]
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.kernel_scale)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:  # x [..., I] -> [..., O]
        if self.w8a8:
            return w8a8_reference(x, self.values(), self.scale).to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype))

    def native_weight(self) -> Weight | None:
        """(qweight int8 [O, I] (W8A8: in its kernel's layout), scale bf16 [O], w8a8) where moeray's C kernels can read
        this weight (int8 on the CPU kernel, bf16 scales: kernels/native.py, kernels/packing.py's native_ffns), else
        None."""
        if self.bits == 8 and self.cpu_kernel and self.scale.dtype == torch.bfloat16 and not self.qweight.is_meta:
            return Weight(self.qweight, self.scale.view(-1), self.w8a8)
        return None

    @property
    def nbytes(self) -> int:
        """Bytes held: the quantized weight plus its scales (and int4 offsets, and on the CPU kernel its
        scales and zeros: 4 bytes a group more)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        group = f"group_size={self.group_size}" if self.bits == 4 else "per channel" + (", w8a8" if self.w8a8 else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {group}, "
                f"dtype={self.dtype}, scale_dtype={self.scale.dtype}")


class BF16Linear(nn.Module):
    """A bias-free linear whose weight is held in bf16 (rounded to nearest) in a model that computes in fp32 (see the
    module docstring): forward runs moeray's C kernel for fp32 rows on CPU, else forward_native."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.bfloat16).contiguous(), requires_grad=False)
        self.out_features, self.in_features = self.weight.shape

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> BF16Linear:
        if linear.bias is not None:
            raise ValueError("BF16Linear has no bias (no layer of Mixtral or Mistral has one)")
        return cls(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., I] -> [..., O]
        x2 = x.reshape(-1, self.in_features)
        if (y := prefill_linear(x2, self.out_features, lambda s: self.weight[s].float())) is None and x.is_cpu:
            y = bf16_linear(x2, self.weight)
        return self.forward_native(x) if y is None else y.view(*x.shape[:-1], self.out_features)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def native_weight(self) -> Weight | None:
        """The bf16 weight [O, I] where moeray's C kernels read it (CPU), else None."""
        return Weight(self.weight) if self.weight.device.type == "cpu" and not self.weight.is_meta else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight bf16"


def _quantized(linear: nn.Linear, bits: int, group_size: int, scale_dtype: torch.dtype, cpu_kernel: bool | None,
               w8a8: bool) -> nn.Module:
    if bits == 16:
        return BF16Linear.from_linear(linear)
    return QuantLinear.from_linear(linear, bits, group_size, scale_dtype, cpu_kernel, w8a8)


def quantize_experts(module: nn.Module | Mapping, bits: int, group_size: int = 128,
                     scale_dtype: torch.dtype = torch.bfloat16, cpu_kernel: bool | None = None,
                     w8a8: bool = False) -> nn.Module | Mapping:
    """Replaces w1 / w2 / w3 of every FeedForward in `module` by QuantLinear, in place; returns `module`.

    `module`: a Transformer (its MoE experts, or a dense model's FFNs), a MoeLayer, one FeedForward,
    or a mapping of them (ExpertShard.experts: {(layer, expert): FeedForward}). Attention, gates,
    norms, embeddings and the LM head stay as they are. Layers already quantized are left alone.
    cpu_kernel: QuantLinear.from_linear's (default: on CPU; pass False for weights moved to a GPU after).
    w8a8: int8 weights whose activations are quantized too (the module docstring's W8A8). bits 16: BF16Linear.
    """
    ffns = [m for v in module.values() for m in v.modules()] if isinstance(module, Mapping) else list(module.modules())
    for ff in ffns:
        if not isinstance(ff, FeedForward):
            continue
        for name in ("w1", "w2", "w3"):
            linear = getattr(ff, name)
            if type(linear) is nn.Linear:
                setattr(ff, name, _quantized(linear, bits, group_size, scale_dtype, cpu_kernel, w8a8))
    return module


def quantize_dense(module: nn.Module, bits: int, group_size: int = 128, scale_dtype: torch.dtype = torch.bfloat16,
                   cpu_kernel: bool | None = None, w8a8: bool = False) -> list[nn.Module]:
    """Replaces the attention projections (wq, wk, wv, wo) and the LM head (`output`) that `module` holds
    (not those left on the meta device) by QuantLinear, in place; returns the new ones. Embeddings, norms
    and MoE gates stay as they are (the gates decide routing and are a few thousand weights). At batch 1
    on the small bench model the LM head is half the bytes a token reads."""
    done = []
    for owner in module.modules():
        names = ("wq", "wk", "wv", "wo") if isinstance(owner, Attention) else \
                ("output",) if isinstance(owner, Transformer) else ()
        for name in names:
            linear = getattr(owner, name)
            if type(linear) is nn.Linear and not linear.weight.is_meta:
                done.append(_quantized(linear, bits, group_size, scale_dtype, cpu_kernel, w8a8))
                setattr(owner, name, done[-1])
    return done
