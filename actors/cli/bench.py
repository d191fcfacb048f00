"""Benchmarks. Each prints ratios against a baseline measured in the same run, and writes JSON.

`moeray bench engine`: the single-process engine at each precision against transformers' generate (and
vLLM-CPU, llama.cpp where given), same checkpoint, and against the memory-bandwidth roofline measured in the
same run; each system in its own subprocess so its peak memory is its own.
`moeray bench pipeline`: the Ray pipeline (micro_batches 1 and 2) against the single-process engine, same
checkpoint; where a step's time goes; round trips per decode step; a layer's expert call against a raw
gRPC echo of the same payload.
`moeray bench dataplane`: one data-plane call of each transport kind against a raw gRPC echo of the
same bytes, without Ray or a model: servers in child processes, a handler that returns its input.
`moeray bench structured`: decode tok/s with a JSON schema against unconstrained, same prompts, single-process
engine.
`moeray bench moe`: the fused Triton MoE experts against the reference expert_rows, one Mixtral layer
on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPEATS = 3
PREFILL_PROMPTS = 4  # bench engine's prefill: this many prompts of --prefill-len tokens


def write_report(out: str | None, report) -> None:
    """A benchmark's results as JSON at `out` (no file when out is None)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")


# "small": a Mixtral-shaped model big enough that compute, not Python overhead, dominates on a laptop
# CPU: 8 experts top-2, GQA 2:1, the real 32000 vocabulary. About 0.1 B parameters.
PRESETS = {
    "small": dict(dim=512, n_layers=4, head_dim=64, hidden_dim=1024, n_heads=8, n_kv_heads=4, vocab_size=32000),
    "tiny": dict(),  # kernels.tiny's defaults: seconds to run, for smoke tests
    # Mixtral's row lengths at a quarter of its width (rows of 2 KB and 7 KB in int8, where small's are 0.5-1 KB;
    # GQA 4:1 with heads of 128 as Mixtral's, its FFN ratio 3.5), 2 layers: 0.86 B parameters, 3.4 GB in fp32
    "wide": dict(dim=2048, n_layers=2, head_dim=128, hidden_dim=7168, n_heads=16, n_kv_heads=4, vocab_size=32000),
}


# moeray's precisions: engine.dtype (weights, activations, KV cache), expert_quant, weight_quant (attention, LM head)
PRECISIONS = {"fp32": ("float32", "none", "none"), "bf16": ("bfloat16", "none", "none"),
              "int8": ("bfloat16", "int8", "none"), "int4": ("bfloat16", "int4", "none"),
              "int8-all": ("bfloat16", "int8", "int8"), "int4-all": ("bfloat16", "int4", "int4"),
              # int8 in an fp32 model (auto on a CPU without native bf16): moeray's C kernel (kernels/native.py)
              "fp32-int8": ("float32", "int8", "none"), "fp32-int8-all": ("float32", "int8", "int8"),
              # int4 experts in an fp32 model (expert_quant int4 under auto there): torch's int4 kernel, x in bf16
              "fp32-int4": ("float32", "int4", "none"),
              # int8 weights and activations (W8A8, CPU; kernels/quant.py): an fp32 model, moeray's VNNI kernel
              "w8a8": ("float32", "w8a8", "none"), "w8a8-all": ("float32", "w8a8", "w8a8"),
              # bf16 weights (a bf16 model's bytes) in an fp32 model: fp32 activations, moeray's C kernels (what
              # dtype auto runs a bf16 checkpoint as on a CPU without native bf16: kernels.build.weight_formats)
              "fp32-bf16-all": ("float32", "bf16", "bf16")}
ROOFLINE_BYTES = 1 << 30  # a streaming read far beyond any cache: 1 GiB of fp32
PEAK = "PEAK_RSS_KB"


def _weight_bytes(model) -> dict:
    """What a step of `model` reads of its weights, as bytes: `dense` (all but the experts and the embedding
    table, of which a token reads one row: `embedding_row`) and `experts` (all MoE experts, of which a token
    reads k/E). A QuantLinear counts its codes and the scales its path uses, a PackedLinear its bf16 weight;
    everything else its parameters."""
    from kernels.model import FeedForward
    from kernels.packing import PackedLinear
    from kernels.quant import QuantLinear

    def read(module) -> int:
        total = 0
        for m in module.modules():
            if isinstance(m, QuantLinear):
                used = [m.qweight, *([m.kernel_scale] if m.kernel_scale is not None else [m.scale, m.offset])]
                total += sum(t.numel() * t.element_size() for t in used if t is not None)
            elif isinstance(m, PackedLinear):  # its weight is held prepacked, not as a Parameter
                total += m.nbytes
            else:
                total += sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
        return total

    a = model.args
    experts = sum(read(m) for m in model.modules() if isinstance(m, FeedForward)) if a.moe else 0
    embedding = read(model.tok_embeddings)
    return {"dense": read(model) - experts - embedding, "experts": experts,
            "embedding_row": embedding // a.vocab_size,
            "num_experts": a.moe.num_experts if a.moe else 1, "k": a.moe.num_experts_per_tok if a.moe else 1}


def step_bytes(w: dict, batch: int) -> float:
    """Weight bytes a decode step of `batch` tokens reads: the dense part, one embedding row a token, and
    each layer's experts that any token picks (batch 1: exactly k of E; more: E (1 - (1 - k/E)^batch) in
    expectation under uniform routing)."""
    picked = 1 - (1 - w["k"] / w["num_experts"]) ** batch
    return w["dense"] + batch * w["embedding_row"] + w["experts"] * picked


def _worker(system: str, model_dir: str, batches: list[int], prompt_len: int, new: int, device: str = "cpu",
            prefill: int = 0, decode_steps: int = 1) -> dict:
    """One system's decode rates (moeray:PRECISION or transformers) on `device`, in its own process; given
    `prefill`, its prefill rate too: PREFILL_PROMPTS prompts of that many tokens, one new token each (moeray in
    chunks of engine.max_num_batched_tokens, its default), new prompts each time (no prefix-cache hits). moeray
    with engine.decode_steps `decode_steps`."""
    import torch

    torch.manual_seed(0)
    results: dict = {}
    if system.startswith("moeray:"):
        from kernels.engine import Engine, EngineConfig
        from kernels.sampling import SamplingParams

        dtype, experts, dense = PRECISIONS[system.split(":")[1]]
        kv = max(max(batches) * (prompt_len + new), PREFILL_PROMPTS * (prefill + 16))
        engine = Engine.from_dir(model_dir, EngineConfig(max_num_seqs=max(*batches, PREFILL_PROMPTS),
                                                         kv_cache_tokens=-(-kv // 16) * 16,
                                                         dtype=dtype, expert_quant=experts, weight_quant=dense,
                                                         device=device, decode_steps=decode_steps))
        vocab = engine.args.vocab_size
        results["weight_bytes"] = _weight_bytes(engine.executor.model)

        def run(prompts, new=new):
            out = engine.generate(prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
            return [c.token_ids for c in out]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        vocab = model.config.vocab_size

        @torch.inference_mode()
        def run(prompts, new=new):
            out = model.generate(torch.tensor(prompts, device=device), max_new_tokens=new, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            return out[:, len(prompts[0]):].tolist()

    g = torch.Generator().manual_seed(1)
    for b in batches:
        prompts = torch.randint(3, vocab, (b, prompt_len), generator=g).tolist()
        run(prompts)  # warm-up: first-call costs (allocator, oneDNN primitives) are not decode speed
        seconds = float("inf")
        for _ in range(REPEATS):  # best of a few: the least disturbed by whatever else the machine does
            t0 = time.perf_counter()
            tokens = run(prompts)
            seconds = min(seconds, time.perf_counter() - t0)
        results[str(b)] = {"seconds": seconds, "tokens_per_s": b * new / seconds, "first_tokens": tokens[0][:16]}
    if prefill:
        run(torch.randint(3, vocab, (PREFILL_PROMPTS, prefill), generator=g).tolist(), 1)  # warm-up
        seconds = float("inf")
        for _ in range(REPEATS):
            prompts = torch.randint(3, vocab, (PREFILL_PROMPTS, prefill), generator=g).tolist()
            t0 = time.perf_counter()
            run(prompts, 1)
            seconds = min(seconds, time.perf_counter() - t0)
        results["prefill"] = {"prompts": PREFILL_PROMPTS, "prompt_len": prefill, "seconds": seconds,
                              "tokens_per_s": PREFILL_PROMPTS * prefill / seconds}
    if device != "cpu":  # tokens come back as lists: each run ended synchronized
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return results


def _roofline(device: str = "cpu") -> dict:
    """The memory bandwidth this process reaches on `device`, GB/s: a sum over a 1 GiB fp32 tensor (a
    streaming read) and a 512 MiB fp32 matrix times a vector (a GEMV, what batch-1 decode is: torch's, and on
    CPU moeray's C kernel where it builds, which streams faster than MKL on some CPUs), best of 5 each; on a
    GPU 4 GiB and 2 GiB (several times its cache)."""
    import torch

    from kernels import native

    size = ROOFLINE_BYTES * (1 if device == "cpu" else 4)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def best(f) -> float:
        f()
        sync()
        t = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            f()
            sync()
            t = min(t, time.perf_counter() - t0)
        return t

    x = torch.ones(size // 4, device=device)
    read = size / best(x.sum) / 1e9
    del x
    w, v = (torch.ones(8192, size // 2 // 4 // 8192, device=device),
            torch.ones(size // 2 // 4 // 8192, device=device))
    gemv = w.numel() * 4 / best(lambda: w @ v) / 1e9
    if device == "cpu" and native.linear(v[None], w) is not None:
        gemv = max(gemv, w.numel() * 4 / best(lambda: native.linear(v[None], w)) / 1e9)
    return {"read_gb_s": read, "gemv_gb_s": gemv, "threads": torch.get_num_threads()}


# vLLM-CPU's offline decode, measured as _worker measures (same prompts, warm-up, best of REPEATS); run with
# the Python of a vLLM install (argv: model_dir dtype batches prompt_len new); one JSON line last
VLLM_WORKER = f"""
import json, sys, time
import torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":  # vLLM-CPU spawns its engine core
    model, dtype, batches, plen, new = sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3].split(",")], \
        int(sys.argv[4]), int(sys.argv[5])
    llm = LLM(model=model, skip_tokenizer_init=True, dtype=dtype, max_model_len=plen + new + 16,
              max_num_seqs=max(batches), seed=0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, detokenize=False)
    g, res = torch.Generator().manual_seed(1), {{}}
    for b in batches:
        prompts = [TokensPrompt(prompt_token_ids=p) for p in torch.randint(3, vocab, (b, plen), generator=g).tolist()]
        llm.generate(prompts, params, use_tqdm=False)
        best = float("inf")
        for _ in range({REPEATS}):
            t0 = time.perf_counter()
            out = llm.generate(prompts, params, use_tqdm=False)
            best = min(best, time.perf_counter() - t0)
        res[str(b)] = {{"seconds": best, "tokens_per_s": b * new / best,
                       "first_tokens": list(out[0].outputs[0].token_ids[:16])}}
    print(json.dumps(res))
"""
PEAK_WRAPPER = (f"import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                f"print('{PEAK}', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
                f"sys.exit(r.returncode)")


def _measured(cmd: list[str], env: dict | None = None) -> tuple[str, float]:
    """Runs cmd; its stdout and the peak RSS (MB) of its largest process, children included."""
    import os

    proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *cmd], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode:  # first line: the root cause as far as a line of stderr says it; then stderr's tail
        errors = [line.strip() for line in proc.stderr.splitlines()
                  if ("Error" in line or "error:" in line) and "WARNING" not in line]
        cause = next((e for e in errors if "EngineDeadError" not in e and "stack trace" not in e), "")
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {proc.returncode}) {cause[-200:]}\n"
                           f"{' '.join(cmd[:3])} ...\n{proc.stderr[-3000:]}")
    peak = next(l for l in proc.stderr.splitlines()[::-1] if l.startswith(PEAK))
    return proc.stdout, int(peak.split()[1]) / 1024


def _last_json(stdout: str) -> dict:
    return json.loads(next(l for l in stdout.splitlines()[::-1] if l.startswith("{")))


def _vllm(python: str, model_dir: str, dtype: str, batches: list[int], prompt_len: int, new: int,
          threads: int) -> dict:
    """vLLM-CPU (peers/README.md's settings: all `threads` cores for the model, tcmalloc and iomp preloaded
    where found next to that Python)."""
    script = Path(model_dir).parent / "vllm_worker.py"
    script.write_text(VLLM_WORKER)
    preload = [p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                           str(Path(python).parent.parent / "lib" / "libiomp5.so")) if Path(p).exists()]
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1", **({"LD_PRELOAD": ":".join(preload)} if preload else {})}
    out, peak = _measured([python, str(script), model_dir, dtype, ",".join(map(str, batches)), str(prompt_len),
                           str(new)], env)
    return {**_last_json(out), "peak_rss_mb": peak}


def _llama(bench: str, convert: str, model_dir: str, outtype: str, batches: list[int], prompt_len: int, new: int,
           threads: int) -> dict:
    """llama.cpp's llama-batched-bench on the checkpoint converted to GGUF `outtype`. Its time includes the
    prompt (so does every other system's here): generated tok/s = batch * new / t."""
    gguf = Path(model_dir).parent / f"model-{outtype}.gguf"
    if not gguf.exists():  # the converter needs gguf, numpy, transformers: the peers' llama-venv has them
        venv = Path(convert).resolve().parent.parent / "llama-venv" / "bin" / "python"
        subprocess.run([str(venv) if venv.exists() else sys.executable, convert, model_dir, "--outtype", outtype,
                        "--outfile", str(gguf)], check=True, capture_output=True)
    out, peak = _measured([bench, "-m", str(gguf), "-c", str(max(batches) * (prompt_len + new) + 64), "-b", "2048",
                           "-ub", "512", "-npp", str(prompt_len), "-ntg", str(new),
                           "-npl", ",".join(map(str, batches)), "-t", str(threads), "-tb", str(threads),
                           "--output-format", "jsonl"])
    res: dict = {}
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            res[str(r["pl"])] = {"seconds": r["t"], "tokens_per_s": r["pl"] * new / r["t"]}
    return {**res, "peak_rss_mb": peak}


def bench_engine(preset: str, batches: list[int], prompt_len: int, new: int, out: str | None,
                 precisions: list[str] | None = None, vllm_python: str | None = None,
                 llama_bench: str | None = None, llama_convert: str | None = None, device: str = "cpu",
                 prefill: int = 0, decode_steps: int | None = None) -> dict:
    """moeray at each precision, transformers (fp32), and, given their paths, vLLM-CPU and llama.cpp, one
    after the other, each in its own process (so its peak memory is its own); and the machine's memory
    bandwidth measured in the same run: each system's decode as a fraction of that roofline. device "cuda":
    moeray and transformers on the GPU, the GPU's bandwidth, peak GPU memory; the CPU peers cannot run.
    prefill > 0: moeray's and transformers' prefill of PREFILL_PROMPTS prompts of that many tokens too. moeray with
    engine.decode_steps `decode_steps` (None: the engine's default; said in the header)."""
    import torch

    from kernels.engine import EngineConfig
    from kernels.tiny import make_tiny

    decode_steps = decode_steps or EngineConfig.decode_steps
    gpu = device != "cpu"
    if gpu and (vllm_python or llama_bench):
        raise SystemExit("moeray bench engine: --vllm-python and --llama-bench are CPU peers; leave them out with "
                         "--device cuda")
    if gpu and not torch.cuda.is_available():
        raise SystemExit("moeray bench engine: --device cuda, but this process sees no CUDA device")
    cpu_only = [p for p in PRECISIONS if PRECISIONS[p][1] == "w8a8"]
    if gpu and (bad := sorted(set(precisions or []) & set(cpu_only))):
        raise SystemExit(f"moeray bench engine: {', '.join(bad)} run on CPU only (int8 activations: moeray's VNNI "
                         "kernel)")
    precisions = precisions or [p for p in PRECISIONS if not (gpu and p in cpu_only)]
    threads = torch.get_num_threads()
    sys_results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(Path(tmp) / "model")
        make_tiny(model_dir, "mixtral", seed=0, **PRESETS[preset])
        worker = [sys.executable, "-m", "actors.cli.bench"]
        out_, peak = _measured([*worker, "_roofline", device])
        roofline = {**_last_json(out_), "peak_rss_mb": peak}
        for system in ["transformers", *(f"moeray:{p}" for p in precisions)]:
            out_, peak = _measured([*worker, "_worker", system, model_dir, ",".join(map(str, batches)),
                                    str(prompt_len), str(new), device, str(prefill), str(decode_steps)])
            sys_results[system] = {**_last_json(out_), "peak_rss_mb": peak}
        peers: list[tuple[str, Callable[[], dict]]] = []
        if vllm_python:
            peers += [(f"vllm:{d}", partial(_vllm, vllm_python, model_dir, d, batches, prompt_len, new, threads))
                      for d in ("float32", "bfloat16")]
        if llama_bench:
            convert = llama_convert or str(Path(llama_bench).resolve().parents[2] / "convert_hf_to_gguf.py")
            peers += [(f"llama.cpp:{t}", partial(_llama, llama_bench, convert, model_dir, t, batches, prompt_len, new,
                                                 threads)) for t in ("f32", "bf16", "q8_0")]
        for name, run in peers:  # a peer that cannot run this checkpoint is a row saying why, not a lost run
            try:
                sys_results[name] = run()
            except (RuntimeError, subprocess.CalledProcessError) as e:
                sys_results[name] = {"error": str(e).splitlines()[0]}
                print(f"{name}: {e}", file=sys.stderr)
        # again after them: a VM's bandwidth drifts over a run of minutes (23.6 GB/s at the start of one where
        # two systems then read 25): the best of the two, so that no fraction is of a low moment
        again = _last_json(_measured([*worker, "_roofline", device])[0])
        roofline.update({k: max(roofline[k], again[k]) for k in ("read_gb_s", "gemv_gb_s")})
    bw = max(roofline["read_gb_s"], roofline["gemv_gb_s"]) * 1e9
    # weights each system reads: moeray's own count; transformers and fp32 / bf16 peers as moeray at that
    # dtype; llama.cpp's q8_0 at 34 bytes a block of 32 (2D weights; norms in f32: a rounding error)
    fp32_w = sys_results.get("moeray:fp32", {}).get("weight_bytes")
    same = {"transformers": "fp32", "vllm:float32": "fp32", "vllm:bfloat16": "bf16", "llama.cpp:f32": "fp32",
            "llama.cpp:bf16": "bf16"}
    for name, r in sys_results.items():
        w = r.get("weight_bytes") or sys_results.get(f"moeray:{same.get(name, '')}", {}).get("weight_bytes")
        if w is None and name == "llama.cpp:q8_0" and fp32_w:
            w = {**fp32_w, **{k: fp32_w[k] * 34 / 32 / 4 for k in ("dense", "experts", "embedding_row")}}
        for b in map(str, batches):
            if w is not None and b in r:
                r[b]["weight_bytes_per_step"] = step_bytes(w, int(b))
                r[b]["roofline_fraction"] = step_bytes(w, int(b)) * r[b]["tokens_per_s"] / int(b) / bw
    ref = sys_results["transformers"]
    where = torch.cuda.get_device_name(device) if gpu else f"CPU, {threads} threads"
    print(f"preset {preset}: Mixtral-shaped, {PRESETS[preset] or 'kernels.tiny defaults'}; {where}; "
          f"prompt {prompt_len} tokens, {new} new tokens greedy (time includes the prompt), best of {REPEATS}; "
          f"moeray with engine.decode_steps {decode_steps} (in decode_burst_ms {EngineConfig.decode_burst_ms:g})")
    print(f"roofline, same run (best of its start and end): streaming read {roofline['read_gb_s']:.1f} GB/s, fp32 GEMV "
          f"{roofline['gemv_gb_s']:.1f} GB/s; fraction = weight bytes per step x steps/s / {bw / 1e9:.1f} GB/s")
    head = " | ".join(f"batch {b} tok/s | x transformers | of roofline" for b in batches)
    if prefill:
        head += f" | prefill tok/s ({PREFILL_PROMPTS} x {prefill}) | x transformers"
    print(f"| system | {head} | peak {'GPU memory' if gpu else 'RSS'} (MB) | same tokens as transformers |")
    print("| --- " * (3 * len(batches) + 3 + 2 * bool(prefill)) + "|")
    for name, r in sys_results.items():
        if "error" in r:
            print(f"| {name} | {r['error']} |")
            continue
        cells = []
        for b in map(str, batches):
            if b not in r:
                cells.append("- | - | -")
                continue
            frac = f"{r[b]['roofline_fraction']:.0%}" if "roofline_fraction" in r[b] else "-"
            cells.append(f"{r[b]['tokens_per_s']:.1f} | {r[b]['tokens_per_s'] / ref[b]['tokens_per_s']:.2f}x | {frac}")
        if prefill:
            p = r.get("prefill", {}).get("tokens_per_s")
            cells.append("- | -" if p is None else f"{p:.0f} | {p / ref['prefill']['tokens_per_s']:.2f}x")
        same_tokens = ("-" if not all("first_tokens" in r.get(b, {}) for b in map(str, batches)) else
                       "yes" if all(r[b]["first_tokens"] == ref[b]["first_tokens"] for b in map(str, batches))
                       else "no")
        print(f"| {name} | {' | '.join(cells)} | {r['peak_gpu_mb' if gpu else 'peak_rss_mb']:.0f} | {same_tokens} |")
    report = {"preset": preset, "prompt_len": prompt_len, "new_tokens": new, "prefill_len": prefill,
              "decode_steps": decode_steps,
              "threads": threads, "device": where,
              "roofline": roofline, "results": sys_results}
    write_report(out, report)
    return report


def _decode_rate(generate, vocab: int, batch: int, prompt_len: int, new: int) -> float:
    """Tokens/s of `generate` on `batch` random prompts, best of REPEATS after a warm-up."""
    import torch

    from kernels.sampling import SamplingParams

    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    generate(prompts, params)
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        generate(prompts, params)
        best = min(best, time.perf_counter() - t0)
    return batch * new / best


def bench_pipeline(preset: str, batches: list[int], prompt_len: int, new: int, shards: int, threads: int,
                   out: str | None, transport: str | None = None, micro_batches: list[int] | None = None,
                   nodes: int = 1) -> dict:
    """The Ray pipeline (one replica per micro_batches setting, all started at once) against the
    single-process engine on the same checkpoint, batch by batch, measured one after the other; where a
    pipeline step's time goes; the round trips a decode step waits on; and one layer's expert call to a
    real shard against a raw gRPC echo of the same bytes. nodes 3: on a ray.cluster_utils.Cluster of this
    machine (a head with the router, an attention node, two expert nodes), else one local Ray node."""
    import ray

    from actors.pipeline import Pipeline
    from cluster.config import MoerayConfig
    from cluster.dataplane.transport import connect
    from kernels.engine import Engine, EngineConfig
    from kernels.tiny import make_tiny

    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    micro_batches = micro_batches or [1, 2]
    report: dict = {"preset": preset, "shards": shards, "threads": threads, "prompt_len": prompt_len,
                    "new_tokens": new, "nodes": nodes, "batches": {}}
    engine_cfg = EngineConfig(max_num_seqs=max(batches),
                              kv_cache_tokens=-(-max(batches) * (prompt_len + new) // 16) * 16)
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny(tmp, "mixtral", seed=0, **PRESETS[preset])
        cluster = _bench_cluster(nodes)
        try:
            engine = Engine.from_dir(tmp, engine_cfg)
            pipes = {}
            for mb in micro_batches:
                cfg = MoerayConfig(model=tmp, engine=engine_cfg)
                p = cfg.pipeline
                p.experts.shards, p.micro_batches = shards, mb
                if transport is not None:
                    p.transport.kind = transport
                for role in (p.attention, p.experts, p.router):
                    role.threads = threads
                if nodes > 1:
                    p.attention.resources = p.router.resources = {"attention_node": 0.01}
                    p.experts.resources = {"expert_node": 0.01}
                pipes[mb] = Pipeline.start(cfg)
            a = engine.args
            kind = pipes[micro_batches[0]].config.pipeline.transport.kind
            report["transport"] = kind
            print(f"preset {preset}: Mixtral-shaped {a.n_layers} layers, dim {a.dim}, {a.num_experts} experts on "
                  f"{shards} shards, {threads} torch thread(s) per actor; fp32 CPU; transport {kind}; "
                  f"{'one Ray node' if nodes == 1 else f'{nodes} Ray nodes on this machine'}; prompt {prompt_len}, "
                  f"{new} new tokens greedy, best of {REPEATS}")
            print("| batch | single process tok/s | " + " | ".join(
                f"micro_batches {mb} tok/s | / single" for mb in micro_batches) + " |")
            print("| --- | --- |" + " --- | --- |" * len(micro_batches))
            runs = REPEATS + 1
            for b in batches:
                single = _decode_rate(lambda p, sp: engine.generate(p, sp), a.vocab_size, b, prompt_len, new)
                row = report["batches"][b] = {"single_tok_s": single}
                for mb, pipe in pipes.items():
                    before = _pipeline_seconds(pipe)
                    rate = _decode_rate(pipe.generate, a.vocab_size, b, prompt_len, new)
                    spent = {k: (v - before[k]) / runs for k, v in _pipeline_seconds(pipe).items()}
                    last = pipe.stats()["data_plane"]["last_step"]  # a decode step's: every run ends with one
                    row[mb] = {"pipeline_tok_s": rate, "seconds_per_run": _breakdown(spent),
                               "decode_step": last}
                print(f"| {b} | {single:.1f} | " + " | ".join(
                    f"{row[mb]['pipeline_tok_s']:.1f} | {row[mb]['pipeline_tok_s'] / single:.2f}x"
                    for mb in micro_batches) + " |")
            print("\nwhere a pipeline step's time goes, as shares of the router's step time (the four add up to it): "
                  "the router's own compute, its calls to the attention actor less the actor's time, the actor's "
                  "compute, and the actor waiting for expert results (their compute, when nothing else overlaps "
                  "it, and the hops); last, the expert shards' compute summed over shards (they run in parallel):")
            names = list(next(iter(report["batches"].values()))[micro_batches[0]]["seconds_per_run"])
            print("| batch | micro_batches | " + " | ".join(names) + " |")
            print("| --- | --- |" + " --- |" * len(names))
            for b, row in report["batches"].items():
                for mb in micro_batches:
                    split = row[mb]["seconds_per_run"]
                    total = sum(v for k, v in split.items() if k != EXPERT_CPU)
                    print(f"| {b} | {mb} | " + " | ".join(f"{100 * v / total:.0f}%" for v in split.values()) + " |")
            print(f"\nsequential round trips a decode step waits on ({a.n_layers} layers, 1 attention actor; before "
                  f"this design: 2 per layer = {2 * a.n_layers}):")
            print("| batch | micro_batches | round trips | data-plane calls |")
            print("| --- | --- | --- | --- |")
            for b, row in report["batches"].items():
                for mb in micro_batches:
                    last = row[mb]["decode_step"]
                    print(f"| {b} | {mb} | {last['round_trips']} | {last['calls']} |")
            report["hops"] = _hops(pipes[micro_batches[0]], batches, a.dim, connect)
            for p in pipes.values():
                p.shutdown()
        finally:
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
    write_report(out, report)
    return report


def _bench_cluster(nodes: int):
    """Ray for bench_pipeline: a local node (None), or a Cluster of `nodes` on this machine, connected: the
    head, the attention node (router and attention actor), and nodes - 1 expert nodes."""
    import ray

    if nodes == 1:
        ray.init(logging_level="ERROR", configure_logging=False)
        return None
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"attention_node": 1}})
    for _ in range(nodes - 1):
        c.add_node(num_cpus=1, resources={"expert_node": 1})
    ray.init(address=c.address, logging_level="ERROR", configure_logging=False)
    c.wait_for_nodes()
    return c


def _pipeline_seconds(pipe) -> dict[str, float]:
    """A pipeline's cumulative seconds: the router's steps and layer calls, its attention actors' forward
    and expert waits, its expert shards' compute."""
    seconds, info = pipe.stats()["seconds"], pipe.info()
    return {"step": seconds["total"], "layers": seconds["layers"],
            "attention": sum(x["busy_s"] for x in info["attention"]),
            "waiting": sum(x["waiting_s"] for x in info["attention"]),
            "experts": sum(x["busy_s"] for x in info["experts"])}


EXPERT_CPU = "expert compute, all shards"


def _breakdown(spent: dict[str, float]) -> dict[str, float]:
    """Seconds of a run by where they went (see _pipeline_seconds): the first four add up to the step time."""
    return {"router compute": spent["step"] - spent["layers"],
            "router-attention hops": spent["layers"] - spent["attention"],
            "attention compute": spent["attention"] - spent["waiting"], "waiting on experts": spent["waiting"],
            EXPERT_CPU: spent["experts"]}


def _hops(pipe, batches: list[int], dim: int, connect) -> dict:
    """One layer's expert call ([b, dim] fp32 each way) to a real expert shard, its compute subtracted,
    against a raw gRPC echo of the same bytes served by an actor of its own (so the baseline is gRPC
    whatever the pipeline's transport kind)."""
    import ray
    import torch

    net = pipe.config.pipeline.transport  # with the token Pipeline.start gave this replica
    shard = pipe.experts[0]
    layer, expert = ray.get(shard.info.remote())["pairs"][0]
    client = connect(net, ray.get(shard.address.remote()))
    grpc_net = dataclasses.replace(net, kind="grpc")
    echo_actor = ray.remote(num_cpus=0)(_GrpcEcho).remote(grpc_net)
    echo_client = connect(grpc_net, ray.get(echo_actor.address.remote()))
    print(f"\none hop (transport kind {net.kind}): a layer's expert call to a shard, its compute subtracted, vs a "
          "raw gRPC echo of the same bytes:")
    print("| rows x dim (fp32) | bytes each way | gRPC echo ms | expert call ms | of which compute ms | hop ms "
          "| hop / echo |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    hops = {}
    for b in batches:
        x = torch.randn(b, dim)
        echo = _mean(lambda x=x: echo_client.echo(x.numpy().tobytes()))
        busy0 = ray.get(shard.info.remote())["busy_s"]
        call = _mean(lambda x=x, b=b: client.experts(layer, [(expert, b)], x).result())
        busy = (ray.get(shard.info.remote())["busy_s"] - busy0) / (N_CALLS + 1)
        hops[b] = {"bytes": x.numel() * 4, "echo_ms": echo * 1e3, "call_ms": call * 1e3, "compute_ms": busy * 1e3}
        print(f"| {b} x {dim} | {x.numel() * 4} | {echo * 1e3:.3f} | {call * 1e3:.3f} | {busy * 1e3:.3f} | "
              f"{(call - busy) * 1e3:.3f} | {(call - busy) / echo:.2f}x |")
    client.close()
    echo_client.close()
    ray.kill(echo_actor)
    return hops


N_CALLS = 200


class _GrpcEcho:
    """A Ray actor serving only the data plane's gRPC Echo: bench_pipeline's baseline for a layer's call."""

    def __init__(self, net):
        from cluster.dataplane.transport import serve

        self.server = serve(net)

    def address(self) -> str:
        return self.server.address


def _dataplane_server(kind: str, token: str, conn) -> None:
    """A child process of bench_dataplane: a data-plane server of `kind` whose handlers return their input,
    or (kind "echo") a bare gRPC server with one Echo method: no interceptor, no token, no protobuf."""
    from concurrent import futures

    import grpc
    import torch

    from cluster.dataplane.transport import TransportConfig, serve

    torch.set_num_threads(1)
    if kind == "echo":
        server = grpc.server(futures.ThreadPoolExecutor(8))
        echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("raw", {"Echo": echo}),))
        conn.send(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        server.start()
    else:
        server = serve(TransportConfig(kind=kind, token=token), experts=lambda layer, blocks, rows: rows)
        conn.send(server.address)
    conn.recv()  # until the benchmark is done


def bench_dataplane(rows: list[int], rounds: int, out: str | None) -> dict:
    """A layer's expert call ([rows, 512] fp32 each way) through each transport kind's Client to a server
    whose handler returns its input, against a raw gRPC echo of the same bytes. Calls alternate in short
    runs (kind after kind); each run's median call counts, and the median of the quietest third of the
    runs is reported: a shared machine's noise comes in bursts."""
    import multiprocessing as mp
    import secrets
    import statistics

    import grpc
    import torch

    from cluster.dataplane.transport import TransportConfig, connect

    kinds, token = ("grpc", "tcp"), secrets.token_urlsafe(32)
    ctx = mp.get_context("spawn")
    pipes, procs, addresses = [], [], {}
    for kind in ("echo", *kinds):
        here, there = ctx.Pipe()
        procs.append(ctx.Process(target=_dataplane_server, args=(kind, token, there), daemon=True))
        procs[-1].start()
        pipes.append(here)
        addresses[kind] = here.recv()
    channel = grpc.insecure_channel(addresses["echo"])
    echo = channel.unary_unary("/raw/Echo")
    clients = {kind: connect(TransportConfig(kind=kind, token=token), addresses[kind]) for kind in kinds}
    torch.set_num_threads(1)

    def median_call(fn, n=50) -> float:
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    report = {"rounds": rounds, "results": {}}
    print(f"one call, [rows, 512] fp32 each way, to a handler that returns it; median of the quietest third of "
          f"{rounds} runs of 50 calls")
    print("| bytes each way | raw gRPC echo us | " + " | ".join(f"{k} call us | {k} / echo" for k in kinds) + " |")
    print("| --- | --- |" + " --- | --- |" * len(kinds))
    try:
        for r in rows:
            x = torch.randn(r, 512)
            data = x.numpy().tobytes()
            calls = {"echo": lambda data=data: echo(data, timeout=30)}
            calls.update({k: (lambda c=c, x=x: c.experts(0, [(0, len(x))], x).result()) for k, c in clients.items()})
            runs = {k: [] for k in calls}
            for fn in calls.values():
                median_call(fn, 10)  # connections up, caches warm
            for _ in range(rounds):
                for k, fn in calls.items():
                    runs[k].append(median_call(fn))
            us = {k: 1e6 * statistics.median(sorted(v)[: max(1, rounds // 3)]) for k, v in runs.items()}
            report["results"][len(data)] = us
            print(f"| {len(data)} | {us['echo']:.0f} | "
                  + " | ".join(f"{us[k]:.0f} | {us[k] / us['echo']:.2f}x" for k in kinds) + " |")
    finally:
        for c in clients.values():
            c.close()
        channel.close()
        for here, proc in zip(pipes, procs, strict=True):
            here.send(None)
            proc.join(10)
    write_report(out, report)
    return report


def _mean(fn) -> float:
    """Mean seconds per call over N_CALLS calls, after one warm-up call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(N_CALLS):
        fn()
    return (time.perf_counter() - t0) / N_CALLS


def bench_moe(batches: list[int], repeats: int, interpret: bool, out: str | None) -> int:
    """`moeray bench structured`: decode tok/s with a JSON schema against unconstrained, same prompts, single-process
engine.
`moeray bench moe`: the fused Triton experts (kernels/fused_moe.py) against the reference
    kernels.moe.expert_rows (one cuBLAS matmul per projection per expert), on one Mixtral-8x7B MoE layer
    (dim 4096, hidden 14336, 8 experts, top-2, bf16, random weights and routing), timed alternately in
    one run. GB/s: the weight bytes of the experts the batch touches, over the time. Needs CUDA; without
    it, prints why and returns 0, or with `interpret` checks correctness on tiny shapes through Triton's
    interpreter on CPU (returns 1 if it is off)."""
    import os

    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: it fixes the mode then
    import torch

    from kernels.fused_moe import StackedExperts, available, fused_expert_rows
    from kernels.model import FeedForward, build
    from kernels.moe import dispatch, expert_rows, route

    device = "cpu" if interpret else "cuda"
    if not interpret and not torch.cuda.is_available():
        print("moeray bench moe: no CUDA device here, and the fused MoE kernel's speed only means something on "
              "a GPU. `moeray bench moe --interpret` checks its correctness on CPU (Triton's interpreter).")
        return 0
    if not available(device):
        print("moeray bench moe: triton is not installed (pip install triton)")
        return 1
    # Mixtral-8x7B's layer; the interpreter's smoke run: tiny, dims not multiples of 16
    D, F, E, k = (40, 72, 8, 2) if interpret else (4096, 14336, 8, 2)
    dtype = torch.bfloat16
    if interpret:
        batches = [b for b in batches if b <= 64] or [1, 16]  # the interpreter runs numpy, program by program
    g = torch.Generator(device).manual_seed(0)
    w13 = torch.randn(E, 2 * F, D, generator=g, device=device, dtype=dtype) * D ** -0.5  # [E, 2F, D]
    w2 = torch.randn(E, D, F, generator=g, device=device, dtype=dtype) * F ** -0.5  # [E, D, F]
    experts = []
    for e in range(E):  # the reference's modules, on views of the same weights
        ff = build(FeedForward, D, F)
        ff.load_state_dict({"w1.weight": w13[e, :F], "w3.weight": w13[e, F:], "w2.weight": w2[e]}, assign=True)
        experts.append(ff)
    stacked = StackedExperts(w13, w2, {e: e for e in range(E)})
    gate = torch.randn(E, D, generator=g, device=device, dtype=dtype)

    def timed(fn) -> float:
        """Seconds of one call: CUDA events around it."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    rows_out = []
    print(f"{'interpreter smoke, ' if interpret else ''}MoE layer dim {D}, hidden {F}, {E} experts top-{k}, "
          f"{dtype}, {torch.cuda.get_device_name() if not interpret else 'CPU'}")
    cols = ["tokens", "rows", "experts"] + ([] if interpret else ["reference ms", "fused ms", "fused speedup",
                                                                  "reference GB/s", "fused GB/s"]) + ["max rel diff"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    ok = True
    with torch.inference_mode():
        for b in batches:
            x = torch.randn(b, D, generator=g, device=device, dtype=dtype)
            plan = dispatch(*route(x, gate, k), E)
            rows, blocks = x[plan.token], plan.blocks()
            ref = expert_rows(rows, blocks, experts)
            fused = fused_expert_rows(rows, blocks, stacked)
            diff = ((fused.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            ok &= diff <= 2e-2  # the bf16 tolerance of tests/test_fused_moe.py
            weight_bytes = len(blocks) * 3 * D * F * w13.element_size()
            if interpret:
                t_ref = t_fused = float("nan")
            else:
                for _ in range(3):  # warm-up: compilation, cuBLAS heuristics
                    expert_rows(rows, blocks, experts), fused_expert_rows(rows, blocks, stacked)
                t_ref = t_fused = float("inf")
                for _ in range(repeats):  # alternating, best of: the least disturbed run of each
                    t_ref = min(t_ref, timed(partial(expert_rows, rows, blocks, experts)))
                    t_fused = min(t_fused, timed(partial(fused_expert_rows, rows, blocks, stacked)))
            rows_out.append(dict(tokens=b, rows=rows.shape[0], experts=len(blocks), reference_s=t_ref, fused_s=t_fused,
                                 speedup=t_ref / t_fused, reference_gb_s=weight_bytes / t_ref / 1e9,
                                 fused_gb_s=weight_bytes / t_fused / 1e9, max_rel_diff=diff))
            r = rows_out[-1]
            times = "" if interpret else (f"{t_ref * 1e3:.3f} | {t_fused * 1e3:.3f} | {r['speedup']:.2f}x | "
                                          f"{r['reference_gb_s']:.0f} | {r['fused_gb_s']:.0f} | ")
            print(f"| {b} | {r['rows']} | {r['experts']} | {times}{diff:.1e} |")
    if not ok:
        print("moeray bench moe: the fused kernel is off the reference by more than 2e-2 (relative)")
    report = {"dim": D, "hidden": F, "experts": E, "k": k, "dtype": str(dtype), "interpret": interpret,
              "device": "CPU" if interpret else torch.cuda.get_device_name(), "repeats": repeats, "results": rows_out}
    write_report(None if interpret else out, report)
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1] == "_roofline":
        print(json.dumps(_roofline(*sys.argv[2:3])))
    elif sys.argv[1] == "_worker":
        system, model_dir, batches, prompt_len, new, device, prefill, steps = sys.argv[2:10]
        print(json.dumps(_worker(system, model_dir, [int(b) for b in batches.split(",")], int(prompt_len), int(new),
                                 device, int(prefill), int(steps))))


# A schema with free text in it, so a random or small model keeps writing for the whole run, as it does unconstrained
STRUCTURED_SCHEMA = {"type": "object", "required": ["title", "tags", "score"], "properties": {
    "title": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
    "score": {"type": "number"}, "kind": {"enum": ["report", "note", "story"]}}}


def bench_structured(model: str, batch: int, prompt_len: int, new: int, out: str | None, rounds: int = 5) -> dict:
    """Decode tokens/s of the single-process engine with a JSON schema against the same engine unconstrained, same
    prompts, greedy, the two alternating for `rounds` rounds, best of each kept. model "demo": the shipped demo
    model (vocabulary 1024); "small": the small preset with Mistral's own 32000-piece tokenizer (from
    mistral-common), where a token mask costs the most."""
    import shutil

    import torch

    from kernels.engine import Engine, EngineConfig
    from kernels.sampling import SamplingParams
    from kernels.structured import Grammar
    from kernels.tiny import make_tiny
    from kernels.train import demo_dir

    with tempfile.TemporaryDirectory() as tmp:
        path = demo_dir()
        if model == "small":
            import mistral_common

            path = make_tiny(tmp, "mixtral", seed=0, **PRESETS["small"])
            shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", path / "tokenizer.model")
        kv = batch * (prompt_len + new + 16)
        engine = Engine.from_dir(path, EngineConfig(max_num_seqs=batch, kv_cache_tokens=kv))
    tok = engine.tokenizer
    g = torch.Generator().manual_seed(0)
    text = tok.decode(torch.randint(3, tok.vocab_size, (batch * prompt_len,), generator=g).tolist())
    prompts = [tok.encode(text[i::batch])[:prompt_len] for i in range(batch)]
    grammar = Grammar.json_schema(STRUCTURED_SCHEMA)
    runs = {"unconstrained": SamplingParams(max_tokens=new, temperature=0, ignore_eos=True),
            "json_schema": SamplingParams(max_tokens=new, temperature=0, grammar=grammar)}
    for params in runs.values():
        engine.generate(prompts, params)  # warm-up (and llguidance's vocabulary, built on first use)
    best, outs = dict.fromkeys(runs, float("inf")), {}
    for _ in range(rounds):  # alternating, so a busy spell of the machine falls on both
        for name, params in runs.items():
            t0 = time.perf_counter()
            outs[name] = engine.generate(prompts, params)
            best[name] = min(best[name], time.perf_counter() - t0)
    res: dict = {}
    for name, o in outs.items():
        tokens = sum(len(c.token_ids) for c in o)
        res[name] = {"seconds": best[name], "tokens": tokens, "tokens_per_s": tokens / best[name],
                     "finished_stop": sum(c.finish_reason == "stop" for c in o), "sample": o[0].text[:200]}
    ratio = res["json_schema"]["tokens_per_s"] / res["unconstrained"]["tokens_per_s"]
    print(f"model {model} (vocabulary {engine.args.vocab_size}); batch {batch}, prompt {prompt_len} tokens, "
          f"{new} new tokens greedy, best of {rounds} alternating rounds")
    print("| run | tokens | tok/s |\n| --- | --- | --- |")
    for name, r in res.items():
        print(f"| {name} | {r['tokens']} | {r['tokens_per_s']:.1f} |")
    print(f"json_schema / unconstrained: {ratio:.2f}x")
    print(f"a json_schema output: {res['json_schema']['sample']!r}")
    report = {"model": model, "batch": batch, "prompt_len": prompt_len, "new_tokens": new, "schema": STRUCTURED_SCHEMA,
              "results": res, "ratio": ratio}
    write_report(out, report)
    return report
