"""`moeray bench bursts`: what engine.decode_steps (several greedy decode steps a call) costs and gives a server.

The single-process engine behind its server loop (cluster.loop.EngineLoop, what an HTTP or gRPC front drives),
requests arriving open-loop (Poisson, at a set rate, whatever the server's pace), each streamed: time to first
token, the gaps between a stream's tokens, tokens/s, with decode_steps 1 (a step a call: the baseline) and N,
alternating in one process over the same arrivals (ABBA), prefix caching off (so both compute every prompt).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import tempfile
import time

from actors.cli.bench import PRECISIONS, PRESETS, write_report
from actors.cli.loadgen import _percentile


async def _arrivals(loop, prompts: list[list[int]], rate: float, max_tokens: int, seed: int) -> dict:
    """Every prompt sent once, the gaps between sends drawn from Exp(rate): each stream's time to first token,
    its gaps between tokens and its tokens; the seconds from the first send to the last token."""
    from kernels.engine import Request
    from kernels.sampling import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    rng = random.Random(seed)
    starts = list(itertools.accumulate(rng.expovariate(rate) for _ in prompts))
    ttft: list[float] = []
    gaps: list[float] = []
    outputs: list[list[int]] = [[] for _ in prompts]

    async def one(i: int) -> None:
        await asyncio.sleep(starts[i])
        last = sent = time.perf_counter()
        async for ev in loop.generate(Request(f"bursts-{seed}-{i}", prompts[i], params)):
            now = time.perf_counter()
            (gaps if outputs[i] else ttft).append(now - (last if outputs[i] else sent))
            last = now
            outputs[i].append(ev.token)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return {"ttft": ttft, "gaps": gaps, "outputs": outputs, "seconds": time.perf_counter() - t0}


def bench_bursts(preset: str, precision: str, rate: float, requests: int, max_tokens: int, rounds: int,
                 decode_steps: int | None, out: str | None) -> dict:
    """decode_steps 1 against `decode_steps` (None: the engine's default) under open-loop arrivals at `rate`
    requests/s: `requests` prompts of 8-48 tokens a run, `max_tokens` greedy tokens each, `rounds` ABBA rounds."""
    import torch

    from cluster.loop import EngineLoop
    from kernels.engine import Engine, EngineConfig
    from kernels.tiny import make_tiny

    steps = decode_steps or EngineConfig.decode_steps
    dtype, experts, dense = PRECISIONS[precision]
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny(tmp, "mixtral", seed=0, **PRESETS[preset])
        engine = Engine.from_dir(tmp, EngineConfig(dtype=dtype, expert_quant=experts, weight_quant=dense,
                                                   max_num_seqs=64, kv_cache_tokens=64 * (48 + max_tokens + 16),
                                                   enable_prefix_caching=False))
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 49, (requests,), generator=g).tolist()
    prompts = [torch.randint(3, engine.args.vocab_size, (n,), generator=g).tolist() for n in lengths]
    ways = {"a step a call": 1, f"decode_steps {steps}": steps}  # 1 against 1: the run-to-run noise
    runs: dict[str, list[dict]] = {w: [] for w in ways}
    busy, step = [0.0], engine.step

    def timed_step():  # the seconds the server loop's thread spends in steps: what the load costs the machine
        start = time.perf_counter()
        try:
            return step()
        finally:
            busy[0] += time.perf_counter() - start

    engine.step = timed_step  # type: ignore[method-assign]
    loop = EngineLoop(engine)
    try:
        asyncio.run(_arrivals(loop, prompts[:8], rate, max_tokens, seed=-1))  # warm-up
        for r in range(rounds):
            for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):  # ABBA: a busy spell falls on both
                engine.config.decode_steps = ways[way]  # read by the loop's thread at its next step: idle now
                busy[0] = 0.0
                runs[way].append({**asyncio.run(_arrivals(loop, prompts, rate, max_tokens, seed=r)), "busy": busy[0]})
    finally:
        loop.stop()
    res: dict = {}
    for way, rs in runs.items():
        ttft = [t for x in rs for t in x["ttft"]]
        gaps = [t for x in rs for t in x["gaps"]]
        res[way] = {"decode_steps": ways[way],
                    "ttft_p50_ms": 1e3 * _percentile(ttft, 50), "ttft_p99_ms": 1e3 * _percentile(ttft, 99),
                    "gap_p50_ms": 1e3 * _percentile(gaps, 50), "gap_p99_ms": 1e3 * _percentile(gaps, 99),
                    "gap_max_ms": 1e3 * max(gaps),
                    "tokens_per_s": sum(len(o) for x in rs for o in x["outputs"]) / sum(x["seconds"] for x in rs),
                    "busy": sum(x["busy"] for x in rs) / sum(x["seconds"] for x in rs)}
    base, burst = (res[w] for w in ways)
    same = all(a["outputs"] == b["outputs"] for a, b in zip(*runs.values(), strict=True))
    print(f"preset {preset}, {precision}: {requests} requests a run arriving at {rate:g}/s (Poisson, open loop), "
          f"prompts of 8-48 tokens, {max_tokens} new tokens greedy each, streamed through the engine's server loop; "
          f"{rounds} rounds ABBA; engine.decode_burst_ms {engine.config.decode_burst_ms:g}")
    print(f"{'':<16} {'TTFT p50':>9} {'p99':>8} {'gap p50':>8} {'p99':>7} {'max':>7} {'tok/s':>8} {'busy':>5}")
    for way, s in res.items():
        print(f"{way:<16} {s['ttft_p50_ms']:>7.1f}ms {s['ttft_p99_ms']:>6.1f}ms {s['gap_p50_ms']:>6.2f}ms "
              f"{s['gap_p99_ms']:>5.1f}ms {s['gap_max_ms']:>5.1f}ms {s['tokens_per_s']:>8.1f} {100 * s['busy']:>4.0f}%")
    print("(tok/s: tokens over the seconds from the first arrival to the last token: the arrival rate's unless the "
          "server falls behind; busy: the share of those seconds the server's step thread was stepping)")
    print(f"decode_steps {steps} vs 1: TTFT p50 {burst['ttft_p50_ms'] - base['ttft_p50_ms']:+.1f} ms, p99 "
          f"{burst['ttft_p99_ms'] - base['ttft_p99_ms']:+.1f} ms; tok/s "
          f"{burst['tokens_per_s'] / base['tokens_per_s']:.2f}x; busy {burst['busy'] / base['busy']:.2f}x; "
          f"same tokens: {'yes' if same else 'no'}")
    if not same:
        print("(no is what two runs a step a call give too: which prompts share a step follows the arrivals' timing, "
              "and a prompt computed as decode rows or as a chunk differs in its last bits, which W8A8's rounding of "
              "activations can carry into a near-tie's greedy token)")
    result = {"preset": preset, "precision": precision, "rate": rate, "requests": requests, "max_tokens": max_tokens,
              "rounds": rounds, "decode_burst_ms": engine.config.decode_burst_ms, "results": res,
              "same_tokens": same}
    write_report(out, result)
    return result
