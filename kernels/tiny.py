"""Tiny random-init checkpoints in Hugging Face format, with a small trained tokenizer.

They exercise exactly the code that loads Mixtral-8x7B (config.json + safetensors + tokenizer.model),
in a fraction of a second, with no download.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kernels.args import ModelArgs, MoeArgs
from kernels.checkpoint import save_hf
from kernels.model import Transformer
from kernels.tokenizer import default_corpus, train_tokenizer

TINY_VOCAB = 512


def tiny_args(arch: str = "mixtral", **overrides) -> ModelArgs:
    """Mixtral's shape (GQA 2:1, 8 experts, top-2, RoPE 1e6) or Mistral's (dense, sliding window), scaled down."""
    common = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                  vocab_size=TINY_VOCAB, max_seq_len=2048)
    if arch == "mixtral":
        base = dict(common, rope_theta=1e6, moe=MoeArgs(num_experts=8, num_experts_per_tok=2))
    elif arch == "mistral":
        base = dict(common, rope_theta=1e4, sliding_window=32)
    else:
        raise ValueError(f"arch must be 'mixtral' or 'mistral', got {arch!r}")
    return ModelArgs(**{**base, **overrides})


def random_weights(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """N(0, 1/fan_in) matrices and unit norms: activations stay O(1), so logits are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in Transformer(args).state_dict().items()}
    for name, shape in shapes.items():
        if len(shape) == 1:
            out[name] = torch.ones(shape)
        else:
            fan_in = 1 if name == "tok_embeddings.weight" else shape[1]
            out[name] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return out


def make_tiny(path: str | Path, arch: str = "mixtral", seed: int = 0, force: bool = False, **overrides) -> Path:
    """Writes config.json, model.safetensors and tokenizer.model to `path`, which must not exist or be
    empty unless `force` (a typo must not silently replace a real checkpoint's files)."""
    path = Path(path)
    if not force and path.is_dir() and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty: refusing to overwrite what is there "
                              "(--force, or force=True, writes into it anyway)")
    path.mkdir(parents=True, exist_ok=True)
    args = tiny_args(arch, **overrides)
    save_hf(path, args, random_weights(args, seed))
    # the shipped corpus trains ~6k pieces at most; a tokenizer smaller than the embedding table is fine
    train_tokenizer(default_corpus(), path / "tokenizer.model", vocab_size=min(args.vocab_size, TINY_VOCAB))
    return path
