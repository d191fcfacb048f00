"""What a role holds of a model, built from a checkpoint: the one way every role makes its modules.

The single-process engine holds the whole model; an attention actor some layers but their experts (its
experts seams filled with a stand-in that calls the expert shards); an expert shard some (layer, expert)
pairs; the pipeline's router the rest (embeddings, final norm, LM head), its layers a stand-in that calls
the attention actors.
Each builds kernels.model's Transformer on the meta device and loads only the tensors it holds: the rest
stay shapes, never allocated (or, behind stand-ins, are not there at all). What the engine config says
about the modules is applied here, once:

    device        checked before anything loads, by the process that uses it (a missing GPU fails clearly)
    dtype         the held weights' (activations follow them); auto: model_dtype's choice for the checkpoint
    expert_quant  held experts are read and quantized on CPU, then moved: the device never holds them
                  unquantized; on CPU they run torch's packed int8 / int4 kernels, or with fp32 activations
                  our int8 one; w8a8 (CPU only): int8 weights and activations, our kernel; bf16: the weights
                  in bf16, fp32 activations, our kernel on CPU (kernels/quant.py, kernels/native.py)
    weight_quant  likewise the held attention projections and LM head (kernels.quant.quantize_dense)
    (CPU)         the held weights that stay unquantized packed for fast decode (kernels/packing.py)
    moe_kernel    the experts stage: on the engine's MoE layers (use_kernel), or one stage per layer over
                  the pairs an expert shard holds (expert_runner); a dense FFN stays on the reference path,
                  which is what the single-process engine runs for it
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from kernels.checkpoint import Checkpoint, attention_names, router_names
from kernels.fused_moe import expert_runner, use_kernel
from kernels.model import LayersStage, Transformer, build, expert_prefix, load_into, pack_
from kernels.moe import ExpertsStage
from kernels.packing import onednn_bf16
from kernels.quant import quantize_dense, quantize_experts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)  # engine.dtype
# w8a8: int8 weights and activations; bf16: bf16 weights, fp32 activations (in an fp32 model; kernels/quant.py)
QUANT_BITS = {"none": None, "int8": 8, "int4": 4, "w8a8": 8, "bf16": 16}
DENSE_QUANTIZED = re.compile(r"(layers\.\d+\.attention\.w[qkvo]|output)\.weight")  # what weight_quant covers


def model_dtype(name: str, ckpt: Checkpoint, device: torch.device) -> torch.dtype:
    """engine.dtype `name` for `ckpt` on `device`. A dtype's name is that dtype. auto (the default) is the
    checkpoint's own precision where this machine computes in it fast: fp32 checkpoints run fp32; 16-bit
    ones (every released Mixtral and Mistral: bf16) run as stored on a GPU, and on a CPU in bf16 where oneDNN
    runs bf16 natively (AVX-512 BF16 or AMX: kernels.packing.onednn_bf16), else in fp32: there bf16 matmuls
    were 1.3x slower at batch 16 and no faster at 1 (small bench model, AVX2 emulated with
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2; on a real AVX2 EPYC 0.68x fp32 at
    batch 1 and 0.32x at 16); there a bf16 checkpoint's weights stay bf16 (weight_formats), an fp16 one's are fp32.
    What bf16 gives up against fp32: the activations' 8-bit mantissa (greedy tokens can differ from an fp32 run's;
    README)."""
    if name != "auto":
        return DTYPES[name]
    stored = ckpt.stored_dtype
    if stored == torch.float32 or device.type != "cpu":
        return stored
    return torch.bfloat16 if onednn_bf16() else torch.float32


def weight_formats(engine: Building, ckpt: Checkpoint, device: torch.device) -> tuple[str, str]:
    """(expert_quant, weight_quant) as build_role applies them: as `engine` says, but where engine.dtype auto runs a
    bf16 checkpoint in fp32 (model_dtype: a CPU without native bf16) the experts (on moe_kernel reference),
    attention projections and LM head it leaves at none keep the checkpoint's bf16 (bf16: BF16Linear, fp32
    activations and sums on the same weights: the fp32 model's computation in half its weight memory; bench model on
    an AVX2 EPYC, runs P and Q of the README: decode 1.0-1.6x the fp32 model's and 2.1-4.1x the bf16 model's, prefill
    0.8x fp32's and 4.8x the bf16 model's). Embeddings, norms and router gates: fp32."""
    experts, dense = engine.expert_quant, engine.weight_quant
    if engine.dtype != "auto" or device.type != "cpu" or ckpt.stored_dtype != torch.bfloat16 or onednn_bf16():
        return experts, dense
    return ("bf16" if experts == "none" and engine.moe_kernel == "reference" else experts,
            "bf16" if dense == "none" else dense)


Pair = tuple[int, int]  # (layer, expert)


class Building(Protocol):
    """What building reads of the engine config (kernels.engine.EngineConfig)."""

    device: str
    dtype: str
    expert_quant: str
    weight_quant: str
    moe_kernel: str


def torch_device(device: str) -> torch.device:
    """engine.device as the torch.device this process will use, or ValueError if it has no such GPU.

    Called where weights and caches are made (build_role, on the node the role runs on), not when the
    config is read: the driver that loads a config (a laptop, the Ray head) often has no GPU while the
    actors' nodes do. "cuda" means the current GPU, which is the one Ray gave an actor that asked for
    one (pipeline.<role>.num_gpus).
    """
    d = torch.device(device)
    if d.type != "cuda":
        return d
    if not torch.cuda.is_available():
        raise ValueError(f"engine.device is {device!r} but this process sees no CUDA device (torch "
                         f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}); use engine.device "
                         f"'cpu', or run where a GPU is (in the pipeline: pipeline.<role>.num_gpus > 0)")
    index = torch.cuda.current_device() if d.index is None else d.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"engine.device is {device!r} but this process sees {torch.cuda.device_count()} "
                         f"CUDA device(s)")
    return torch.device("cuda", index)


@dataclass
class Holds:
    """What a role holds, exactly one of:

        whole      the whole model (the single-process engine)
        layers     these layers but their experts, which `experts_stand_in(l)` runs (an attention actor)
        experts    these (layer, expert) pairs, run for others (an expert shard); a dense FFN is expert 0
        layers_stand_in  a stand-in for every layer: the role (the pipeline's router) holds the rest
    """

    whole: bool = False
    layers: Sequence[int] = ()
    experts: Sequence[Pair] = ()
    layers_stand_in: LayersStage | None = None
    experts_stand_in: Callable[[int], ExpertsStage] | None = None  # with `layers`

    def __post_init__(self):
        if sum(map(bool, (self.whole, self.layers, self.experts, self.layers_stand_in))) != 1:
            raise ValueError("a role holds exactly one of: the whole model, layers, expert pairs, "
                             "or the rest around a layers stand-in")
        if bool(self.layers) != bool(self.experts_stand_in):
            raise ValueError("a role holding layers runs their experts with experts_stand_in, and only it")


@dataclass
class Built:
    model: Transformer  # the held tensors on `device`; the others shapes on the meta device, or stand-ins
    device: torch.device
    dtype: torch.dtype  # of the held weights; a role casts what it receives to it
    experts: dict[Pair, nn.Module]  # Holds.experts: each pair's FeedForward (QuantLinear inside when quantized)
    stages: dict[int, ExpertsStage]  # Holds.experts: per layer, the experts stage over its pairs, on moe_kernel


def build_role(ckpt: Checkpoint, engine: Building, holds: Holds,
               progress: Callable[[int, int], None] | None = None) -> Built:
    """The modules of a role that holds `holds` of the model in `ckpt`, as `engine` says (see the module
    docstring). `progress(done, total)`: tensors read so far."""
    device = torch_device(engine.device)  # before loading anything
    expert_quant, weight_quant = weight_formats(engine, ckpt, device)
    a, dtype, bits = ckpt.args, model_dtype(engine.dtype, ckpt, device), QUANT_BITS[expert_quant]
    model = build(Transformer, a, holds.layers_stand_in, holds.experts_stand_in)
    pairs = [(l, e) for l in range(a.n_layers) for e in range(max(a.num_experts, 1))] if holds.whole else holds.experts
    expert_names = [expert_prefix(a, l, e) + f"{w}.weight" for l, e in pairs for w in ("w1", "w2", "w3")]
    if holds.whole or holds.layers_stand_in:
        names = list(model.state_dict())  # with a layers stand-in, the model has only what the router holds
    else:
        names = [n for l in holds.layers for n in attention_names(a, l) + router_names(a, l)] + expert_names
    dense_bits = QUANT_BITS[weight_quant]
    quantized = {n: b for n, b in [*((n, bits) for n in expert_names),  # read on CPU, quantized there first
                                   *((n, dense_bits) for n in names if DENSE_QUANTIZED.fullmatch(n))] if b}
    parts = ((device, dtype, [n for n in names if n not in quantized]),  # bf16 ones read as bf16: never fp32 whole
             ("cpu", dtype, [n for n in names if n in quantized and quantized[n] != 16]),
             ("cpu", torch.bfloat16, [n for n in names if quantized.get(n) == 16]))
    done = 0
    for where, as_dtype, part in parts:
        if part:
            report = None if progress is None else lambda n, _, before=done: progress(before + n, len(names))
            load_into(model, ckpt, dtype=as_dtype, device=where, names=part, progress=report)
            done += len(part)
    experts = {(l, e): model.get_submodule(expert_prefix(a, l, e).rstrip(".")) for l, e in pairs}
    if bits:
        quantize_experts(experts, bits, cpu_kernel=device.type == "cpu", w8a8=expert_quant == "w8a8")
        for ff in experts.values():
            ff.to(device)
    if dense_bits:
        w8a8 = weight_quant == "w8a8"
        for q in quantize_dense(model, dense_bits, cpu_kernel=device.type == "cpu", w8a8=w8a8):
            q.to(device)
    if device.type == "cpu":  # after quantizing: a quantized linear is not packed
        # fused QKV and w1|w3, fast GEMV layout or oneDNN's (kernels/packing.py): the held weights only
        pack_(model, experts=engine.moe_kernel == "reference")
    if holds.whole:
        if engine.moe_kernel != "reference":
            use_kernel(model, engine.moe_kernel)
        return Built(model, device, dtype, {}, {})
    kernel = engine.moe_kernel if a.moe else "reference"
    stages = {l: expert_runner({e: ff for (m, e), ff in experts.items() if m == l}, kernel)
              for l in sorted({l for l, _ in experts})}
    return Built(model, device, dtype, experts, stages)
