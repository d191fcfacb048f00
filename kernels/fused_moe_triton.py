"""The Triton side of kernels/fused_moe.py: one grouped-GEMM kernel, compiled in two forms.

Imported only when the fused path runs (it imports triton). Rows arrive sorted by expert, each
expert's rows one contiguous range; the host cuts each range into tiles of BLOCK_M rows, the last one
shorter, and the kernel masks rows past its tile's end, so nothing is padded or gathered. Program
(tile, j) computes rows [start, end) of its tile against output columns [j*BLOCK_N, (j+1)*BLOCK_N) of
its tile's expert:

  SWIGLU=True   act = silu(x @ w1[e].T) * (x @ w3[e].T)   w = w13 [E, 2F, D], w1 rows [0, F), w3 [F, 2F)
  SWIGLU=False  out = act @ w2[e].T                       w = w2 [E, D, F]

Accumulation is fp32 (tl.dot's accumulator); the result is rounded once to the output's dtype, so
`act` is rounded once where the reference rounds w1 x, silu and the product each in the model dtype.
Shapes: R rows, N output columns, K reduction dim, E experts held.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

# TRITON_INTERPRET as it is when triton is first imported decides, for the whole process, whether
# kernels are compiled or interpreted: triton's own @jit library functions (tl.zeros, tl.sigmoid) are
# fixed one way or the other then, and the two ways do not mix in one process.
INTERPRETED = bool(knobs.runtime.interpret)


@triton.jit
def _grouped_gemm(x_ptr, w_ptr, out_ptr, tiles_ptr, N, K, stride_xm, stride_we, stride_wn, stride_om,
                  SWIGLU: tl.constexpr, INTERPRET_BF16: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile, j = tl.program_id(0), tl.program_id(1)
    e = tl.load(tiles_ptr + 3 * tile).to(tl.int64)  # the tile's expert, as its index in w
    start = tl.load(tiles_ptr + 3 * tile + 1)
    end = tl.load(tiles_ptr + 3 * tile + 2)
    rm = start + tl.arange(0, BLOCK_M)  # [BM] rows of x
    rn = j * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output columns = rows of w[e]
    rk = tl.arange(0, BLOCK_K)  # [BK]
    in_m, in_n = rm < end, rn < N
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]  # [BM, BK]
    w_ptrs = w_ptr + e * stride_we + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]  # [BK, BN]: w[e].T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # x @ w3.T (SWIGLU only)
    for k0 in range(0, K, BLOCK_K):
        in_k = rk < K - k0
        x = tl.load(x_ptrs, mask=in_m[:, None] & in_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=in_k[:, None] & in_n[None, :], other=0.0)
        if INTERPRET_BF16:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if SWIGLU:
            w3 = tl.load(w_ptrs + N * stride_wn, mask=in_k[:, None] & in_n[None, :], other=0.0)
            if INTERPRET_BF16:
                w3 = w3.to(tl.float32)
            acc3 = tl.dot(x, w3, acc3, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc3  # silu(x w1) * (x w3), in fp32
    if INTERPRET_BF16:  # round to nearest even, as a GPU's cast does (the interpreter's truncates)
        bits = acc.to(tl.uint32, bitcast=True)
        acc = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    out_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


def block_config(max_rows: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Tile sizes and launch options for experts of at most `max_rows` rows each.

    The interpreter runs programs one at a time in numpy: small tiles that still exercise several
    N and K blocks on the tests' small shapes. GPU: untuned starting points in the spirit of vLLM's
    Mixtral configs: at decode (a few rows per expert) the kernel streams weights, so short M tiles
    and many N tiles; with more rows, larger M tiles reuse each weight tile across rows. Shared memory
    (compiled ahead of time for sm_80 / sm_90, 16-divisible shapes): at most 120 KiB for 16-bit
    inputs; fp32 tiles are twice as big, so 2 stages (at most 72-120 KiB; 3-4 would pass A100's 164 KiB).
    """
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    if max_rows <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif max_rows <= 64:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    if dtype == torch.float32:
        cfg["num_stages"] = 2
    return cfg


def tiles(blocks: list[tuple[int, int, int]], block_m: int, device: torch.device) -> torch.Tensor:
    """(index in w, first row, row count) per expert -> int32 [tiles, 3]: (index, start, end) per tile."""
    out = [(i, s, min(s + block_m, start + n)) for i, start, n in blocks for s in range(start, start + n, block_m)]
    return torch.tensor(out, dtype=torch.int32, device=device)


def grouped_swiglu(rows: torch.Tensor, blocks: list[tuple[int, int, int]], w13: torch.Tensor,
                   w2: torch.Tensor) -> torch.Tensor:
    """rows [R, D] contiguous; blocks (index in w13/w2, first row, row count), non-empty; w13 [E, 2F, D],
    w2 [E, D, F] contiguous, rows' dtype. -> [R, D]; rows outside every block are left unwritten."""
    R, D = rows.shape
    F = w2.shape[2]
    cfg = block_config(max(n for _, _, n in blocks), rows.dtype, INTERPRETED)
    t = tiles(blocks, cfg["BLOCK_M"], rows.device)
    # Triton's interpreter (3.9) multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584, "not
    # supported yet") and truncates fp32 -> bf16: there the kernel widens bf16 tiles to fp32 (exact) and
    # rounds its output to nearest itself. On a GPU bf16 goes to the tensor cores as is.
    # fp32 inputs use exact fp32 products ("ieee"), not TF32, to match torch's default fp32 matmul.
    opts = dict(INTERPRET_BF16=INTERPRETED and rows.dtype == torch.bfloat16,
                PRECISION="ieee" if rows.dtype == torch.float32 else "tf32", **cfg)
    act = torch.empty(R, F, dtype=rows.dtype, device=rows.device)  # [R, F]
    _grouped_gemm[(t.shape[0], triton.cdiv(F, cfg["BLOCK_N"]))](
        rows, w13, act, t, F, D, rows.stride(0), w13.stride(0), w13.stride(1), act.stride(0), SWIGLU=True, **opts)
    out = torch.empty_like(rows)  # [R, D]
    _grouped_gemm[(t.shape[0], triton.cdiv(D, cfg["BLOCK_N"]))](
        act, w2, out, t, D, F, act.stride(0), w2.stride(0), w2.stride(1), out.stride(0), SWIGLU=False, **opts)
    return out
