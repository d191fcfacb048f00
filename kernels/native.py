"""Small CPU kernels of our own (kernels/csrc/linear.c), compiled on first use for this machine's CPU, called
through ctypes: the fp32-activation parts of a decode step, and sampling's pass over the logits.

- `linear`: fp32 weights. torch's fp32 CPU linear is MKL's, which reads a weight at 10 GB/s at one row on an
  AMD EPYC (AVX-512) and is slower still at 4-16 rows (6 and 5 GB/s on the LM head); this kernel streams it at
  30-40 GB/s there at 1-4 rows, 2-4x MKL from 1 to 16 rows and ~1.3x at 32 (measured, 2 threads). It runs
  for 1 to MAX_ROWS rows (a decode step, a small prompt); longer prefill keeps MKL's blocked GEMM, which reads the
  rows once per block where this kernel reads them once per 4 outputs (or per output).
- `int8_linear`: int8 weights with a bf16 scale per output. torch's weight-only int8 CPU matmul
  (aten._weight_int8pack_mm) takes bf16 activations only: int8 weights in an fp32 model (engine.dtype float32,
  or auto on a CPU without native bf16) took the dequantizing reference, a pass writing the whole weight in fp32
  per call; this kernel is 2-14x that. Its sums run as two chains (even and odd blocks of 16 inputs): one chain
  waited on the FMA's latency at one row (12 GB/s a thread, 18 with two). For bf16 activations torch's kernel
  stays (the same loop was 0.83-0.94x of it at 1-4 rows on an AVX-512 + AMX Xeon).
- `w8a8_linear`: W8A8, the int8 weights with each row of x quantized to int8 too (kernels/quant.py): exact int32 sums,
  with AVX-512 VNNI 64 weights an instruction, where the weight-only kernel above converts each weight to fp32
  before its FMA and reads ~19 GB/s, compute-bound. One 14336 x 4096 linear at one row: 33-53 GB/s against 14-33.
  Without VNNI (AVX2: 16 weights a step, 4 rows a tile) it reads the rows interleaved in groups of 4
  (w8a8_block, kernels.quant.interleave_rows), one stream a tile where 4 rows side by side read at about half the
  rate out of cache: the engine's all-W8A8 decode 1.14-1.28x at batch 1 (linear.c says where).
- `bf16_linear`: bf16 weights, fp32 rows (kernels/quant.py's BF16Linear): each weight made fp32 before its FMA.
- `decode_attention`: a decode step's attention read from the paged KV pools in place, fp32 or bf16 pools,
  computing in fp32 (as the torch path does on CPU: kernels/attention.py). torch's path gathers every sequence's
  keys and values (two copies of the context a layer) and runs SDPA: 64 -> 22 us a layer at one sequence of 96
  keys, 201 -> 116 at 16 (fp32, 2 threads). Its softmax's exponentials run 16 keys at a time and each kv-head's
  outputs are summed in registers: one sequence of 4096 keys, 32 heads / 8 kv-heads, hd 128: 1.4x (fp32 and bf16
  pools; 2.5 -> 1.8 ms fp32).
- `SwiGLUWeights.ffn` / `.moe` and `AttentionWeights.block`: a SwiGLU FFN, a whole MoE layer (route, experts,
  combine) and the attention half of a decode layer (norm, QKV, RoPE, KV write, attention, wo, residual) in one
  call each, fp32, int8, W8A8 or bf16 weights: around the linears, a MoE layer took ~36 small torch ops and an attention
  ~25, more time at batch 1 than reading int8 weights. `Layers.run`: a decode step from its tokens' embedding rows
  through every layer (those same calls one after another, so the same bits) to the final RMSNorm and the LM head
  in one call, where Python between the half-layers cost ~50 us a layer and the LM head's own call ~40 us a step;
  a step of up to MAX_ROWS tokens with prompt chunks too, each token a decode row (kernels.model.token_rows).
- `decode_meta_of`: a decode step's attention metadata and RoPE (DecodeMetadata.build's and rope_freqs', the
  references) in one call where their dozen tensor ops took 140-280 us; `Layers.run` makes them in its own call.
- `row_stats`: each logits row's max, where it first occurs and its logsumexp, in one pass (sampling's; torch's
  max over a row of 32000 took 52 us and its exp another 28), a row split among the threads in fixed chunks.

All sum each output the same way at any row count (kernels/csrc/linear.c): a row's result never depends on the
other rows nor on the thread count (16 lanes: one AVX-512 vector, two AVX2 ones). The figures above are an AVX-512
EPYC's; on a 2-core AVX2 EPYC (no AVX-512) the fp32 linear reads 25-50 GB/s at one row (MKL 12-40) and W8A8 36-44
GB/s on a 4096 x 4096 weight, where before 2026-12-04 every kernel here ran 3-100x slower on such CPUs (GCC kept
their 64-byte vectors in memory). Written in C with neither torch's nor Python's headers, the library builds in a
fraction of a second with the system's C compiler (`$CC`, else `cc` / `gcc`) and needs no build step at install,
no ninja.

The library is cached under `$MOERAY_KERNEL_CACHE` (default ~/.cache/moeray/kernels), keyed by the source, the
compiler's version, the flags and this CPU's (-march=native), and written atomically: the processes of a node
may race to build it. Where there is no compiler, the build fails, or `MOERAY_NATIVE_KERNELS=0`, `library()` is
None (logged once) and callers run torch's kernels instead. OpenMP: the library links libgomp.so.1, which torch
has already loaded, so both share one thread pool; each call uses torch.get_num_threads() threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from kernels.cache import DecodeMetadata, StepSeq, decode_extent, longs

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "linear.c"
MAX_ROWS = 32  # `linear` runs for 1 to MAX_ROWS rows (see the module docstring)
STAT_MAX_V = 1 << 24  # row_stats' widest row (linear.c's: places held as fp32)
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _cpu() -> bytes:
    """What -march=native depends on: this CPU's model and feature flags (Linux), else the platform's name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("flags", "model name"))})).encode()
    except OSError:
        return f"{platform.machine()} {platform.processor()}".encode()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use (see the module docstring); None where they cannot be."""
    if os.environ.get("MOERAY_NATIVE_KERNELS", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler (cc, gcc or $CC): moeray's CPU kernels are off, torch's run instead")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
        key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), version.encode(), " ".join(FLAGS).encode(), _cpu()]))
        cache = Path(os.environ.get("MOERAY_KERNEL_CACHE") or Path.home() / ".cache" / "moeray" / "kernels")
        so = cache / f"{SOURCE.stem}-{key.hexdigest()[:16]}.so"
        if not so.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                built = Path(tmp) / so.name
                subprocess.run([cc, *FLAGS, "-o", str(built), str(SOURCE), "-lm"], capture_output=True, text=True,
                               check=True, timeout=300)
                os.replace(built, so)  # atomic: a racing process loads a whole file or builds its own
        lib = ctypes.CDLL(str(so))
    except subprocess.CalledProcessError as e:
        log.warning("moeray's CPU kernels did not build with %s (torch's run instead): %s", cc,
                    (e.stderr or "").strip()[-2000:])
        return None
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("moeray's CPU kernels are off (torch's run instead): %s", e)
        return None
    return declare(lib)


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` (a build of SOURCE) with its functions' argument and result types set."""
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.moeray_linear_f32.argtypes = [p, i64, i64, p, i64, p, ctypes.c_int]
    lib.moeray_linear_i8.argtypes = [p, i64, i64, p, p, i64, p, ctypes.c_int]
    lib.moeray_linear_w8a8.argtypes = [p, i64, i64, p, p, i64, p, ctypes.c_int]
    lib.moeray_linear_bf16.argtypes = [p, i64, i64, p, i64, p, ctypes.c_int]
    lib.moeray_decode_attention.argtypes = [p, i64, i64, i64, p, p, ctypes.c_int, i64, p, p, i64, ctypes.c_float, p,
                                            ctypes.c_int]
    f32 = ctypes.c_float
    lib.moeray_ffn.argtypes = [p, i64, i64, i64, p, f32, p, p, p, p, p, p, ctypes.c_int, p, ctypes.c_int]
    lib.moeray_moe.argtypes = [p, i64, i64, i64, p, f32, p, i64, i64, p, p, p, p, p, p, ctypes.c_int, p,
                               ctypes.c_int]
    lib.moeray_attention_block.argtypes = [p, i64, i64, p, ctypes.c_float, p, p, p, p, p, p, p, p, ctypes.c_int, i64,
                                           i64, i64, p, p, p, ctypes.c_int, p, p, p, i64, ctypes.c_float, p,
                                           ctypes.c_int]
    lib.moeray_row_stats.argtypes = [p, i64, i64, p, p, p, ctypes.c_int]
    lib.moeray_w8a8_block.argtypes = []
    lib.moeray_layers.argtypes = [p, i64, i64, p, i64, p, p, i64, p, f32, i64, i64, i64, ctypes.c_int, p, i64, p, p,
                                  i64, i64, i64, p, i64, f32, p, p, ctypes.c_int, i64, p, i64, p, ctypes.c_int]
    lib.moeray_decode_steps.argtypes = [*lib.moeray_layers.argtypes[:26], ctypes.c_int, i64, i64, p, p, ctypes.c_int]
    lib.moeray_decode_meta.argtypes = [i64, p, i64, p, p, i64, i64, i64, p, i64, p, p, p, p]
    for fn in (lib.moeray_linear_f32, lib.moeray_linear_i8, lib.moeray_linear_w8a8, lib.moeray_linear_bf16,
               lib.moeray_decode_attention,
               lib.moeray_ffn, lib.moeray_moe, lib.moeray_attention_block, lib.moeray_row_stats, lib.moeray_layers,
               lib.moeray_decode_steps, lib.moeray_decode_meta):
        fn.restype = ctypes.c_int
    return lib


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x fp32 [n, I] @ weight fp32 [O, I]^T -> fp32 [n, O] by the C kernel (CPU tensors, 1 <= n <= MAX_ROWS);
    None where it does not run: no library, not fp32, more rows, I not a multiple of 16."""
    if (x.dtype != torch.float32 or weight.dtype != torch.float32 or not 1 <= x.shape[0] <= MAX_ROWS
            or x.shape[-1] % 16 or (lib := library()) is None):
        return None
    return _call(lib.moeray_linear_f32, x, weight)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x fp32 [n, I] @ (qweight int8 [O, I] * scale bf16 [O, 1] or [O])^T -> fp32 [n, O], by the C kernel (CPU
    tensors); None where it does not run: no library, x not fp32, I not a multiple of 16."""
    if x.dtype != torch.float32 or scale.dtype != torch.bfloat16 or x.shape[-1] % 16 or (lib := library()) is None:
        return None  # checked before library(): a bf16-only process never builds it
    return _call(lib.moeray_linear_i8, x, qweight, scale.contiguous())


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x fp32 [n, I] @ weight bf16 [O, I]^T -> fp32 [n, O], each weight made fp32 (exactly) before its FMA, by the C
    kernel (CPU tensors); None where it does not run: no library, x not fp32, I not a multiple of 16."""
    if (x.dtype != torch.float32 or weight.dtype != torch.bfloat16 or x.shape[-1] % 16
            or (lib := library()) is None):
        return None
    return _call(lib.moeray_linear_bf16, x, weight)


QMAX_I = 65536  # W8A8: inputs at most (its int32 sums stay exact)


def w8a8_block() -> int | None:
    """The W8A8 kernel's weight layout in this process (linear.c's QBLK): 16, rows interleaved in blocks of 16
    (kernels.quant.interleave_rows), or 0, rows as they are (AVX-512 VNNI); None where there is no kernel."""
    return None if (lib := library()) is None else lib.moeray_w8a8_block()


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """W8A8: x fp32 [n, I], each row quantized to int8 (kernels.quant.quantize_rows), times qweight int8 [O, I] (in
    w8a8_block's layout) in exact integer sums, times the row's scale and scale bf16 [O, 1] or [O] -> fp32 [n, O]:
    kernels.quant's w8a8_reference bit for bit, by the C kernel (AVX-512 VNNI where there is one). None where it
    does not run: no library, x not fp32, I not a multiple of 16 or over QMAX_I."""
    if (x.dtype != torch.float32 or scale.dtype != torch.bfloat16 or x.shape[-1] % 16 or x.shape[-1] > QMAX_I
            or (lib := library()) is None):
        return None
    return _call(lib.moeray_linear_w8a8, x, qweight, scale.contiguous())


def row_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Of each row of x fp32 [B, V] on CPU (a step's logits): its max [B], the index where that first occurs [B]
    (torch.max(x, -1)'s, NaN counting as the max) and its logsumexp [B] (within a few fp32 ulp of
    torch.logsumexp), the same bits at any thread count, in one pass a row where torch takes three (sample(): 108 ->
    34 us at one row of 32000, 552 -> 262 at 16, 2 threads); None where it does not run (V over 2^24 among others)."""
    if (x.dtype != torch.float32 or x.dim() != 2 or x.device.type != "cpu" or 0 in x.shape or x.shape[1] > STAT_MAX_V
            or (lib := library()) is None):
        return None
    x = x.contiguous()
    B, V = x.shape
    best, index, lse = torch.empty(B), torch.empty(B, dtype=torch.long), torch.empty(B)
    if lib.moeray_row_stats(x.data_ptr(), B, V, best.data_ptr(), index.data_ptr(), lse.data_ptr(),
                            torch.get_num_threads()):
        raise RuntimeError(f"moeray_row_stats failed on x {tuple(x.shape)}")
    return best, index, lse


POOL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # KV pools decode_attention reads


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor | None:
    """Softmax attention of one new token per sequence over its keys in the paged pools, read in place (the C
    kernel; CPU tensors): q [B, H, hd], pools [S, KV, hd] fp32 or bf16, slots [B, C] pool rows, mask [B, C]
    bool (True: may attend) -> fp32 [B, H, hd], scale 1/sqrt(hd). None where it does not run: no library,
    another pool dtype, hd not a multiple of 16."""
    if (k_pool.dtype not in POOL_DTYPES or v_pool.dtype != k_pool.dtype or q.shape[-1] % 16
            or (lib := library()) is None):
        return None
    B, H, hd = q.shape
    q, slots, mask = q.float().contiguous(), slots.contiguous(), mask.contiguous()
    out = torch.empty(B, H, hd)
    rc = lib.moeray_decode_attention(q.data_ptr(), B, H, hd, k_pool.data_ptr(), v_pool.data_ptr(),
                                     POOL_DTYPES[k_pool.dtype], k_pool.shape[1], slots.data_ptr(), mask.data_ptr(),
                                     slots.shape[1], hd**-0.5, out.data_ptr(), torch.get_num_threads())
    if rc:
        raise RuntimeError(f"moeray_decode_attention failed ({rc}) on q {tuple(q.shape)}, slots {tuple(slots.shape)}")
    return out


class Weight(NamedTuple):
    """A linear's weight as the kernels read it: fp32 or bf16 [O, I] (scale None), or int8 [O, I] with its bf16
    scales [O], weight-only or, w8a8, with the activations quantized per row too (kernels/quant.py)."""

    w: torch.Tensor
    scale: torch.Tensor | None = None
    w8a8: bool = False


Norm = tuple[torch.Tensor, float]  # an RMSNorm's weight fp32 [D] and eps


def _norm_ok(norm: Norm | None, D: int) -> bool:
    return norm is None or (norm[0].dtype == torch.float32 and norm[0].shape == (D,) and norm[0].is_contiguous()
                            and norm[0].device.type == "cpu")


def _norm_args(norm: Norm | None) -> tuple[int | None, float]:
    return (None, 0.0) if norm is None else (norm[0].data_ptr(), norm[1])


# weight kinds the FFN / attention kernels read: (dtype, scales' dtype, w8a8) -> the C code's wtype
WTYPES = {(torch.float32, None, False): 0, (torch.int8, torch.bfloat16, False): 1,
          (torch.int8, torch.bfloat16, True): 2, (torch.bfloat16, None, False): 3}


def _wtype(weights: list[Weight]) -> int | None:
    """The kernels' code for `weights` if all are one kind they read (fp32; int8 with bf16 scales [O], weight-only
    or W8A8; bf16), all on CPU and contiguous, with 16k inputs (W8A8: at most QMAX_I); else None."""
    kinds = {(w.dtype, None if s is None else s.dtype, a) for w, s, a in weights}
    if len(kinds) != 1 or not all(w.device.type == "cpu" and w.is_contiguous() and w.shape[1] % 16 == 0 and
                                  (not a or w.shape[1] <= QMAX_I) and
                                  (s is None or s.numel() == w.shape[0] and s.is_contiguous()) for w, s, a in weights):
        return None
    return WTYPES.get(kinds.pop())


class SwiGLUWeights:
    """The weights of one or more SwiGLU FFNs (experts) as `ffn` and `moe` read them: each FFN's w1, w3 [F, D]
    and w2 [D, F], all fp32 or all int8 with bf16 scales; held here, so the pointers given to C stay valid.
    `of` is None for anything else (mixed kinds, other dtypes, views not contiguous, D or F not a multiple
    of 16), or where there is no library."""

    def __init__(self, ffns: list[tuple[Weight, Weight, Weight]], wtype: int, lib: ctypes.CDLL):
        self.tensors = [t for ws in ffns for w in ws for t in (w.w, w.scale) if t is not None]
        self.wtype, self.count, self.lib = wtype, len(ffns), lib
        self.D, self.F = ffns[0][2][0].shape[0], ffns[0][0][0].shape[0]

        def pointers(ts: list[torch.Tensor | None]) -> ctypes.Array:
            return (ctypes.c_void_p * len(ts))(*(None if t is None else t.data_ptr() for t in ts))

        # w1, w3, w2, then their scales: arrays of pointers, one per FFN
        self.arrays = [pointers([ws[i].scale if j else ws[i].w for ws in ffns]) for j in (0, 1) for i in range(3)]

    @classmethod
    def of(cls, ffns: list[tuple[Weight, Weight, Weight]]) -> SwiGLUWeights | None:
        if not ffns or (wtype := _wtype([w for ws in ffns for w in ws])) is None or (lib := library()) is None:
            return None
        D, F = ffns[0][2][0].shape[0], ffns[0][0][0].shape[0]
        if D % 16 or F % 16 or any((w1[0].shape, w3[0].shape, w2[0].shape) != ((F, D), (F, D), (D, F))
                                   for w1, w3, w2 in ffns):
            return None
        return cls(ffns, wtype, lib)

    def ffn(self, x: torch.Tensor, norm: Norm | None = None) -> torch.Tensor | None:
        """FFN 0 on rows x fp32 [n, D] (1 to MAX_ROWS) -> fp32 [n, D], f(x) = w2(silu(w1 x) * w3 x); given `norm`
        (an RMSNorm's fp32 weight [D] and eps), the FFN half of a layer instead, x + f(norm(x)); None where it
        does not run (another dtype, more rows)."""
        if x.dtype != torch.float32 or not 1 <= x.shape[0] <= MAX_ROWS or not _norm_ok(norm, self.D):
            return None
        x = x.contiguous()
        y = torch.empty_like(x)
        w1, w3, w2, s1, s3, s2 = self.arrays
        rc = self.lib.moeray_ffn(x.data_ptr(), x.shape[0], self.D, self.F, *_norm_args(norm), w1[0], w3[0], w2[0],
                                 s1[0], s3[0], s2[0], self.wtype, y.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"moeray_ffn failed ({rc}) on x {tuple(x.shape)}")
        return y

    def moe(self, x: torch.Tensor, gate: torch.Tensor, k: int, norm: Norm | None = None) -> torch.Tensor | None:
        """A MoE layer f over these experts: x fp32 [n, D] (1 to MAX_ROWS), router gate fp32 [E, D], top k ->
        fp32 [n, D] (kernels/csrc/linear.c says how: as kernels/moe.py's route, dispatch, experts, combine); given
        `norm`, x + f(norm(x)) as `ffn`; None where it does not run."""
        if (x.dtype != torch.float32 or gate.dtype != torch.float32 or not 1 <= x.shape[0] <= MAX_ROWS
                or gate.shape != (self.count, self.D) or not _norm_ok(norm, self.D)):
            return None
        x, gate = x.contiguous(), gate.contiguous()
        y = torch.empty_like(x)
        rc = self.lib.moeray_moe(x.data_ptr(), x.shape[0], self.D, self.F, *_norm_args(norm), gate.data_ptr(),
                                 self.count, k,
                                 *self.arrays, self.wtype, y.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"moeray_moe failed ({rc}) on x {tuple(x.shape)}")
        return y


class AttentionWeights:
    """An attention's wq, wk, wv, wo as `block` reads them (all fp32, or all int8 with bf16 scales), held here so
    the pointers given to C stay valid. `of` is None for anything else, or where there is no library."""

    def __init__(self, weights: list[Weight], wtype: int, lib: ctypes.CDLL):
        self.weights, self.wtype, self.lib = weights, wtype, lib
        self.pointers: list[int | None] = [w.data_ptr() for w, _, _ in weights]
        self.pointers += [None if s is None else s.data_ptr() for _, s, _ in weights]

    @classmethod
    def of(cls, wq: Weight, wk: Weight, wv: Weight, wo: Weight) -> AttentionWeights | None:
        weights = [wq, wk, wv, wo]
        if (wtype := _wtype(weights)) is None or (lib := library()) is None:
            return None
        return cls(weights, wtype, lib)

    def block(self, x: torch.Tensor, norm: torch.Tensor, eps: float, rope: torch.Tensor, k_pool: torch.Tensor,
              v_pool: torch.Tensor, write_slots: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor,
              n_heads: int) -> torch.Tensor | None:
        """x + attention(norm(x)) for a decode step (kernels/csrc/linear.c: moeray_attention_block): x fp32 [B, D]
        (1 to MAX_ROWS), norm fp32 [D], rope [B, hd/2, 2] (cos, sin), pools [S, KV, hd] fp32 or bf16 (written
        in place), write_slots [B], slots / mask [B, C] as DecodeMetadata's -> fp32 [B, D]; None where it does
        not run (another dtype, more rows, another pool dtype)."""
        B, D = x.shape
        hd, KV = k_pool.shape[2], k_pool.shape[1]
        if (x.dtype != torch.float32 or norm.dtype != torch.float32 or not 1 <= B <= MAX_ROWS
                or k_pool.dtype not in POOL_DTYPES or v_pool.dtype != k_pool.dtype or hd % 16):
            return None
        x, rope, slots, mask = x.contiguous(), rope.contiguous(), slots.contiguous(), mask.contiguous()
        write_slots = write_slots.contiguous()
        out = torch.empty_like(x)
        rc = self.lib.moeray_attention_block(
            x.data_ptr(), B, D, norm.data_ptr(), eps, *self.pointers, self.wtype, n_heads, KV, hd, rope.data_ptr(),
            k_pool.data_ptr(), v_pool.data_ptr(), POOL_DTYPES[k_pool.dtype], write_slots.data_ptr(), slots.data_ptr(),
            mask.data_ptr(), slots.shape[1], hd**-0.5, out.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"moeray_attention_block failed ({rc}) on x {tuple(x.shape)}")
        return out


def _call(fn, x: torch.Tensor, weight: torch.Tensor, *scale: torch.Tensor) -> torch.Tensor:
    x, weight = x.contiguous(), weight.contiguous()
    (n, I), O = x.shape, weight.shape[0]
    y = torch.empty(n, O)
    if n == 0:  # a prefill chunk that samples no sequence: the LM head's rows (the kernels take n >= 1)
        return y
    if fn(x.data_ptr(), n, I, weight.data_ptr(), *(t.data_ptr() for t in scale), O, y.data_ptr(),
          torch.get_num_threads()):
        raise RuntimeError(f"{fn.__name__} failed on x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    return y


@dataclass(frozen=True, eq=False)
class LayerParts:
    """What moeray_layers reads of one layer (TransformerBlock.native_parts): its attention's weights and norm, its
    FFN half's norm and weights: a MoE layer's experts with their router gate fp32 [E, D] and top k, or (gate
    None) a dense FFN."""

    attention: AttentionWeights
    attention_norm: Norm
    ffn: SwiGLUWeights
    ffn_norm: Norm
    gate: torch.Tensor | None
    k: int


_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class _Layer(ctypes.Structure):
    """kernels/csrc/linear.c's moeray_layer, field for field."""

    _fields_ = [("attn_norm", _P), ("ffn_norm", _P), ("gate", _P), ("eps", ctypes.c_float),
                *((n, _P) for n in ("wq", "wk", "wv", "wo", "sq", "sk", "sv", "so")),
                ("attn_wtype", ctypes.c_int), ("ffn_wtype", ctypes.c_int), ("k_pool", _P), ("v_pool", _P),
                ("E", _I64), ("k", _I64), ("F", _I64), *((n, _P) for n in ("w1", "w3", "w2", "s1", "s3", "s2"))]


class Layers:
    """A model as `run` takes a decode step from its tokens to its final norm in one call (moeray_layers: the tokens'
    embedding rows, then each layer's attention block and its MoE or FFN kernel with ffn_norm and the residual, the
    same bits as a call a half-layer, then the final RMSNorm), and on to its logits where it has an LM head the
    kernels read (`head`: its pointers, wtype and outputs; the same bits as the head's own call on those rows); with
    its KV pools; holds what the pointers given to C point to. `of` is None where a part does not fit (norms, gate,
    shapes, embedding or pools the kernels do not read), or where there is no library."""

    def __init__(self, parts: list[LayerParts], k_pools: list[torch.Tensor], v_pools: list[torch.Tensor],
                 embedding: torch.Tensor, norm: Norm, head: Weight | None, lib: ctypes.CDLL):
        self.parts, self.pools, self.embedding, self.norm, self.lib = parts, (k_pools, v_pools), embedding, norm, lib
        self.head_weight = head  # what `head` points to, held
        self.head = None if head is None else (
            head.w.data_ptr(), None if head.scale is None else head.scale.data_ptr(), _wtype([head]), head.w.shape[0])
        self.D = parts[0].ffn.D
        self.KV, self.hd = k_pools[0].shape[1:]
        self.pool_dtype = k_pools[0].dtype
        self.array = (_Layer * len(parts))()
        for layer, part, k_pool, v_pool in zip(self.array, parts, k_pools, v_pools, strict=True):
            a, f = part.attention, part.ffn
            layer.attn_norm, layer.eps = part.attention_norm[0].data_ptr(), part.attention_norm[1]
            layer.ffn_norm = part.ffn_norm[0].data_ptr()
            layer.gate = None if part.gate is None else part.gate.data_ptr()
            layer.wq, layer.wk, layer.wv, layer.wo, layer.sq, layer.sk, layer.sv, layer.so = a.pointers
            layer.attn_wtype, layer.ffn_wtype = a.wtype, f.wtype
            layer.k_pool, layer.v_pool = k_pool.data_ptr(), v_pool.data_ptr()
            layer.E, layer.k, layer.F = f.count, part.k, f.F
            layer.w1, layer.w3, layer.w2, layer.s1, layer.s3, layer.s2 = (ctypes.addressof(t) for t in f.arrays)

    @classmethod
    def of(cls, parts: list[LayerParts], k_pools: list[torch.Tensor], v_pools: list[torch.Tensor],
           embedding: torch.Tensor, norm: Norm, head: Weight | None = None) -> Layers | None:
        """parts: every layer's, in order; embedding: the token embedding table fp32 [V, D]; norm: the final norm;
        head: the LM head's weight [O, D], left out (None: `run` gives the final norm's output) where the kernels do
        not read it."""
        if not parts or (lib := library()) is None:
            return None
        D = parts[0].ffn.D
        pools = [*k_pools, *v_pools]
        if (any(p.shape != pools[0].shape or p.dtype != pools[0].dtype or not p.is_contiguous() for p in pools)
                or pools[0].dtype not in POOL_DTYPES or pools[0].device.type != "cpu" or pools[0].shape[2] % 16):
            return None
        if (embedding.dtype != torch.float32 or embedding.dim() != 2 or embedding.shape[1] != D
                or not embedding.is_contiguous() or embedding.device.type != "cpu" or not _norm_ok(norm, D)):
            return None
        for p in parts:
            if (p.ffn.D != D or p.attention.weights[0][0].shape[1] != D or p.attention_norm[1] != p.ffn_norm[1]
                    or not (_norm_ok(p.attention_norm, D) and _norm_ok(p.ffn_norm, D))):
                return None
            if p.gate is None and p.ffn.count != 1:
                return None
            if p.gate is not None and (p.gate.dtype != torch.float32 or p.gate.shape != (p.ffn.count, D)
                                       or not p.gate.is_contiguous() or not 1 <= p.k <= p.ffn.count):
                return None
        if head is not None and (_wtype([head]) is None or head.w.dim() != 2 or head.w.shape[1] != D):
            head = None
        return cls(parts, k_pools, v_pools, embedding, norm, head, lib)

    def run(self, tokens: torch.Tensor, decode: DecodeInputs, n_heads: int, rows: torch.Tensor) -> torch.Tensor | None:
        """A decode step's tokens int64 [B] (1 to MAX_ROWS), what its metadata and RoPE are made of (decode: made in
        the same call, as decode_meta_of makes them) -> with a head, the logits fp32 [S, O] of the rows `rows` int64
        [S] of the output; without, the final norm of the last layer's output fp32 [B, D]. The pools written in
        place. None where it does not run (another dtype, more rows); IndexError for a token outside the embedding
        table, ValueError for metadata that cannot be made (decode_meta_of's)."""
        (B,) = tokens.shape
        if (tokens.dtype != torch.int64 or rows.dtype != torch.int64 or not 1 <= B <= MAX_ROWS or decode.B != B
                or not tokens.is_contiguous() or not rows.is_contiguous()):
            return None
        out = torch.empty(B, self.D)
        head = self.head
        logits = None if head is None else torch.empty(len(rows), head[3])
        self._check(self.lib.moeray_layers(*self._step_args(out, tokens, decode, n_heads),
                                           *(head or (None, None, 0, 0)), rows.data_ptr(), len(rows),
                                           None if logits is None else logits.data_ptr(), torch.get_num_threads()),
                    "moeray_layers", tokens, decode)
        return out if logits is None else logits

    def run_steps(self, tokens: torch.Tensor, decode: DecodeInputs, n_heads: int,
                  steps: int) -> tuple[list[list[int]], list[list[float]]] | None:
        """`steps` greedy decode steps of B sequences in one call (moeray_decode_steps): tokens int64 [B], the first
        step's inputs; decode: decode_inputs(..., steps) -> each step's chosen tokens and their logprobs, [steps][B]
        lists: each step the same bits as `run` on that step's inputs and sampling's greedy path on its logits. The
        pools written in place. None where it does not run (no head in the call, a vocabulary row_stats does not
        take, more rows); run's errors."""
        (B,) = tokens.shape
        if (self.head is None or self.head[3] > STAT_MAX_V or tokens.dtype != torch.int64 or not 1 <= B <= MAX_ROWS
                or decode.B != B or not tokens.is_contiguous() or steps < 1):
            return None
        x, chosen, logprobs = torch.empty(B, self.D), torch.empty(steps, B, dtype=torch.int64), torch.empty(steps, B)
        self._check(self.lib.moeray_decode_steps(*self._step_args(x, tokens, decode, n_heads), *self.head, steps,
                                                 chosen.data_ptr(), logprobs.data_ptr(), torch.get_num_threads()),
                    "moeray_decode_steps", tokens, decode)
        return chosen.tolist(), logprobs.tolist()

    def _step_args(self, x: torch.Tensor, tokens: torch.Tensor, decode: DecodeInputs, n_heads: int) -> tuple:
        """moeray_layers' and moeray_decode_steps' arguments up to the LM head's: x [B, D] written, the tokens, the
        layers, the final norm, the shapes, the pools' dtype, what the metadata is made of, the attention's scale."""
        return (x.data_ptr(), x.shape[0], self.D, self.embedding.data_ptr(), self.embedding.shape[0],
                tokens.data_ptr(), ctypes.addressof(self.array), len(self.parts), self.norm[0].data_ptr(),
                self.norm[1], n_heads, self.KV, self.hd, POOL_DTYPES[self.pool_dtype], *decode.args(), self.hd**-0.5)

    def _check(self, rc: int, fn: str, tokens: torch.Tensor, decode: DecodeInputs) -> None:
        """Raises for `fn`'s nonzero `rc`: IndexError for a token outside the embedding table (3), decode_meta_of's
        ValueError for metadata that cannot be made (4), else RuntimeError."""
        if rc == 3:
            raise IndexError(f"a token id is outside the embedding table [0, {self.embedding.shape[0]}): "
                             f"{tokens.tolist()}")
        if rc == 4:
            decode_meta_of(decode)  # raises its ValueError
        if rc:
            raise RuntimeError(f"{fn} failed ({rc}) on tokens {tuple(tokens.shape)}")


class DecodeInputs(NamedTuple):
    """What a decode step's metadata and RoPE are made of, as moeray_decode_meta reads them (decode_inputs): B
    sequences; ints: their positions [B], ring sizes [B], then each block table's first `width` blocks [B, width]
    (0 past its end); C, the most keys a sequence reads; block_size; window (0: none); inv_freq: rope's [hd/2] fp32."""

    B: int
    width: int
    C: int
    block_size: int
    window: int
    ints: torch.Tensor
    inv_freq: torch.Tensor

    def args(self) -> tuple[int, ...]:
        """moeray_decode_meta's arguments after B: tables, width, starts, rings, block_size, window, C, inv_freq,
        half."""
        at, B = self.ints.data_ptr(), self.B
        return (at + 16 * B, self.width, at, at + 8 * B, self.block_size, self.window, self.C, self.inv_freq.data_ptr(),
                self.inv_freq.shape[0])


def decode_inputs(seqs: list[StepSeq], block_size: int, window: int | None, inv_freq: torch.Tensor,
                  steps: int = 1) -> DecodeInputs | None:
    """A decode step's DecodeInputs (one tensor op: what Step.begin does on CPU where the kernels run); given
    `steps`, those of that many steps in one call (Layers.run_steps): the first step's positions, C and the block
    tables the last step's (decode_extent's); None where they do not run (no library)."""
    if library() is None or inv_freq.dtype != torch.float32 or inv_freq.device.type != "cpu":
        return None
    assert all(s.n == 1 for s in seqs), "a decode step has one new token per sequence"
    last = seqs if steps == 1 else [StepSeq(s.block_table, s.start + steps - 1, 1) for s in seqs]
    _, rings, C, tables = decode_extent(last, block_size)
    ints = longs([*(s.start for s in seqs), *rings, *(b for table in tables for b in table)])
    return DecodeInputs(len(seqs), len(tables[0]), C, block_size, window or 0, ints, inv_freq)


def decode_meta_of(d: DecodeInputs) -> tuple[DecodeMetadata, torch.Tensor, torch.Tensor]:
    """The DecodeMetadata (as DecodeMetadata.build's, the reference), RoPE [B, hd/2, 2] (cos, sin: rope_freqs' within
    an ulp, C's cosf and sinf against torch's) and mask [B, C] of a decode step, by one C call (in a step's prologue
    the dozen tensor ops of build and rope_freqs cost 140-280 us, each slowed by the weights just streamed).
    ValueError for a block table too short (AssertionError in build)."""
    lib = library()
    assert lib is not None, "DecodeInputs are made where the library is"
    B, C, half = d.B, d.C, d.inv_freq.shape[0]
    slots = torch.empty(B * (C + 1), dtype=torch.int64)  # write slots [B], then the read slots [B, C]
    mask, rope = torch.empty(B, C, dtype=torch.bool), torch.empty(B, half, 2)
    if lib.moeray_decode_meta(B, *d.args(), slots.data_ptr(), slots.data_ptr() + 8 * B, mask.data_ptr(),
                              rope.data_ptr()):
        raise ValueError(f"decode metadata: a block table too short, or bad arguments: positions {d.ints[:B].tolist()},"
                         f" rings {d.ints[B : 2 * B].tolist()}, tables {d.ints[2 * B :].view(B, -1).tolist()}")
    meta = DecodeMetadata(positions=d.ints[:B], ctx_slots=slots[B:].view(B, C), mask=mask[:, None, None],
                          write_slots=slots[:B])
    return meta, rope, mask
