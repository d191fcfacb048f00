"""kernels/fused_moe.py: the fused Triton experts against kernels.moe.expert_rows (the reference) and a
float64 oracle: compiled on a GPU when there is one, else on CPU in Triton's interpreter.

Tolerances, relative to scale = max |oracle| (outputs are O(1)):
  fused vs reference   fp32 1e-5   fp16 4e-3   bf16 2e-2   (interpreter: at most 4e-7, 9e-4, 8e-3)
  fused vs oracle      at most 2 x the reference's own error + one epsilon of the dtype + sqrt(K) fp32
                       epsilons (K the longer reduction): the fused path rounds act and out once each
                       where the reference rounds w1 x, w3 x, silu and the product, but compiled on a GPU
                       it sums K products in one fp32 chain per output where cuBLAS sums shorter ones
                       (seen on an H200: fp32 2.3e-6 of scale at K 4096, cuBLAS 3e-7)
Skipped where triton is not installed. Triton decides interpret mode for the whole process when it is
first imported, so without a GPU conftest.py sets TRITON_INTERPRET=1 for the session.
"""

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from kernels.engine import Engine, EngineConfig
from kernels.fused_moe import StackedExperts, available, expert_runner, fused_expert_rows, use_kernel
from kernels.model import FeedForward, feed_forward
from kernels.moe import dispatch, expert_rows, moe, route
from kernels.quant import quantize_experts
from kernels.sampling import SamplingParams
from kernels.tiny import tiny_args
from kernels.train import demo_dir

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load_kernels() -> str | None:
    """Imports the Triton kernels; the reason they cannot run here, or None. Without a GPU they need
    triton in interpreter mode, which conftest.py chooses before anything imports triton."""
    if not HAS_TRITON:
        return "triton is not installed"
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    import kernels.fused_moe_triton as kernels_triton

    if isinstance(standard.cdiv, InterpretedFunction) != kernels_triton.INTERPRETED:
        return "triton was imported before TRITON_INTERPRET was set (or unset): its modes are mixed"
    return None if available(DEVICE) else f"the kernels cannot run on {DEVICE} (set TRITON_INTERPRET=1)"


WHY_NOT = load_kernels()
needs_kernels = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}

# (tokens, dim, hidden, experts, top-k): one token one expert; one token, 6 of 8 experts idle; dims not
# multiples of 16 (40/24, 17/33); several N and K blocks; 70 tokens in 2 experts (many row tiles each);
# dims of exactly one block (16).
SHAPES = [(1, 32, 64, 1, 1), (1, 48, 80, 8, 2), (5, 40, 24, 4, 2), (16, 64, 128, 8, 2), (33, 17, 33, 3, 2),
          (70, 48, 96, 8, 2), (70, 32, 64, 2, 1), (64, 16, 16, 8, 2)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_experts(n: int, dim: int, hidden: int, dtype: torch.dtype, g: torch.Generator,
                   device: str = "cpu") -> list[FeedForward]:
    """N(0, 1/fan_in) weights, as a trained layer's: activations stay O(1)."""
    experts = []
    for _ in range(n):
        ff = FeedForward(dim, hidden)
        with torch.no_grad():
            for lin in (ff.w1, ff.w2, ff.w3):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
        experts.append(ff.to(device, dtype))
    return experts


def routed_rows(tokens: int, dim: int, num_experts: int, k: int, dtype: torch.dtype, g: torch.Generator,
                device: str = "cpu"):
    """Rows of `tokens` random tokens routed by a random gate, in dispatch order, and their blocks."""
    x = torch.randn(tokens, dim, generator=g).to(device, dtype)
    weights, experts = route(x, torch.randn(num_experts, dim, generator=g).to(device, dtype), k)
    plan = dispatch(weights, experts, num_experts)
    return x[plan.token], plan.blocks()


def check(out, ref, oracle_out, dtype, k):
    """fused `out` vs the reference `ref` and the float64 `oracle_out`, k the longest reduction (see the
    module docstring)."""
    scale = oracle_out.abs().max().item()
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"fused vs reference: {err / scale:.2e} of scale > {TOL[dtype]:.0e}"
    mine = (out.double() - oracle_out).abs().max().item()
    theirs = (ref.double() - oracle_out).abs().max().item()
    slack = (torch.finfo(dtype).eps + k ** 0.5 * torch.finfo(torch.float32).eps) * scale
    assert mine <= 2 * theirs + slack, f"fused error {mine:.2e}, reference {theirs:.2e}"


def compare(tokens, dim, hidden, num_experts, k, dtype, device="cpu"):
    g = torch.Generator().manual_seed(tokens * 1000 + dim)
    experts = random_experts(num_experts, dim, hidden, dtype, g, device)
    oracle = [copy.deepcopy(ff).double() for ff in experts]
    rows, blocks = routed_rows(tokens, dim, num_experts, k, dtype, g, device)
    ref = expert_rows(rows, blocks, experts)
    out = fused_expert_rows(rows, blocks, StackedExperts.from_experts(experts))
    assert out.dtype == dtype and out.shape == rows.shape
    check(out, ref, expert_rows(rows.double(), blocks, oracle), dtype, max(dim, hidden))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-D{}-F{}-E{}-k{}".format(*s))
def test_fused_matches_reference(shape, dtype):
    compare(*shape, dtype, device=DEVICE)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shard_subset_with_empty_and_offset_blocks(dtype):
    """An expert shard's call: it holds experts 2, 5, 7 of a layer (ids, not positions); blocks name
    them out of order, one with zero rows, and start past row 0 (rows 0-2 belong to no block)."""
    g = torch.Generator().manual_seed(7)
    held = dict(zip([2, 5, 7], random_experts(3, 48, 40, dtype, g, DEVICE), strict=True))
    oracle = {e: copy.deepcopy(ff).double() for e, ff in held.items()}
    rows = torch.randn(40, 48, generator=g).to(DEVICE, dtype)
    blocks = [(7, 3, 20), (2, 23, 0), (5, 23, 17)]
    ref = expert_rows(rows, blocks, held)
    out = fused_expert_rows(rows, blocks, StackedExperts.from_experts(held))
    check(out[3:], ref[3:], expert_rows(rows.double(), blocks, oracle)[3:], dtype, 48)
    with pytest.raises(KeyError):
        fused_expert_rows(rows, [(4, 0, 5)], StackedExperts.from_experts(held))


@needs_kernels
def test_moe_layer_uses_the_fused_kernel_and_shares_weights():
    """MoeLayer through use_kernel: same output as its reference; the experts' weights become views of
    the stack (one copy in memory), and the reference path on those views is unchanged, bit for bit."""
    torch.manual_seed(0)
    layer = feed_forward(tiny_args(dim=48, hidden_dim=64)).to(DEVICE)
    x = torch.randn(23, 48).to(DEVICE)
    with torch.inference_mode():
        ref = layer(x)
        use_kernel(layer, "triton")
        stacked = layer.experts.stacked
        assert all(ff.w1.weight.data_ptr() == stacked.w13[i, :64].data_ptr() and
                   ff.w2.weight.data_ptr() == stacked.w2[i].data_ptr() for i, ff in enumerate(layer.experts))
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(moe(x, layer.gate.weight, layer.k, expert_runner(layer.experts, "reference")), ref)


@needs_kernels
def test_demo_model_generates_the_same_tokens():
    """The built-in demo model (4 MoE layers, bf16 weights run in fp32): greedy tokens with the fused
    kernel equal the reference's, token for token."""
    engine = Engine.from_dir(demo_dir(), EngineConfig(kv_cache_tokens=256, device=DEVICE, dtype="float32"))
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": "What is an expert?"}])
    params = SamplingParams(max_tokens=6, temperature=0)
    ref = engine.generate([prompt], params)[0].token_ids
    use_kernel(engine.executor.model, "triton")
    assert engine.generate([prompt], params)[0].token_ids == ref


def test_runner_selection_and_refusals():
    """No triton needed: kernel names are checked, the fused path refuses what it cannot run (quantized
    experts; CPU tensors without the interpreter) with a message, and the reference is expert_rows."""
    g = torch.Generator().manual_seed(1)
    experts = random_experts(2, 16, 32, torch.float32, g)
    rows = torch.randn(4, 16, generator=g)
    assert torch.equal(expert_runner(experts)(rows, [(1, 0, 4)]), expert_rows(rows, [(1, 0, 4)], experts))
    with pytest.raises(ValueError, match="one of"):
        expert_runner(experts, "cuda-magic")
    if not HAS_TRITON:
        assert not available("cpu")
        with pytest.raises(RuntimeError, match="needs triton"):
            expert_runner(experts, "triton")
    with pytest.raises(ValueError, match="quantized experts run on the reference path"):
        StackedExperts.from_experts([quantize_experts(copy.deepcopy(experts[0]), 8)])
    with pytest.raises(ValueError, match="rows are torch.bfloat16"):
        fused_expert_rows(rows.bfloat16(), [(0, 0, 4)], StackedExperts.from_experts(experts))


COMPILE = """
import json, sys, torch
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels.fused_moe_triton import _grouped_gemm, block_config

names = ["x_ptr", "w_ptr", "out_ptr", "tiles_ptr", "N", "K", "stride_xm", "stride_we", "stride_wn", "stride_om"]
for arch, dtype, max_rows in json.loads(sys.argv[1]):
    tname = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    cfg = block_config(max_rows, getattr(torch, dtype), interpret=False)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    for swiglu in (True, False):
        sig = dict(zip(names, [f"*{tname}"] * 3 + ["*i32"] + ["i32"] * 6))
        sig.update(dict.fromkeys(["SWIGLU", "INTERPRET_BF16", "PRECISION", *cfg], "constexpr"))
        consts = dict(SWIGLU=swiglu, INTERPRET_BF16=False, PRECISION="ieee" if tname == "fp32" else "tf32", **cfg)
        src = ASTSource(_grouped_gemm, sig, consts, attrs={(i,): [["tt.divisibility", 16]] for i in range(10)})
        ptx_kernel = compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        ptx = ptx_kernel.asm["ptx"]
        print(json.dumps(dict(arch=arch, dtype=dtype, max_rows=max_rows, swiglu=swiglu,
                              shared=ptx_kernel.metadata.shared, pipelined="cp.async" in ptx,
                              tensor_cores="mma.sync" in ptx or "wgmma" in ptx)))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_compiles_for_gpus():
    """Without a GPU: the kernels compile to PTX for A100 (sm_80) and H100 (sm_90) in each block config,
    software-pipelined (cp.async), bf16 on tensor cores, within the SM's shared memory (A100 164 KiB,
    H100 227 KiB). 16-divisible shapes, as Mixtral's. In a fresh process: this one may be interpreting."""
    cases = [[90, "bfloat16", 1], [90, "bfloat16", 32], [90, "bfloat16", 256], [80, "float32", 1]]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default, said aloud: triton 3.9 warns otherwise
    proc = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(cases)], capture_output=True, text=True,
                          env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == 2 * len(cases)
    for r in results:
        assert r["pipelined"], r
        assert r["shared"] <= (164 if r["arch"] == 80 else 227) * 1024, r
        assert r["tensor_cores"] == (r["dtype"] == "bfloat16"), r


@needs_kernels
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 256, 512, 8, 2), (16, 256, 512, 8, 2), (64, 200, 333, 8, 2),
                                   (256, 512, 1024, 8, 2), (7, 4096, 1792, 8, 2)],
                         ids=lambda s: "T{}-D{}-F{}-E{}-k{}".format(*s))
def test_fused_matches_reference_cuda(shape, dtype):
    """Compiled on a GPU at larger shapes, each block config, tensor cores included (the interpreter
    widens bf16 to fp32)."""
    compare(*shape, dtype, device="cuda")


@pytest.mark.skipif(DEVICE != "cpu", reason="the no-GPU path")
def test_bench_moe_without_a_gpu(capsys):
    """`moeray bench moe` on a machine without CUDA says so and exits 0; with --interpret it checks the
    kernel on tiny shapes through the interpreter (exit 0 only if within the bf16 tolerance)."""
    from actors.cli import main

    assert main(["bench", "moe"]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    if WHY_NOT is None:
        assert main(["bench", "moe", "--interpret", "--batch", "1", "9"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert [line.split("|")[1].strip() for line in table[-2:]] == ["1", "9"]
