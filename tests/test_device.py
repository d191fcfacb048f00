"""engine.device and engine.moe_kernel: checked where they should be, and threaded through the
single-process engine, the pipeline's actors and the Ray options, without a GPU; plus GPU tests
(skipped without CUDA) that a session with one runs as is: CUDA == CPU, token for token.

The pipeline here runs in this process (start_workers with the InProcess spawner: an AttentionActor
and two ExpertShards serving the data plane on loopback, a PipelineExecutor dialing them, no Ray), so the device
path of every role is exercised in seconds. Without CUDA the Triton kernel runs in its interpreter
(conftest.py sets TRITON_INTERPRET=1).
"""

import copy
import importlib.util
from dataclasses import replace

import pytest
import torch

from actors.attention import AttentionActor
from actors.common import Peers, WorkerSpec
from actors.expert_shard import ExpertShard
from actors.router import PipelineExecutor
from actors.workers import InProcess, start_workers
from cluster.config import ConfigError, MoerayConfig, load_config
from cluster.dataplane.transport import TransportConfig
from cluster.placement import AttentionPlacement, ExpertPlacement, PipelineConfig, RouterPlacement, ray_options
from kernels.checkpoint import Checkpoint
from kernels.engine import Engine, EngineConfig, load_tokenizer
from kernels.fused_moe import FusedExperts, available, fused_expert_rows, interpreting
from kernels.moe import expert_rows
from kernels.sampling import SamplingParams

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(CUDA, reason="the no-GPU path")
needs_kernels = pytest.mark.skipif(importlib.util.find_spec("triton") is None or not available(DEVICE),
                                   reason=f"the Triton kernel cannot run on {DEVICE} here")

PROMPTS = [[1, 415, 9, 77, 301], [1, 22, 260, 173, 443, 380, 399, 138], [1, 5]]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
SMALL = dict(kv_cache_tokens=1024, max_num_seqs=8, max_num_batched_tokens=64)


def tokens(engine: Engine, params=GREEDY) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(PROMPTS, params)]


def in_process_config(model, config: EngineConfig, shards: int = 2) -> MoerayConfig:
    """A pipeline config for workers in this process: they keep its torch threads; every role asks for a GPU,
    as a CUDA config must (start_workers checks the Ray options, which InProcess then leaves unused)."""
    threads = torch.get_num_threads()
    return MoerayConfig(model=str(model), engine=config, pipeline=PipelineConfig(
        attention=AttentionPlacement(threads=threads, num_gpus=1),
        experts=ExpertPlacement(shards=shards, threads=threads, num_gpus=1), router=RouterPlacement(num_gpus=1),
        transport=TransportConfig(timeout_s=60)))


class InProcessPipeline:
    """One pipeline replica in this process: its workers started by start_workers with no Ray, and the
    router's executor dialing them."""

    def __init__(self, model, config: EngineConfig, shards: int = 2):
        ckpt, w = Checkpoint.open(model), start_workers(in_process_config(model, config, shards), InProcess())
        self.attention, self.experts = w.attention, w.experts
        executor = PipelineExecutor(ckpt, config, w.placement, Peers(w.config.pipeline.transport),
                                    w.attention_addresses)
        self.engine = Engine(executor, ckpt.args, load_tokenizer(model), config)

    def stop(self):
        for actor in self.attention + self.experts:
            actor.server.stop()


@pytest.fixture(scope="module")
def reference(hf_mixtral):
    """The CPU engine's tokens with the defaults (device cpu, moe_kernel reference): what all else must give."""
    engine = Engine.from_dir(hf_mixtral, EngineConfig(**SMALL))
    return tokens(engine), tokens(engine, SEEDED)


# -- the config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, match", [
    ({"device": "gpu"}, "device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'"),
    ({"device": "cuda:x"}, "device must be"),
    ({"device": "CPU"}, "device must be"),
    ({"moe_kernel": "fused"}, r"moe_kernel must be one of \['reference', 'triton'\], got 'fused'"),
    ({"moe_kernel": "triton", "expert_quant": "int8"}, "moe_kernel 'triton' runs unquantized experts only"),
    ({"moe_kernel": "triton", "expert_quant": "int4"}, "use expert_quant 'none' or moe_kernel 'reference'"),
    ({"device": "cuda", "expert_quant": "w8a8"}, "w8a8 runs on CPU .*, not on cuda: use int8"),
    ({"device": "cuda:1", "weight_quant": "w8a8"}, "w8a8 runs on CPU"),
])
def test_config_refuses_unknown_devices_and_kernels(fields, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**fields)
    with pytest.raises(ConfigError, match="engine: .*" + match):
        load_config(None, {"engine": fields})


def test_a_cuda_config_loads_anywhere_and_asks_ray_for_gpus(hf_mixtral):
    """A config for GPU nodes loads on a machine without one (the driver, a laptop); the GPU itself is
    checked by the process that uses it. Each role's num_gpus goes to Ray; a CUDA role without one is
    refused, naming the key, before any actor starts (no Ray here: start_workers fails first)."""
    cfg = load_config(None, {"engine": {"device": "cuda:1", "moe_kernel": "triton"},
                             "pipeline": {"experts": {"num_gpus": 1}, "attention": {"num_gpus": 0.5}}})
    assert (cfg.engine.device, cfg.engine.moe_kernel) == ("cuda:1", "triton")
    assert ray_options(cfg.pipeline.experts, "experts", "cuda", max_restarts=-1) == {
        "num_cpus": 0, "num_gpus": 1.0, "resources": {}, "max_restarts": -1}
    assert ray_options(cfg.pipeline.attention, "attention", "cuda")["num_gpus"] == 0.5
    assert ray_options(cfg.pipeline.router, "router", "cpu")["num_gpus"] == 0
    with pytest.raises(ValueError, match=r"engine.device is 'cuda': set pipeline.router.num_gpus > 0"):
        ray_options(cfg.pipeline.router, "router", "cuda")
    cfg.model = str(hf_mixtral)
    with pytest.raises(ValueError, match=r"set pipeline.router.num_gpus > 0"):
        start_workers(cfg)


def test_start_workers_leaves_the_callers_config_alone(hf_mixtral):
    """Each replica's workers run with a copy of the config whose data plane has a token of its own; the
    caller's config is unchanged, so a second replica started from it gets another token."""
    cfg = in_process_config(hf_mixtral, EngineConfig(**SMALL), shards=1)
    before = copy.deepcopy(cfg)
    started = [start_workers(cfg, InProcess()) for _ in range(2)]
    try:
        assert cfg == before
        assert len({w.config.pipeline.transport.token for w in started} - {""}) == 2
    finally:
        for actor in [a for w in started for a in w.attention + w.experts]:
            actor.server.stop()


@no_cuda
def test_cuda_without_cuda_fails_when_the_engine_or_an_actor_is_built(hf_mixtral):
    """Not at import or config load: at Engine.from_dir and in each role's constructor, before weights load."""
    config = EngineConfig(device="cuda", **SMALL)
    spec = WorkerSpec(str(hf_mixtral), config, TransportConfig(), torch.get_num_threads())
    for build in (lambda: Engine.from_dir(hf_mixtral, config),
                  lambda: AttentionActor(spec, [0], {}, []),
                  lambda: ExpertShard(replace(spec, engine=replace(config, device="cuda:0")), [(0, 0)]),
                  lambda: InProcessPipeline(hf_mixtral, config)):
        with pytest.raises(ValueError, match=r"engine.device is 'cuda(:0)?' but this process sees no CUDA device"):
            build()


# -- the single-process engine ---------------------------------------------------------------------------
def test_explicit_device_gives_the_same_tokens(hf_mixtral, reference):
    """device "cpu" spelled out (and on a GPU machine, "cuda"): the reference's greedy and seeded tokens,
    the weights, KV cache and logits on that device."""
    engine = Engine.from_dir(hf_mixtral, EngineConfig(device=DEVICE, **SMALL))
    model = engine.executor.model
    assert {p.device.type for p in model.parameters()} == {DEVICE}
    assert engine.executor.cache.k.device.type == DEVICE
    assert (tokens(engine), tokens(engine, SEEDED)) == reference


@needs_kernels
def test_triton_kernel_gives_the_same_greedy_tokens(hf_mixtral, reference):
    """moe_kernel "triton" from the config: every MoE layer runs the fused kernel (compiled on a GPU, else
    interpreted on CPU), and greedy tokens equal the reference kernel's."""
    engine = Engine.from_dir(hf_mixtral, EngineConfig(device=DEVICE, moe_kernel="triton", **SMALL))
    layers = [layer.feed_forward for layer in engine.executor.model.layers]
    assert all(isinstance(ff.experts, FusedExperts) for ff in layers)
    assert tokens(engine) == reference[0]


# -- the pipeline's roles, in this process -----------------------------------------------------------
@pytest.mark.parametrize("kernel", ["reference", pytest.param("triton", marks=needs_kernels)])
def test_pipeline_roles_give_the_same_tokens(hf_mixtral, reference, kernel):
    """Router, attention actor and expert shards on DEVICE, over gRPC (CPU bytes on the wire), with the
    experts on `kernel`: the single-process CPU engine's greedy tokens. Two shards, so calls to both are
    in flight at once; one under Triton's interpreter, which is not thread-safe (shards in one process
    share it; in a pipeline each shard has a process of its own)."""
    shards = 1 if kernel == "triton" and interpreting() else 2
    pipe = InProcessPipeline(hf_mixtral, EngineConfig(device=DEVICE, moe_kernel=kernel, **SMALL), shards)
    try:
        expected = fused_expert_rows if kernel == "triton" else expert_rows
        assert all(run.func is expected for shard in pipe.experts for run in shard.run.values())
        assert pipe.attention[0].cache.k.device.type == DEVICE
        assert tokens(pipe.engine) == reference[0]
    finally:
        pipe.stop()


@needs_kernels
def test_expert_shard_fused_matches_reference(hf_mixtral):
    """One ExpertShard's forward (what a data-plane call runs), fused vs reference, on a shard that holds
    experts of two layers, blocks out of order: the same rows to fp32 rounding."""
    pairs = [(0, 1), (0, 4), (0, 6), (1, 2)]
    shards = [ExpertShard(WorkerSpec(str(hf_mixtral), EngineConfig(device=DEVICE, moe_kernel=k), TransportConfig(),
                                     torch.get_num_threads()), pairs)
              for k in ("reference", "triton")]
    try:
        rows = torch.randn(21, 64, generator=torch.Generator().manual_seed(3))
        ref, fused = (s.forward(0, [(6, 5), (1, 9), (4, 7)], rows) for s in shards)
        assert fused.device.type == DEVICE and fused.shape == rows.shape
        torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shards[1].forward(1, [(2, 21)], rows), shards[0].forward(1, [(2, 21)], rows),
                                   atol=1e-5, rtol=1e-5)
    finally:
        for s in shards:
            s.server.stop()


# -- GPU only: what a session with a GPU runs as is ---------------------------------------------------------
def prefill_logits(model, device: str, dtype: str) -> torch.Tensor:
    """Logits [T, V] of every position of PROMPTS from one step of the engine's executor, returned on CPU."""
    from kernels.cache import StepSeq

    engine = Engine.from_dir(model, EngineConfig(device=device, dtype=dtype, **SMALL))
    seqs = [StepSeq([i], 0, len(p)) for i, p in enumerate(PROMPTS)]  # one 16-token block each
    flat = torch.tensor([t for p in PROMPTS for t in p])
    with torch.inference_mode():
        logits = engine.executor.forward(flat, seqs, torch.arange(len(flat)))
    assert logits.device.type == torch.device(device).type
    return logits.cpu()


@needs_cuda
def test_cuda_logits_close_to_cpu(hf_mixtral):
    """fp32: CUDA's logits within summation-order rounding of CPU's (no TF32: torch's default). bf16:
    each device rounds its own way, so CUDA bf16 is held to CPU bf16's own distance from fp32."""
    fp32 = prefill_logits(hf_mixtral, "cpu", "float32")
    torch.testing.assert_close(prefill_logits(hf_mixtral, "cuda", "float32"), fp32, atol=1e-4, rtol=1e-4)
    cpu_err = (prefill_logits(hf_mixtral, "cpu", "bfloat16") - fp32).abs().max().item()
    cuda_err = (prefill_logits(hf_mixtral, "cuda", "bfloat16") - fp32).abs().max().item()
    assert cuda_err <= 2 * cpu_err, f"CUDA bf16 is {cuda_err:.3f} from fp32, CPU bf16 {cpu_err:.3f}"


@needs_cuda
def test_cuda_int8_experts_give_the_same_tokens_as_cpu(hf_mixtral):
    """int8 experts: quantized on CPU, then moved; greedy tokens equal the CPU int8 engine's."""
    cpu, cuda = (Engine.from_dir(hf_mixtral, EngineConfig(device=d, expert_quant="int8", **SMALL))
                 for d in ("cpu", "cuda"))
    assert cuda.executor.model.layers[0].feed_forward.experts[0].w1.qweight.device.type == "cuda"
    assert tokens(cuda) == tokens(cpu)
