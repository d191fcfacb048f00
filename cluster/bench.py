"""`moeray bench engine`: the single-process engine against transformers' generate, same checkpoint,
same machine, same run. Each system runs in its own subprocess so its peak memory is its own.

Prints a markdown table of decode throughput and peak RSS with ratios, and writes it as JSON.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A Mixtral-shaped model big enough that compute, not Python overhead, dominates on a laptop CPU:
# 8 experts top-2, GQA 2:1, the real 32000 vocabulary. About 0.1 B parameters.
REPEATS = 3
PRESETS = {
    "small": dict(dim=512, n_layers=4, head_dim=64, hidden_dim=1024, n_heads=8, n_kv_heads=4, vocab_size=32000),
    "tiny": dict(),  # kernels.tiny's defaults: seconds to run, for smoke tests
}


def _worker(system: str, model_dir: str, batches: list[int], prompt_len: int, new: int) -> dict:
    import torch

    torch.manual_seed(0)
    results = {}
    if system == "moeray":
        from kernels.engine import Engine, EngineConfig
        from kernels.sampling import SamplingParams

        kv = max(batches) * (prompt_len + new)
        engine = Engine.from_dir(model_dir, EngineConfig(max_num_seqs=max(batches), kv_cache_tokens=-(-kv // 16) * 16))
        vocab = engine.args.vocab_size

        def run(prompts):
            out = engine.generate(prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
            return [c.token_ids for c in out]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        vocab = model.config.vocab_size

        @torch.inference_mode()
        def run(prompts):
            out = model.generate(torch.tensor(prompts), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            return out[:, prompt_len:].tolist()

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
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return results


def bench_engine(preset: str, batches: list[int], prompt_len: int, new: int, out: str | None) -> dict:
    from kernels.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny(tmp, "mixtral", seed=0, **PRESETS[preset])
        res = {}
        for system in ("transformers", "moeray"):
            cmd = [sys.executable, "-m", "cluster.bench", "_worker", system, tmp, ",".join(map(str, batches)),
                   str(prompt_len), str(new)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res[system] = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, ref = res["moeray"], res["transformers"]
    print(f"preset {preset}: Mixtral-shaped, {PRESETS[preset] or 'kernels.tiny defaults'}; fp32 CPU; "
          f"prompt {prompt_len} tokens, {new} new tokens greedy, best of {REPEATS}")
    print("| batch | transformers tok/s | moeray tok/s | moeray / transformers | same tokens |")
    print("| --- | --- | --- | --- | --- |")
    for b in map(str, batches):
        same = "yes" if ours[b]["first_tokens"] == ref[b]["first_tokens"] else "NO"
        print(f"| {b} | {ref[b]['tokens_per_s']:.1f} | {ours[b]['tokens_per_s']:.1f} | "
              f"{ours[b]['tokens_per_s'] / ref[b]['tokens_per_s']:.2f}x | {same} |")
    print(f"| peak RSS (MB) | {ref['peak_rss_mb']:.0f} | {ours['peak_rss_mb']:.0f} | "
          f"{ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x | |")
    report = {"preset": preset, "prompt_len": prompt_len, "new_tokens": new, "results": res}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    if sys.argv[1] == "_worker":
        system, model_dir, batches, prompt_len, new = sys.argv[2:7]
        print(json.dumps(_worker(system, model_dir, [int(b) for b in batches.split(",")], int(prompt_len), int(new))))
