"""Tensors <-> `moeray.dataplane.v1.Tensor` messages: dtype, shape and raw little-endian bytes.

Never pickle: a peer's bytes only ever become a tensor of a known dtype whose size was checked
against the shape first, so a malformed or hostile message costs an exception, not an allocation.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch

from cluster.rpc import dataplane_pb2 as pb

assert sys.byteorder == "little", "the wire format is little-endian; big-endian hosts would need a byteswap"

DTYPES = {torch.float32: pb.DTYPE_FLOAT32, torch.bfloat16: pb.DTYPE_BFLOAT16, torch.float16: pb.DTYPE_FLOAT16}
_TORCH = {v: k for k, v in DTYPES.items()}


class CodecError(ValueError):
    pass


def encode(t: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """`t` as a message, or written into `out` (a field of the message being built, which saves
    protobuf a copy of the data). Two copies: the elements into a bytes object, which protobuf copies.

    bf16 goes through a uint8 view; a non-contiguous or non-CPU tensor is made contiguous on CPU first.
    """
    if t.dtype not in DTYPES:
        raise CodecError(f"cannot send a {t.dtype} tensor; the wire carries {', '.join(map(str, DTYPES))}")
    flat = t.detach().cpu().contiguous().reshape(-1)  # [numel], no copy if already contiguous on CPU
    out = pb.Tensor() if out is None else out
    out.dtype, out.data = DTYPES[t.dtype], flat.view(torch.uint8).numpy().tobytes()
    out.shape[:] = t.shape
    return out


def _describe(shape: list[int], dtype: torch.dtype) -> str:
    return f"shape {shape} {str(dtype).removeprefix('torch.')}"


def decode(msg: pb.Tensor, *, max_bytes: int, ndim: int | None = None, dims: dict[int, int] | None = None) -> torch.Tensor:
    """The tensor in `msg`, after checking it all against the shape: nothing is allocated for a bad one.

    `ndim` is the rank the caller expects and `dims` {axis: size} the sizes it knows. The data is not
    copied: the tensor views a bytes object that only it references (see _FRESH_BYTES).
    """
    dtype = _TORCH.get(msg.dtype)
    if dtype is None:
        known = ", ".join(f"{pb.DType.Name(v)}={v}" for v in _TORCH)
        raise CodecError(f"unknown tensor dtype {msg.dtype}; expected one of {known}")
    shape = list(msg.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"tensor shape {shape} has a negative dim")
    if ndim is not None and len(shape) != ndim:
        raise CodecError(f"tensor has rank {len(shape)} (shape {shape}), expected {ndim}")
    for axis, size in (dims or {}).items():
        if not -len(shape) <= axis < len(shape) or shape[axis] != size:
            raise CodecError(f"tensor shape {shape} should have size {size} at dim {axis}")
    need = math.prod(shape) * dtype.itemsize  # Python ints: no overflow, however big the shape
    if need > max_bytes:
        raise CodecError(f"tensor {_describe(shape, dtype)} needs {need} bytes, over the limit of {max_bytes}")
    data = msg.data  # one copy out of the message (the only one on this side)
    if len(data) != need:
        raise CodecError(f"tensor data has {len(data)} bytes, {_describe(shape, dtype)} needs {need}")
    if need == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data if _FRESH_BYTES else bytearray(data), dtype=dtype).view(shape)


def _fresh_bytes() -> bool:
    """Does reading a bytes field return a new object each time (protobuf's upb backend does)?

    Then the tensor is the sole owner of its bytes object and may write to it although bytes are
    immutable in Python; otherwise (pure-Python protobuf) decode copies into a bytearray. torch warns
    once per process about non-writable buffers; that one warning is spent here, silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(b"\0\0", dtype=torch.float16)
    probe = pb.Tensor(data=b"\0\0")
    return probe.data is not probe.data


_FRESH_BYTES = _fresh_bytes()
