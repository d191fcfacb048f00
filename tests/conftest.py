"""Shared fixtures: tiny random checkpoints that transformers itself writes, and a Mistral-format copy
written here from REFERENCE.md's formula (not from kernels/), so the loader is checked against
something it did not produce."""

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(2)
if not torch.cuda.is_available():
    # Triton runs kernels compiled or in its interpreter as TRITON_INTERPRET is when triton is first
    # imported, for the whole process, and torch._dynamo imports it early (transformers does that):
    # without a GPU, the fused MoE kernel's tests (test_fused_moe.py) need the interpreter from the start
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2)


def hf_checkpoint(path: Path, arch: str, seed: int = 0) -> Path:
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    if arch == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**TINY, num_local_experts=8, num_experts_per_tok=2))
    else:  # window 8: shorter than prompt + generation in every test, so the rolling buffer wraps
        model = MistralForCausalLM(MistralConfig(**TINY, sliding_window=8))
    model.save_pretrained(path)
    return path


def mistral_copy(hf_dir: Path, out: Path) -> Path:
    """HF checkpoint -> Mistral-native params.json + consolidated.safetensors (REFERENCE.md §2)."""
    from safetensors.torch import load_file, save_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    n_heads, n_kv, dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd = dim // n_heads

    def hf_to_mistral(w, n):
        return w.view(n, 2, hd // 2, -1).transpose(1, 2).reshape(n * hd, -1)

    renames = [("model.embed_tokens", "tok_embeddings"), ("lm_head", "output"), ("model.norm", "norm"),
               ("model.layers", "layers"), ("input_layernorm", "attention_norm"),
               ("post_attention_layernorm", "ffn_norm"), ("self_attn.q_proj", "attention.wq"),
               ("self_attn.k_proj", "attention.wk"), ("self_attn.v_proj", "attention.wv"),
               ("self_attn.o_proj", "attention.wo"), ("block_sparse_moe", "feed_forward"),
               ("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
               ("mlp.down_proj", "feed_forward.w2")]
    tensors = {}
    for name, w in load_file(hf_dir / "model.safetensors").items():
        for a, b in renames:
            name = name.replace(a, b)
        if name.endswith("attention.wq.weight"):
            w = hf_to_mistral(w, n_heads)
        elif name.endswith("attention.wk.weight"):
            w = hf_to_mistral(w, n_kv)
        tensors[name] = w.contiguous()
    params = {"dim": dim, "n_layers": cfg["num_hidden_layers"], "head_dim": hd, "hidden_dim": cfg["intermediate_size"],
              "n_heads": n_heads, "n_kv_heads": n_kv, "norm_eps": cfg["rms_norm_eps"], "vocab_size": cfg["vocab_size"],
              "rope_theta": cfg["rope_parameters"]["rope_theta"], "max_seq_len": cfg["max_position_embeddings"]}
    if cfg.get("sliding_window"):
        params["sliding_window"] = cfg["sliding_window"]
    if cfg["model_type"] == "mixtral":
        params["moe"] = {"num_experts": cfg["num_local_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params))
    save_file(tensors, out / "consolidated.safetensors")
    return out


@pytest.fixture(scope="session")
def hf_mixtral(tmp_path_factory) -> Path:
    return hf_checkpoint(tmp_path_factory.mktemp("hf-mixtral"), "mixtral")


@pytest.fixture(scope="session")
def hf_mistral(tmp_path_factory) -> Path:
    return hf_checkpoint(tmp_path_factory.mktemp("hf-mistral"), "mistral")


@pytest.fixture(scope="session", params=["mixtral", "mistral"])
def hf_tiny(request, hf_mixtral, hf_mistral) -> Path:
    return {"mixtral": hf_mixtral, "mistral": hf_mistral}[request.param]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """`moeray make-tiny`'s checkpoint: HF format written by us, with a trained tokenizer.model."""
    from kernels.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"), "mixtral")


@pytest.fixture(scope="session")
def remote_address() -> str:
    """This machine's first non-loopback IPv4 address, to reach our servers as another machine would (skips the
    test where there is none)."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family.name == "AF_INET" and not a.address.startswith("127."):
                return a.address
    pytest.skip("this machine has no non-loopback IPv4 address")


@contextlib.contextmanager
def four_nodes():
    """A real Ray cluster on this machine (ray.cluster_utils.Cluster), connected: a head, one node with
    the `attention_node` resource and two with `expert_node`, 2 CPUs each. Yields the Cluster."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    c.attention = c.add_node(num_cpus=2, resources={"attention_node": 1})
    c.experts = [c.add_node(num_cpus=2, resources={"expert_node": 1}) for _ in range(2)]
    ray.init(address=c.address, logging_level="ERROR")
    c.wait_for_nodes()
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def serve_config(tiny_model: Path, pipeline=None, **sections):
    """The Serve tests' moeray config: the tiny Mixtral over four_nodes' nodes (attention actors on the attention
    node, two expert shards on the expert nodes), HTTP and gRPC on free ports, model name "tiny"; `sections`
    (scaling=..., etc.) as MoerayConfig takes them."""
    from cluster.config import MoerayConfig
    from cluster.placement import PipelineConfig
    from cluster.ports import free_port
    from kernels.engine import EngineConfig

    pc = pipeline or PipelineConfig()
    pc.attention.resources, pc.experts.resources = {"attention_node": 0.01}, {"expert_node": 0.01}
    pc.experts.shards = 2
    cfg = MoerayConfig(model=str(tiny_model), pipeline=pc, **sections,
                       engine=EngineConfig(max_num_seqs=16, kv_cache_tokens=16384, max_queued_requests=64))
    cfg.serve.model_name, cfg.serve.http_port, cfg.serve.grpc_port = "tiny", free_port(), free_port()
    return cfg


@contextlib.contextmanager
def serving(cfg):
    """four_nodes running `cfg`'s application under Ray Serve, as `moeray serve` deploys it (app "moeray");
    yields the HTTP base URL, and shuts Serve down after."""
    from ray import serve

    from actors.app import moeray_app, serve_options

    with four_nodes():
        serve.start(**serve_options(cfg))
        serve.run(moeray_app(cfg), name="moeray", route_prefix="/")
        try:
            yield f"http://127.0.0.1:{cfg.serve.http_port}"
        finally:
            serve.shutdown()
