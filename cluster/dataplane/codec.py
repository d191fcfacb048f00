"""Tensors <-> `moeray.dataplane.v1.Tensor` messages: dtype, shape and raw little-endian bytes.

Never pickle: a peer's bytes only ever become a tensor of a known dtype whose size was checked
against the shape first, so a malformed or hostile message costs an exception, not an allocation.
"""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import torch

from cluster.rpc import dataplane_pb2 as pb

if sys.byteorder != "little":
    raise ImportError("the wire format is little-endian; a big-endian host would need a byteswap here")

DTYPES = {torch.float32: pb.DTYPE_FLOAT32, torch.bfloat16: pb.DTYPE_BFLOAT16, torch.float16: pb.DTYPE_FLOAT16}
_TORCH = {v: k for k, v in DTYPES.items()}
_NUMPY = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.float16}  # bf16: its bits


class CodecError(ValueError):
    pass


def encode(t: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """`t` as a message, or written into `out` (a field of the message being built, which saves
    protobuf a copy of the data). Two copies: the elements into a bytes object, which protobuf copies.

    Few torch calls, because each costs microseconds on the hot path (tens when the caches are cold, as
    they are between one call and the next): numpy, whose tobytes() writes C order even for a
    non-contiguous tensor, viewing a CPU tensor's memory (bf16, which numpy lacks, as its int16 bits). A
    tensor on a GPU is copied to the host by numpy(force=True): the wire carries host bytes, decode
    makes CPU tensors, and the receiver moves them to its device.
    """
    if t.dtype not in DTYPES:
        raise CodecError(f"cannot send a {t.dtype} tensor; the wire carries {', '.join(map(str, DTYPES))}")
    out = pb.Tensor() if out is None else out
    out.dtype, out.data = DTYPES[t.dtype], _host(t).tobytes()
    out.shape[:] = t.shape
    return out


def _host(t: torch.Tensor) -> np.ndarray:
    """`t`'s elements (bf16 as int16) in a numpy array: a view of a CPU tensor, a host copy of another."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    try:
        return t.numpy()
    except (TypeError, RuntimeError):  # on a GPU (TypeError), or needs grad (RuntimeError)
        return t.numpy(force=True)


def _describe(shape: list[int], dtype: torch.dtype) -> str:
    return f"shape {shape} {str(dtype).removeprefix('torch.')}"


def decode(msg: pb.Tensor, *, max_bytes: int, ndim: int | None = None,
           dims: dict[int, int] | None = None) -> torch.Tensor:
    """The tensor in `msg`, after checking it all against the shape: nothing is allocated for a bad one.

    `ndim` is the rank the caller expects and `dims` {axis: size} the sizes it knows. The data is not
    copied: the tensor views a bytes object that only it references (see _FRESH_BYTES).
    """
    if msg.collective:
        raise CodecError("tensor data was sent over a collective group, not in the message")
    dtype, shape, need = _header(msg, max_bytes, ndim, dims)
    data = msg.data  # a copy out of the message, which the tensor then views
    if len(data) != need:
        raise CodecError(f"tensor data has {len(data)} bytes, {_describe(shape, dtype)} needs {need}")
    try:
        if need == 0:
            return torch.empty(shape, dtype=dtype)
        # numpy views the bytes and takes the shape; one torch call makes the tensor (see encode)
        t = torch.from_numpy(np.frombuffer(data if _FRESH_BYTES else bytearray(data), _NUMPY[dtype]).reshape(shape))
        return t.view(dtype) if dtype == torch.bfloat16 else t
    except (RuntimeError, ValueError) as e:  # [0, 2**62, 2**62]: no elements, but its strides overflow int64;
        raise CodecError(f"tensor shape {shape} cannot be represented: {e}") from None  # numpy: too many dims


def describe(t: torch.Tensor, out: pb.Tensor) -> pb.Tensor:
    """`out` says `t`'s dtype and shape, and that its elements travel over a collective group."""
    if t.dtype not in DTYPES:
        raise CodecError(f"cannot send a {t.dtype} tensor; the wire carries {', '.join(map(str, DTYPES))}")
    out.dtype, out.collective = DTYPES[t.dtype], True
    out.shape[:] = t.shape
    return out


def allocate(msg: pb.Tensor, *, max_bytes: int, device: torch.device, ndim: int | None = None,
             dims: dict[int, int] | None = None) -> torch.Tensor:
    """An uninitialised tensor for the elements a `describe`d message announces, checked as decode
    checks (dtype, rank, sizes, the byte limit) before anything is allocated."""
    if not msg.collective or msg.data:
        raise CodecError("tensor message does not announce collective data")
    dtype, shape, _ = _header(msg, max_bytes, ndim, dims)
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    except RuntimeError as e:
        raise CodecError(f"tensor shape {shape} cannot be represented: {e}") from None


def _header(msg: pb.Tensor, max_bytes: int, ndim: int | None,
            dims: dict[int, int] | None) -> tuple[torch.dtype, list[int], int]:
    """(dtype, shape, bytes the elements need) of `msg`, checked; CodecError if any is wrong."""
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
    return dtype, shape, need


def _fresh_bytes() -> bool:
    """Does reading a bytes field return a new object each time (protobuf's upb backend does)?

    Then the tensor is the sole owner of its bytes object and may write to it although bytes are
    immutable in Python; otherwise (pure-Python protobuf) decode copies into a bytearray. torch warns
    once per process about non-writable arrays; that one warning is spent here, silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.from_numpy(np.frombuffer(b"\0\0", np.float16))
    probe = pb.Tensor(data=b"\0\0")
    return probe.data is not probe.data


_FRESH_BYTES = _fresh_bytes()
