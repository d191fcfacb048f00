"""Rotary position embeddings, Mistral's convention: rotate interleaved pairs (2j, 2j+1).

Hugging Face checkpoints rotate halves (j, j + hd/2) instead; the loader permutes their wq/wk rows
once (kernels/checkpoint.py), so there is one RoPE here.
Shapes: T tokens in the step, H heads, hd head_dim.
"""

import functools

import torch


def rope_freqs(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Unit complex rotations for each position: [T] -> [T, hd/2] complex64.

    Computed per step from the step's positions (shared by all layers), on their device, so there is
    no table to size for the longest context. fp32 angles, as in transformers and mistral-inference.
    """
    angles = torch.outer(positions.to(torch.float32), inv_freq(head_dim, theta, positions.device))  # [T, hd/2]
    return torch.polar(torch.ones_like(angles), angles)


@functools.cache
def inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """theta^(-2j / hd) for each pair j: [hd/2] fp32 (made once: three ops fewer every step; a plain tensor even
    when first asked for under inference_mode, so training can read it too)."""
    with torch.inference_mode(False):
        pairs = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)  # [hd/2]
        return 1.0 / theta ** (pairs / head_dim)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [T, H, hd] rotated by freqs [T, hd/2]; computed in fp32, returned in x's dtype."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [T, H, hd/2]
    return torch.view_as_real(xc * freqs[:, None, :]).flatten(-2).type_as(x)  # [T, H, hd]
