"""Model hyper-parameters, read from a checkpoint's `config.json` (HF) or `params.json` (Mistral).

Field names follow Mistral's `params.json`; `from_hf_config` and `from_params_json` are the only
places that know the foreign spellings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MoeArgs:
    num_experts: int
    num_experts_per_tok: int


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int  # SwiGLU inner size (per expert for MoE)
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e4
    sliding_window: int | None = None
    max_seq_len: int = 32768
    moe: MoeArgs | None = None  # None: dense SwiGLU FFN (Mistral-7B)
    tie_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.moe and not 0 < self.moe.num_experts_per_tok <= self.moe.num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..{self.moe.num_experts}")

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts if self.moe else 0

    @classmethod
    def from_hf_config(cls, cfg: dict) -> ModelArgs:
        """`config.json` of MixtralForCausalLM / MistralForCausalLM (transformers 4.x or 5.x)."""
        arch = cfg.get("model_type")
        if arch not in ("mixtral", "mistral"):
            raise ValueError(f"unsupported model_type {arch!r} in config.json (expected 'mixtral' or 'mistral')")
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 1e4))
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported rope_type {rope['rope_type']!r} (only 'default')")
        moe = None
        if arch == "mixtral":
            moe = MoeArgs(cfg["num_local_experts"], cfg["num_experts_per_tok"])
        eos = cfg.get("eos_token_id", 2)
        return cls(
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            hidden_dim=cfg["intermediate_size"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            sliding_window=cfg.get("sliding_window"),
            max_seq_len=cfg.get("max_position_embeddings", 32768),
            moe=moe,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_id=cfg.get("bos_token_id", 1) if cfg.get("bos_token_id") is not None else 1,
            eos_id=(eos[0] if isinstance(eos, list) else eos) if eos is not None else 2,
        )

    @classmethod
    def from_params_json(cls, p: dict) -> ModelArgs:
        """Mistral's native `params.json`."""
        moe = p.get("moe")
        return cls(
            dim=p["dim"],
            n_layers=p["n_layers"],
            head_dim=p.get("head_dim") or p["dim"] // p["n_heads"],
            hidden_dim=p["hidden_dim"],
            n_heads=p["n_heads"],
            n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
            vocab_size=p["vocab_size"],
            norm_eps=p.get("norm_eps", 1e-5),
            rope_theta=float(p.get("rope_theta", 1e4)),
            sliding_window=p.get("sliding_window"),
            max_seq_len=p.get("max_seq_len", p.get("max_position_embeddings", 32768)),
            moe=MoeArgs(moe["num_experts"], moe["num_experts_per_tok"]) if moe else None,
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        if (path / "config.json").exists():
            return cls.from_hf_config(json.loads((path / "config.json").read_text()))
        if (path / "params.json").exists():
            return cls.from_params_json(json.loads((path / "params.json").read_text()))
        raise FileNotFoundError(f"{path}: no config.json (Hugging Face) or params.json (Mistral) found")
