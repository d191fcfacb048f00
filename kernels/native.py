"""Small CPU kernels of our own (kernels/csrc/), compiled on first use for this machine's CPU, called through ctypes.

Why: torch's weight-only int8 CPU matmul (aten._weight_int8pack_mm) takes bf16 activations only: int8 weights
in an fp32 model (engine.dtype float32, or auto on a CPU without native bf16) took the dequantizing reference,
a pass writing the whole weight in fp32 per call. `int8_linear` is a plain C kernel for fp32 activations (see
kernels/csrc/int8_linear.c for how it sums: the same way at any batch, so a row's result never depends on the
other rows): 1.7-2.4x the reference on an expert matrix and 6-14x on the LM head at 1-16 rows, and faster than
the same linear with fp32 weights (it reads a quarter of the bytes). For bf16 activations torch's kernel stays:
the same C loop was 0.83-0.94x of it at 1-4 rows (measured, 2 threads). Written in C with neither torch's nor
Python's headers, it builds in a fraction of a second with the system's C compiler (`$CC`, else `cc` / `gcc`)
and needs no build step at install, no ninja.

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
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "int8_linear.c"
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
        log.warning("no C compiler (cc, gcc or $CC): moeray's int8 CPU kernel is off, torch's runs instead")
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
                subprocess.run([cc, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True,
                               check=True, timeout=300)
                os.replace(built, so)  # atomic: a racing process loads a whole file or builds its own
        lib = ctypes.CDLL(str(so))
    except subprocess.CalledProcessError as e:
        log.warning("moeray's int8 CPU kernel did not build with %s (torch's runs instead): %s", cc,
                    (e.stderr or "").strip()[-2000:])
        return None
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("moeray's int8 CPU kernel is off (torch's runs instead): %s", e)
        return None
    fn = lib.moeray_int8_linear
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """x fp32 [n, I] @ (qweight int8 [O, I] * scale bf16 [O, 1] or [O])^T -> fp32 [n, O], by the C kernel (CPU
    tensors); None where it does not run: no library, x not fp32, I not a multiple of 16."""
    if x.dtype != torch.float32 or scale.dtype != torch.bfloat16 or x.shape[-1] % 16 or (lib := library()) is None:
        return None  # checked before library(): a bf16-only process never builds it
    x, qweight, scale = x.contiguous(), qweight.contiguous(), scale.contiguous()
    (n, I), O = x.shape, qweight.shape[0]
    y = torch.empty(n, O)
    rc = lib.moeray_int8_linear(x.data_ptr(), n, I, qweight.data_ptr(), scale.data_ptr(), O, y.data_ptr(),
                                torch.get_num_threads())
    if rc:
        raise RuntimeError(f"moeray_int8_linear failed ({rc}) on x {tuple(x.shape)}, weight {tuple(qweight.shape)}")
    return y
