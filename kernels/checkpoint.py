"""Read and write checkpoints in Hugging Face and Mistral-native formats, under our tensor names.

Our names are Mistral's (`layers.{i}.attention.wq.weight`, ...), so loaded tensors drop straight into our
modules. One table, `RULES`, maps every foreign name to ours; it serves loading (ours -> foreign name,
then `load` transform) and saving (`save` transform, then foreign name). A new format is new rows.

Loading is lazy on purpose: an expert actor asks for its experts' names only, and `Checkpoint.load`
opens only the shard files that hold them (via the index's `weight_map`) and reads only those tensors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.args import ModelArgs

Transform = Callable[[torch.Tensor, ModelArgs], torch.Tensor]


# ---- tensor names ---------------------------------------------------------------------------------

def embed_names(args: ModelArgs) -> list[str]:
    return ["tok_embeddings.weight"]


def head_names(args: ModelArgs) -> list[str]:
    return ["norm.weight", "output.weight"]


def _check_layer(args: ModelArgs, layer: int) -> str:
    if not 0 <= layer < args.n_layers:
        raise ValueError(f"layer {layer} out of range 0..{args.n_layers - 1}")
    return f"layers.{layer}."


def attention_names(args: ModelArgs, layer: int) -> list[str]:
    p = _check_layer(args, layer)
    return [p + "attention_norm.weight"] + [f"{p}attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")]


def router_names(args: ModelArgs, layer: int) -> list[str]:
    p = _check_layer(args, layer)
    return [p + "ffn_norm.weight"] + ([p + "feed_forward.gate.weight"] if args.moe else [])


def expert_names(args: ModelArgs, layer: int, expert: int) -> list[str]:
    p = _check_layer(args, layer)
    if not 0 <= expert < args.num_experts:
        raise ValueError(f"expert {expert} out of range for a model with {args.num_experts} experts (dense: none)")
    return [f"{p}feed_forward.experts.{expert}.{w}.weight" for w in ("w1", "w2", "w3")]


def ffn_names(args: ModelArgs, layer: int) -> list[str]:
    """The whole FFN half of a layer: ffn_norm, router gate, every expert (or the dense w1-w3)."""
    if args.moe:
        return router_names(args, layer) + [n for e in range(args.num_experts) for n in expert_names(args, layer, e)]
    p = _check_layer(args, layer)
    return router_names(args, layer) + [f"{p}feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]


def all_names(args: ModelArgs) -> list[str]:
    layers = [n for i in range(args.n_layers) for n in attention_names(args, i) + ffn_names(args, i)]
    return embed_names(args) + layers + head_names(args)


# ---- the name table ---------------------------------------------------------------------------------

def _rope_rows(field: str, to_mistral: bool) -> Transform:
    """HF rotates halves (j, j+hd/2), Mistral interleaved pairs (2j, 2j+1): permute each head's rows."""
    def f(w: torch.Tensor, a: ModelArgs) -> torch.Tensor:
        n, hd = getattr(a, field), a.head_dim
        shape = (n, 2, hd // 2, -1) if to_mistral else (n, hd // 2, 2, -1)
        return w.view(*shape).transpose(1, 2).reshape(n * hd, -1)
    return f


class Rule(NamedTuple):
    fmt: str
    ours: str  # template: {i} layer, {e} expert
    theirs: str
    load: Transform | None = None  # theirs -> ours
    save: Transform | None = None  # ours -> theirs


_L, _H = "layers.{i}.", "model.layers.{i}."
_HF_ROWS = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    (_L + "attention_norm.weight", _H + "input_layernorm.weight"),
    (_L + "ffn_norm.weight", _H + "post_attention_layernorm.weight"),
    (_L + "attention.wv.weight", _H + "self_attn.v_proj.weight"),
    (_L + "attention.wo.weight", _H + "self_attn.o_proj.weight"),
    (_L + "feed_forward.gate.weight", _H + "block_sparse_moe.gate.weight"),
    *((_L + f"feed_forward.experts.{{e}}.{w}.weight", _H + f"block_sparse_moe.experts.{{e}}.{w}.weight")
      for w in ("w1", "w2", "w3")),
    (_L + "feed_forward.w1.weight", _H + "mlp.gate_proj.weight"),
    (_L + "feed_forward.w3.weight", _H + "mlp.up_proj.weight"),
    (_L + "feed_forward.w2.weight", _H + "mlp.down_proj.weight"),
]
RULES: list[Rule] = [
    *(Rule("hf", ours, theirs) for ours, theirs in _HF_ROWS),
    Rule("hf", _L + "attention.wq.weight", _H + "self_attn.q_proj.weight",
         _rope_rows("n_heads", True), _rope_rows("n_heads", False)),
    Rule("hf", _L + "attention.wk.weight", _H + "self_attn.k_proj.weight",
         _rope_rows("n_kv_heads", True), _rope_rows("n_kv_heads", False)),
]
RULES += [Rule("mistral", r.ours, r.ours) for r in RULES if r.fmt == "hf"]  # Mistral names are ours


@cache
def _pattern(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\\\{(\w)\\\}", r"(?P<\1>\\d+)", re.escape(template)))


@cache
def _rename(fmt: str, name: str, to_theirs: bool) -> tuple[str, Rule] | None:
    """Our name -> (foreign name, rule) if to_theirs, else foreign -> (ours, rule); None if no row matches."""
    for r in RULES:
        src, dst = (r.ours, r.theirs) if to_theirs else (r.theirs, r.ours)
        if r.fmt == fmt and (m := _pattern(src).fullmatch(name)):
            return dst.format(**m.groupdict()), r
    return None


# ---- reading ----------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _header(file: Path) -> dict[str, dict]:
    """A safetensors header (name -> dtype, shape, offsets): 8-byte little-endian length + JSON."""
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    return header


# format -> (config file, ModelArgs parser, weight files in order of preference)
_FORMATS = {
    "hf": ("config.json", ModelArgs.from_hf_config, ("model.safetensors.index.json", "model.safetensors")),
    "mistral": ("params.json", ModelArgs.from_params_json, ("consolidated.safetensors",)),
}


@dataclass
class Checkpoint:
    """A checkpoint directory: HF (config.json + model.safetensors or sharded with model.safetensors.index.json)
    or Mistral (params.json + consolidated.safetensors)."""

    path: Path
    format: str  # "hf" | "mistral"
    args: ModelArgs
    weight_map: dict[str, str]  # foreign tensor name -> file name in `path`

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {path} does not exist")
        for fmt, (config, parse, weights) in _FORMATS.items():  # HF repos may ship both: first complete wins
            found = [w for w in weights if (path / w).exists()]
            if not (path / config).exists() or not found:
                continue
            if found[0].endswith(".index.json"):  # reading the index opens no shard
                wmap = json.loads((path / found[0]).read_text())["weight_map"]
            else:
                wmap = dict.fromkeys(_header(path / found[0]), found[0])
            return cls(path, fmt, parse(json.loads((path / config).read_text())), wmap)
        if configs := [c for c, _, _ in _FORMATS.values() if (path / c).exists()]:
            expected = ", ".join(w for _, _, ws in _FORMATS.values() for w in ws)
            raise FileNotFoundError(f"{path}: has {', '.join(configs)} but no weights (none of {expected})")
        raise FileNotFoundError(f"{path}: no config.json (Hugging Face) or params.json (Mistral) found")

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype the checkpoint stores its weights in: the token embedding's, from its file's header."""
        theirs, _ = self._source("tok_embeddings.weight")
        code = _header(self.path / self.weight_map[theirs])[theirs]["dtype"]
        if code not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: weights stored as {code}, not a float dtype moeray runs")
        return SAFETENSORS_DTYPES[code]

    def _source(self, name: str) -> tuple[str, Rule]:
        if self.args.tie_embeddings and name == "output.weight":  # tied: no head tensor is stored
            name = "tok_embeddings.weight"
        hit = _rename(self.format, name, to_theirs=True)
        if hit is None:
            raise KeyError(f"{name!r} is not a moeray tensor name (no row for format {self.format!r})")
        if hit[0] not in self.weight_map:
            raise KeyError(f"{name!r} ({self.format} name {hit[0]!r}) not found in checkpoint {self.path}")
        return hit

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None,
             progress: Callable[[int, int], None] | None = None,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Our names -> tensors on `device`, reading only those tensors from only the files that hold them.
        safetensors puts each tensor on the device as it reads it, so the host never holds the whole set."""
        src = {n: self._source(n) for n in names}  # resolve every name before reading, so a typo fails fast
        by_file: dict[str, list[str]] = {}
        for n, (theirs, _) in src.items():
            by_file.setdefault(self.weight_map[theirs], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for file, group in by_file.items():
            with safe_open(self.path / file, framework="pt", device=str(device)) as f:
                for n in group:
                    theirs, rule = src[n]
                    t = f.get_tensor(theirs)
                    t = rule.load(t, self.args) if rule.load else t  # permute before casting: exact
                    out[n] = (t.to(dtype) if dtype else t).contiguous()
                    if progress:
                        progress(len(out), len(src))
        return {n: out[n] for n in src}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Our names -> shapes, from the safetensors headers alone (no tensor data is read)."""
        out = {}
        for file in sorted(set(self.weight_map.values())):
            for theirs, info in _header(self.path / file).items():
                if hit := _rename(self.format, theirs, to_theirs=False):
                    out[hit[0]] = tuple(info["shape"])  # the RoPE permutation keeps shapes
        if self.args.tie_embeddings and "tok_embeddings.weight" in out:
            out.setdefault("output.weight", out["tok_embeddings.weight"])
        return out


# ---- writing ----------------------------------------------------------------------------------------

def _hf_config(args: ModelArgs, dtype: torch.dtype | None = None) -> dict:
    """Inverse of ModelArgs.from_hf_config, in transformers-5 style (rope_parameters)."""
    cfg = {
        "architectures": ["MixtralForCausalLM" if args.moe else "MistralForCausalLM"],
        "model_type": "mixtral" if args.moe else "mistral",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "rope_parameters": {"rope_theta": args.rope_theta, "rope_type": "default"},
        "sliding_window": args.sliding_window, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings, "bos_token_id": args.bos_id, "eos_token_id": args.eos_id,
        "hidden_act": "silu",
    }
    if args.moe:
        cfg |= {"num_local_experts": args.moe.num_experts, "num_experts_per_tok": args.moe.num_experts_per_tok}
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    return cfg


def _params_json(args: ModelArgs) -> dict:
    """Inverse of ModelArgs.from_params_json. params.json has no tie/bos/eos fields, so those are not kept."""
    p: dict[str, object] = {
        "dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim, "hidden_dim": args.hidden_dim,
        "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "norm_eps": args.norm_eps,
        "vocab_size": args.vocab_size, "rope_theta": args.rope_theta, "max_seq_len": args.max_seq_len,
    }
    if args.sliding_window is not None:
        p["sliding_window"] = args.sliding_window
    if args.moe:
        p["moe"] = {"num_experts": args.moe.num_experts, "num_experts_per_tok": args.moe.num_experts_per_tok}
    return p


def _own(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors sharing storage (tied weights, views): give each its own."""
    t = t.detach().contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


def save_hf(path: str | Path, args: ModelArgs, tensors: dict[str, torch.Tensor],
            max_shard_bytes: int | None = None) -> None:
    """config.json + model.safetensors, or model-0000k-of-0000n.safetensors + index if max_shard_bytes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if args.tie_embeddings and name == "output.weight":
            continue  # HF ties lm_head to embed_tokens and stores only the latter
        hit = _rename("hf", name, to_theirs=True)
        if hit is None:
            raise KeyError(f"{name!r} is not a moeray tensor name")
        theirs, rule = hit
        hf[theirs] = _own(rule.save(t, args) if rule.save else t)
    dtype = next(iter(hf.values())).dtype if hf else None
    (path / "config.json").write_text(json.dumps(_hf_config(args, dtype), indent=2))
    if max_shard_bytes is None:
        save_file(hf, path / "model.safetensors", metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    for name, t in hf.items():  # greedy, in order; a tensor larger than the limit gets a shard of its own
        if shards[-1] and sum(x.nbytes for x in shards[-1].values()) + t.nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = t
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    index = {"metadata": {"total_size": sum(t.nbytes for t in hf.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_mistral(path: str | Path, args: ModelArgs, tensors: dict[str, torch.Tensor]) -> None:
    """params.json + consolidated.safetensors under our names. params.json cannot say "tied", so a tied
    head is written out as its own copy of the embedding."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    out = {n: _own(t) for n, t in tensors.items()}
    if args.tie_embeddings and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"].clone()
    (path / "params.json").write_text(json.dumps(_params_json(args), indent=2))
    save_file(out, path / "consolidated.safetensors", metadata={"format": "pt"})
