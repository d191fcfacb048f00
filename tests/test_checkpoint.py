"""kernels/checkpoint.py against checkpoints that transformers itself writes (tiny seeded Mixtral / Mistral).

The expected tensors are derived here from the transformers model's in-memory state dict, with the name
map and the RoPE row permutation written out independently of the module under test.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding, apply_rotary_pos_emb

from kernels import checkpoint as ck
from kernels.args import ModelArgs, MoeArgs
from kernels.checkpoint import (
    Checkpoint,
    all_names,
    attention_names,
    embed_names,
    expert_names,
    ffn_names,
    head_names,
    router_names,
    save_hf,
    save_mistral,
)

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
KINDS = ["mixtral", "mistral"]


def make_model(kind: str, tie: bool = False):
    torch.manual_seed({"mixtral": 0, "mistral": 1}[kind] + 10 * tie)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2,
                                                 tie_word_embeddings=tie))
    else:
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=16, tie_word_embeddings=tie))
    with torch.no_grad():
        for p in model.parameters():  # norms too: no two tensors should look alike
            p.normal_(0, 0.3)
    return model.eval()


def rope_rows(w: torch.Tensor, n: int, hd: int) -> torch.Tensor:
    """HF row h*hd + r*hd/2 + j (halves) becomes Mistral row h*hd + 2j + r (interleaved pairs)."""
    return w[[h * hd + r * (hd // 2) + j for h in range(n) for j in range(hd // 2) for r in range(2)]]


def expected_ours(model) -> dict[str, torch.Tensor]:
    """Our names -> tensors from the model's state dict (transformers 5 keeps experts fused in memory)."""
    c, sd = model.config, model.state_dict()
    hd = c.hidden_size // c.num_attention_heads
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        out[p + "attention_norm.weight"] = sd[q + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[q + "post_attention_layernorm.weight"]
        out[p + "attention.wq.weight"] = rope_rows(sd[q + "self_attn.q_proj.weight"], c.num_attention_heads, hd)
        out[p + "attention.wk.weight"] = rope_rows(sd[q + "self_attn.k_proj.weight"], c.num_key_value_heads, hd)
        out[p + "attention.wv.weight"] = sd[q + "self_attn.v_proj.weight"]
        out[p + "attention.wo.weight"] = sd[q + "self_attn.o_proj.weight"]
        if c.model_type == "mixtral":
            out[p + "feed_forward.gate.weight"] = sd[q + "mlp.gate.weight"]
            F = c.intermediate_size
            for e in range(c.num_local_experts):
                gate_up = sd[q + "mlp.experts.gate_up_proj"][e]  # [2F, D]: w1 rows, then w3 rows
                out[p + f"feed_forward.experts.{e}.w1.weight"] = gate_up[:F]
                out[p + f"feed_forward.experts.{e}.w3.weight"] = gate_up[F:]
                out[p + f"feed_forward.experts.{e}.w2.weight"] = sd[q + "mlp.experts.down_proj"][e]
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[p + f"feed_forward.{ours}.weight"] = sd[q + f"mlp.{theirs}.weight"]
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """kind -> model, expected tensors, and single-file / sharded checkpoints written by transformers."""
    out = {}
    for kind in KINDS:
        model, root = make_model(kind), tmp_path_factory.mktemp(kind)
        model.save_pretrained(root / "single")
        model.save_pretrained(root / "sharded", max_shard_size="20KB")
        shards = set(json.loads((root / "sharded/model.safetensors.index.json").read_text())["weight_map"].values())
        assert len(shards) > 3 and not (root / "sharded/model.safetensors").exists()
        out[kind] = dict(model=model, expected=expected_ours(model), single=root / "single", sharded=root / "sharded")
    return out


def assert_same(got: dict, want: dict):
    assert set(got) == set(want), set(got) ^ set(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].is_contiguous(), n
        assert torch.equal(got[n], want[n]), n


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def logits(model, vocab=64):
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids).logits


# ---- names ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_name_lists_partition_the_checkpoint(hf, kind):
    args = Checkpoint.open(hf[kind]["single"]).args
    names = all_names(args)
    assert len(names) == len(set(names)) and set(names) == set(hf[kind]["expected"])
    per_layer = [n for i in range(args.n_layers) for n in attention_names(args, i) + ffn_names(args, i)]
    assert names == embed_names(args) + per_layer + head_names(args)
    assert all(n.startswith("layers.1.") for n in attention_names(args, 1) + ffn_names(args, 1))
    if args.moe:
        experts = [n for e in range(4) for n in expert_names(args, 1, e)]
        assert ffn_names(args, 1) == router_names(args, 1) + experts
        assert router_names(args, 1) == ["layers.1.ffn_norm.weight", "layers.1.feed_forward.gate.weight"]
        with pytest.raises(ValueError):
            expert_names(args, 0, 4)
    else:
        assert router_names(args, 1) == ["layers.1.ffn_norm.weight"]
        with pytest.raises(ValueError, match="expert"):
            expert_names(args, 0, 0)
    with pytest.raises(ValueError, match="layer"):
        attention_names(args, args.n_layers)


# ---- loading HF -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("kind", KINDS)
def test_load_hf_equals_transformers_state(hf, kind, layout):
    c = Checkpoint.open(hf[kind][layout])
    cfg = hf[kind]["model"].config
    assert c.format == "hf"
    assert (c.args.dim, c.args.n_layers, c.args.head_dim, c.args.n_kv_heads, c.args.num_experts) == \
        (32, 2, 8, 2, 4 if kind == "mixtral" else 0)
    assert c.args.rope_theta == cfg.rope_parameters["rope_theta"] and c.args.norm_eps == cfg.rms_norm_eps
    calls = []
    got = c.load(all_names(c.args), progress=lambda done, total: calls.append((done, total)))
    assert_same(got, hf[kind]["expected"])
    n = len(got)
    assert calls == [(i, n) for i in range(1, n + 1)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_converts_dtype(hf, dtype):
    c = Checkpoint.open(hf["mixtral"]["sharded"])
    got = c.load(all_names(c.args), dtype=dtype)
    assert_same(got, {n: t.to(dtype) for n, t in hf["mixtral"]["expected"].items()})


def test_load_bf16_source(hf, tmp_path):
    copy.deepcopy(hf["mistral"]["model"]).to(torch.bfloat16).save_pretrained(tmp_path)
    c = Checkpoint.open(tmp_path)
    assert_same(c.load(all_names(c.args)), {n: t.to(torch.bfloat16) for n, t in hf["mistral"]["expected"].items()})
    got = c.load(["layers.1.attention.wk.weight"], dtype=torch.float32)["layers.1.attention.wk.weight"]
    assert torch.equal(got, hf["mistral"]["expected"]["layers.1.attention.wk.weight"].bfloat16().float())


def test_loaded_wq_wk_give_hf_attention_scores_under_interleaved_rope(hf):
    """The permutation is the right one: Mistral's pairwise RoPE on our wq/wk == HF's rotate-half RoPE."""
    model, c = hf["mixtral"]["model"], Checkpoint.open(hf["mixtral"]["single"])
    a, T = c.args, 7
    w = c.load(["layers.0.attention.wq.weight", "layers.0.attention.wk.weight"])
    x = torch.randn(T, a.dim, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T)
    # ours: rotate (2j, 2j+1) by pos * theta^(-2j/hd), as complex numbers
    freqs = torch.outer(pos.float(), a.rope_theta ** (-torch.arange(0, a.head_dim, 2).float() / a.head_dim))
    rot = torch.polar(torch.ones_like(freqs), freqs)[:, None]  # [T, 1, hd/2]
    def ours(wt, n):
        y = (x @ wt.T).view(T, n, a.head_dim // 2, 2)
        return torch.view_as_real(torch.view_as_complex(y.contiguous()) * rot).flatten(2)  # [T, n, hd]
    q_m, k_m = ours(w["layers.0.attention.wq.weight"], a.n_heads), ours(w["layers.0.attention.wk.weight"], a.n_kv_heads)
    attn = model.model.layers[0].self_attn
    q_h = (x @ attn.q_proj.weight.T).view(1, T, a.n_heads, a.head_dim).transpose(1, 2)
    k_h = (x @ attn.k_proj.weight.T).view(1, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
    cos, sin = MixtralRotaryEmbedding(model.config)(x[None], pos[None])
    q_h, k_h = apply_rotary_pos_emb(q_h, k_h, cos, sin)
    g = a.n_heads // a.n_kv_heads
    for h in range(a.n_heads):
        scores_m = q_m[:, h] @ k_m[:, h // g].T
        scores_h = q_h[0, h] @ k_h[0, h // g].T
        torch.testing.assert_close(scores_m, scores_h, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(q_m[1:, 0], q_h[0, 0, 1:], atol=1e-3)  # the layouts really differ


# ---- Mistral native ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_mistral_native_loads_same_as_hf(hf, kind, tmp_path):
    model, expected = hf[kind]["model"], hf[kind]["expected"]
    cfg = model.config
    params = {"dim": 32, "n_layers": 2, "head_dim": 8, "hidden_dim": 48, "n_heads": 4, "n_kv_heads": 2,
              "norm_eps": cfg.rms_norm_eps, "vocab_size": 64, "rope_theta": cfg.rope_parameters["rope_theta"],
              "max_seq_len": 128}
    if kind == "mixtral":
        params["moe"] = {"num_experts": 4, "num_experts_per_tok": 2}
    else:
        params["sliding_window"] = 16
    (tmp_path / "params.json").write_text(json.dumps(params))
    save_file({n: t.contiguous() for n, t in expected.items()}, tmp_path / "consolidated.safetensors")
    native, from_hf = Checkpoint.open(tmp_path), Checkpoint.open(hf[kind]["single"])
    assert native.format == "mistral" and native.args == from_hf.args
    assert_same(native.load(all_names(native.args)), from_hf.load(all_names(from_hf.args)))
    assert native.shapes() == from_hf.shapes()
    # save_mistral writes the same file from our tensors
    save_mistral(tmp_path / "again", native.args, expected)
    assert json.loads((tmp_path / "again/params.json").read_text()) == params
    assert_same(load_file(tmp_path / "again/consolidated.safetensors"),
                load_file(tmp_path / "consolidated.safetensors"))
    shutil.copy(hf[kind]["single"] / "config.json", tmp_path)  # a config.json without HF weights: still native
    assert Checkpoint.open(tmp_path).format == "mistral"
    shutil.copy(hf[kind]["single"] / "model.safetensors", tmp_path)  # both complete, as in some HF repos: HF
    assert Checkpoint.open(tmp_path).format == "hf"


# ---- partial loading --------------------------------------------------------------------------------

class SpySafeOpen:
    """Stands in for safetensors.safe_open in the checkpoint module; records opened files and read tensors."""

    def __init__(self):
        self.files, self.reads = [], []

    def __call__(self, file, *a, **kw):
        self.files.append(Path(file).name)
        return _Recorder(safe_open(file, *a, **kw), self.reads)


class _Recorder:
    def __init__(self, handle, reads):
        self._h, self._reads = handle, reads

    def __enter__(self):
        self._h.__enter__()
        return self

    def __exit__(self, *exc):
        return self._h.__exit__(*exc)

    def get_tensor(self, name):
        self._reads.append(name)
        return self._h.get_tensor(name)

    def get_slice(self, name):
        self._reads.append(name)
        return self._h.get_slice(name)

    def __getattr__(self, attr):
        return getattr(self._h, attr)


def hf_name(ours: str) -> str:
    """The test's own ours -> HF map for the names the partial tests request."""
    for a, b in (("attention_norm", "input_layernorm"), ("attention.wq", "self_attn.q_proj"),
                 ("attention.wk", "self_attn.k_proj"), ("attention.wv", "self_attn.v_proj"),
                 ("attention.wo", "self_attn.o_proj"), ("feed_forward", "block_sparse_moe")):
        ours = ours.replace(a, b)
    return "model." + ours


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_partial_load_reads_only_requested_tensors(hf, layout, monkeypatch):
    path = hf["mixtral"][layout]
    c = Checkpoint.open(path)
    want = expert_names(c.args, 1, 2) + attention_names(c.args, 0)
    spy = SpySafeOpen()
    monkeypatch.setattr(ck, "safe_open", spy)
    got = c.load(want)
    assert list(got) == want
    assert_same(got, {n: hf["mixtral"]["expected"][n] for n in want})
    assert sorted(spy.reads) == sorted(hf_name(n) for n in want)
    if layout == "sharded":
        wmap = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        needed = {wmap[hf_name(n)] for n in want}
        assert sorted(spy.files) == sorted(needed) and len(needed) < len(set(wmap.values()))
    else:
        assert spy.files == ["model.safetensors"]


def test_partial_load_without_unneeded_shards(hf, tmp_path):
    path = shutil.copytree(hf["mixtral"]["sharded"], tmp_path / "ck")
    c = Checkpoint.open(path)
    want = expert_names(c.args, 0, 3)
    wmap = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {wmap[hf_name(n)] for n in want}
    removed = [f for f in path.glob("model-*.safetensors") if f.name not in keep]
    assert removed
    for f in removed:
        f.unlink()
    c = Checkpoint.open(path)
    assert_same(c.load(want), {n: hf["mixtral"]["expected"][n] for n in want})
    with pytest.raises(FileNotFoundError):  # the deleted files really held the rest
        c.load(all_names(c.args))


def test_shapes_read_headers_only(hf, tmp_path, monkeypatch):
    path = shutil.copytree(hf["mixtral"]["sharded"], tmp_path / "ck")
    for f in path.glob("*.safetensors"):  # cut every file after its header: no tensor data left to read
        data = f.read_bytes()
        f.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])
    spy = SpySafeOpen()
    monkeypatch.setattr(ck, "safe_open", spy)
    shapes = Checkpoint.open(path).shapes()
    assert shapes == {n: tuple(t.shape) for n, t in hf["mixtral"]["expected"].items()}
    assert spy.files == [] and spy.reads == []


# ---- writing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shard", [None, 6000])
@pytest.mark.parametrize("kind", KINDS)
def test_save_hf_roundtrips_and_transformers_loads_it(hf, kind, shard, tmp_path):
    src = Checkpoint.open(hf[kind]["single"])
    tensors = src.load(all_names(src.args))
    save_hf(tmp_path, src.args, tensors, max_shard_bytes=shard)
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        files = set(index["weight_map"].values())
        assert len(files) > 3 and all((tmp_path / f).exists() for f in files)
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
        for f in files:  # each shard within the limit, unless one tensor alone exceeds it (the embedding)
            sizes = [t.nbytes for t in load_file(tmp_path / f).values()]
            assert sum(sizes) <= shard or len(sizes) == 1, f
    back = Checkpoint.open(tmp_path)
    assert back.args == src.args
    assert_same(back.load(all_names(back.args)), tensors)
    # byte-for-byte the tensors transformers wrote, under the same names
    assert_same(all_tensors(tmp_path), all_tensors(hf[kind]["single"]))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(theirs) is type(hf[kind]["model"])
    assert torch.equal(logits(theirs), logits(hf[kind]["model"]))


def test_tied_embeddings(tmp_path):
    model = make_model("mixtral", tie=True)
    model.save_pretrained(tmp_path / "hf")
    assert "lm_head.weight" not in load_file(tmp_path / "hf/model.safetensors")
    c = Checkpoint.open(tmp_path / "hf")
    assert c.args.tie_embeddings
    got = c.load(all_names(c.args))
    assert_same(got, expected_ours(model))
    assert torch.equal(got["output.weight"], got["tok_embeddings.weight"])
    assert c.shapes()["output.weight"] == (64, 32)
    save_hf(tmp_path / "ours", c.args, got)
    assert "lm_head.weight" not in load_file(tmp_path / "ours/model.safetensors")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert theirs.config.tie_word_embeddings and torch.equal(logits(theirs), logits(model))
    save_mistral(tmp_path / "native", c.args, got)  # params.json cannot say "tied": the head is a copy
    native = Checkpoint.open(tmp_path / "native")
    assert not native.args.tie_embeddings
    assert_same(native.load(all_names(native.args)), got)


@pytest.mark.parametrize("style", ["top_level_rope_theta", "rope_parameters"])
def test_config_styles(hf, style, tmp_path):
    path = shutil.copytree(hf["mixtral"]["single"], tmp_path / "ck")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_theta"] == 1e6  # what transformers 5 writes
    cfg["head_dim"] = None
    if style == "top_level_rope_theta":
        del cfg["rope_parameters"]
    cfg["rope_theta"] = 5e5 if style == "top_level_rope_theta" else 7.0  # rope_parameters wins when present
    (path / "config.json").write_text(json.dumps(cfg))
    c = Checkpoint.open(path)
    assert c.args.head_dim == 8 and c.args.rope_theta == (5e5 if style == "top_level_rope_theta" else 1e6)
    names = attention_names(c.args, 1)
    assert_same(c.load(names), {n: hf["mixtral"]["expected"][n] for n in names})


ARGS = [
    ModelArgs(dim=32, n_layers=2, head_dim=8, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=64,
              rope_theta=1e6, max_seq_len=128, moe=MoeArgs(4, 2)),
    ModelArgs(dim=48, n_layers=3, head_dim=16, hidden_dim=40, n_heads=6, n_kv_heads=6, vocab_size=100,
              norm_eps=1e-6, sliding_window=4096),
    ModelArgs(dim=32, n_layers=1, head_dim=4, hidden_dim=8, n_heads=4, n_kv_heads=1, vocab_size=10,
              moe=MoeArgs(8, 1), tie_embeddings=True, bos_id=5, eos_id=6),
]


@pytest.mark.parametrize("args", ARGS)
def test_args_config_roundtrip(args):
    cfg = ck._hf_config(args)
    assert ModelArgs.from_hf_config(json.loads(json.dumps(cfg))) == args
    hf_cls = MixtralConfig if args.moe else MistralConfig  # transformers reads it to the same args
    assert ModelArgs.from_hf_config(hf_cls(**cfg).to_dict()) == args
    plain = ModelArgs(**{**args.__dict__, "tie_embeddings": False, "bos_id": 1, "eos_id": 2})
    assert ModelArgs.from_params_json(json.loads(json.dumps(ck._params_json(args)))) == plain


# ---- errors -----------------------------------------------------------------------------------------

def test_errors(hf, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json.*params.json"):
        Checkpoint.open(tmp_path)
    shutil.copy(hf["mixtral"]["single"] / "config.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="has config.json but no weights.*model.safetensors"):
        Checkpoint.open(tmp_path)
    c = Checkpoint.open(hf["mixtral"]["sharded"])
    with pytest.raises(KeyError, match="layers.2.attention.wq.weight.*hf.*model.layers.2.self_attn.q_proj"):
        c.load(["layers.0.attention.wq.weight", "layers.2.attention.wq.weight"])
    with pytest.raises(KeyError, match="not a moeray tensor name"):
        c.load(["layers.0.attention.wx.weight"])
    with pytest.raises(KeyError, match="layers.0.feed_forward.w1.weight"):  # a dense name in a MoE checkpoint
        c.load(["layers.0.feed_forward.w1.weight"])
