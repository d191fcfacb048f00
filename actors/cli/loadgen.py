"""Load generator: concurrent streaming requests against a running Pipeline, an HTTP server, or any
client function, with throughput, time to first token and inter-token latency percentiles; optionally
skewed toward one expert. Every request sent ends in exactly one of: completed, rejected (429 /
RESOURCE_EXHAUSTED: the client backs off and sends the next), failed, cancelled (by the client, on
purpose), or lost (no end: a stream cut short, or no answer within the request timeout).

Skew: `skewed_prompts` runs candidate prompts through the single-process model with a hook on each
layer's gate and keeps those whose rows (prompt and greedy continuation) go most to one (layer, expert).

    prompts, pair, share = skewed_prompts(model_dir, n=8)
    report = asyncio.run(run_load(pipeline, prompts, SamplingParams(max_tokens=32, temperature=0), 8, 30.0))
    print(report.table_row("skewed"))
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from actors.cli.bench import write_report
from kernels.sampling import SamplingParams

Pair = tuple[int, int]


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


# -- skew ----------------------------------------------------------------------------------------------
def routing_counts(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[dict[Pair, int]]:
    """For each prompt: token rows per (layer, expert) over its prefill and greedy decode (one at a time)."""
    from kernels.engine import Engine
    from kernels.moe import route

    engine = Engine.from_dir(model_dir)
    model = engine.executor.model
    if not model.args.moe:
        raise ValueError("a dense model has one expert per layer: nothing to skew")
    k = model.args.moe.num_experts_per_tok
    counts: dict[Pair, int] = {}

    def hook(layer: int, gate: torch.Tensor) -> Callable:
        def fn(module, args, x):  # x: ffn_norm's output, what the gate routes
            _, experts = route(x, gate, k)  # [T, k]
            for e in experts.flatten().tolist():
                counts[layer, e] = counts.get((layer, e), 0) + 1
        return fn

    for layer in model.layers:  # the torch path, which calls ffn_norm (the C kernel norms inside its call), as
        layer.feed_forward.native = None  # a pipeline's attention actors do: their experts are away
    handles = [layer.ffn_norm.register_forward_hook(hook(l, layer.feed_forward.gate.weight))
               for l, layer in enumerate(model.layers)]
    out = []
    try:
        for p in prompts:
            counts = {}
            engine.generate([p], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
            out.append(counts)
    finally:
        for h in handles:
            h.remove()
    return out


def skewed_prompts(model_dir: str, n: int = 8, length: int = 8, max_tokens: int = 16, candidates: int = 64,
                   pair: Pair | None = None, seed: int = 0) -> tuple[list[list[int]], Pair, float]:
    """`n` prompts whose rows go most to one pair (the given one, else the one they skew to most), the pair,
    and its share of those prompts' rows in its layer (uniform routing gives 1 / experts; the most is 1 / k)."""
    from kernels.args import ModelArgs

    args = ModelArgs.from_dir(model_dir)
    g = torch.Generator().manual_seed(seed)
    cands = [torch.randint(3, args.vocab_size, (length,), generator=g).tolist() for _ in range(candidates // 2)]
    cands += [[t] * length for t in torch.randint(3, args.vocab_size, (candidates - len(cands),), generator=g).tolist()]
    # a repeated token tends to route the same way at every position, and to repeat in greedy decode
    counts = routing_counts(model_dir, cands, max_tokens)

    def share(c: dict[Pair, int], p: Pair) -> float:
        total = sum(v for (l, _), v in c.items() if l == p[0])
        return c.get(p, 0) / max(total, 1)

    best = None
    for p in [pair] if pair else sorted({q for c in counts for q in c}):
        top = sorted(range(candidates), key=lambda i: -share(counts[i], p))[:n]
        merged: dict[Pair, int] = {}
        for i in top:
            for q, v in counts[i].items():
                merged[q] = merged.get(q, 0) + v
        s = share(merged, p)
        if best is None or s > best[2]:
            best = ([cands[i] for i in top], p, s)
    return best


# -- load ----------------------------------------------------------------------------------------------
class Rejected(Exception):
    """The server refused the request for load (HTTP 429, gRPC RESOURCE_EXHAUSTED) with a well-formed error."""


class Cancelled(Exception):
    """The client closed the stream before its end, on purpose (a user who stops reading)."""


class Incomplete(Exception):
    """The stream ended without its final event: the request is lost, not failed."""


@dataclass
class Report:
    seconds: float = 0.0
    sent: int = 0
    requests: int = 0  # completed
    failed: int = 0
    rejected: int = 0
    cancelled: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    outputs: list[tuple[int, list[int]]] = field(default_factory=list)  # (prompt index, token ids) of each request
    rejection_s: list[float] = field(default_factory=list)  # how long each rejection took to come back
    errors: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Requests with no outcome: counted as a residue, so whatever the cause it shows here."""
        return self.sent - self.requests - self.failed - self.rejected - self.cancelled

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def add(self, other: Report) -> None:
        """Merges another run's counts and samples into this one (seconds: the longer)."""
        for name in ("sent", "requests", "failed", "rejected", "cancelled", "tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("ttft", "itl", "outputs", "rejection_s", "errors"):
            getattr(self, name).extend(getattr(other, name))
        self.seconds = max(self.seconds, other.seconds)

    def summary(self) -> dict:
        return {"seconds": round(self.seconds, 2), "sent": self.sent, "requests": self.requests, "failed": self.failed,
                "rejected": self.rejected, "cancelled": self.cancelled, "lost": self.lost,
                "tokens": self.tokens, "tokens_per_s": round(self.tokens_per_s, 1),
                **{f"ttft_p{q}_ms": round(_percentile(self.ttft, q) * 1e3, 1) for q in (50, 90, 99)},
                **{f"itl_p{q}_ms": round(_percentile(self.itl, q) * 1e3, 1) for q in (50, 90, 99)}}


HEADER = (f"{'run':<22} {'req':>5} {'fail':>4} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'ITL p50':>8} {'p90':>7} "
          f"{'p99':>7}")


def table_row(name: str, r: Report) -> str:
    s = r.summary()
    return (f"{name:<22} {s['requests']:>5} {s['failed']:>4} {s['tokens_per_s']:>8.1f} {s['ttft_p50_ms']:>7.1f}ms "
            f"{s['ttft_p99_ms']:>6.1f}ms {s['itl_p50_ms']:>6.1f}ms {s['itl_p90_ms']:>5.1f}ms {s['itl_p99_ms']:>5.1f}ms")


def pipeline_stream(*pipelines):
    """A load-generator stream over Pipeline replicas: each request goes to the next one in turn."""
    turn = itertools.cycle(pipelines)

    async def stream(prompt: list[int], params: SamplingParams):
        async for ev in next(turn).stream(prompt, params):
            yield ev.token
    return stream


def http_stream(url: str, model: str | None):
    import httpx

    client = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=None)

    async def stream(prompt: list[int], params: SamplingParams):
        body = {"model": model, "prompt": prompt, "max_tokens": params.max_tokens, "temperature": params.temperature,
                "stream": True, "ignore_eos": params.ignore_eos}
        async with client.stream("POST", "/v1/completions", json={k: v for k, v in body.items() if v is not None}) as r:
            if r.status_code == 429:
                raise Rejected((await r.aread()).decode()[:200])
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        yield chunk["choices"][0].get("text", "")
    stream.client = client
    return stream


async def run_load(target, prompts: list, params: SamplingParams | None, concurrency: int = 8,
                   duration_s: float | None = None, requests: int | None = None,
                   stop: Callable[[], bool] | None = None, model: str | None = None,
                   request_timeout_s: float | None = None, backoff_s: float = 0.1) -> Report:
    """Keeps `concurrency` streams in flight, cycling through `prompts`, until `duration_s` passed,
    `requests` were sent, or `stop()` is true; then waits for the streams in flight. `target`: a Pipeline,
    an HTTP base URL (OpenAI API), or a client `stream(prompt, params)` yielding one item per token (it
    raises Rejected, Cancelled or Incomplete for those outcomes). A rejected stream's worker waits
    `backoff_s` before its next request; a request still running after `request_timeout_s` is lost."""
    if callable(target):
        stream = target
    else:
        stream = http_stream(target, model) if isinstance(target, str) else pipeline_stream(target)
    report, t0 = Report(), time.perf_counter()

    def more() -> bool:
        return not ((duration_s is not None and time.perf_counter() - t0 >= duration_s)
                    or (requests is not None and report.sent >= requests) or (stop is not None and stop()))

    async def one(prompt, tokens: list, start: float) -> None:
        last = start
        async for tok in stream(prompt, params):
            now = time.perf_counter()
            (report.itl if tokens else report.ttft).append(now - last)
            last = now
            tokens.append(tok)

    async def worker():
        while more():
            i = report.sent % len(prompts)
            report.sent += 1
            tokens, start = [], time.perf_counter()
            try:
                await asyncio.wait_for(one(prompts[i], tokens, start), request_timeout_s)
            except Rejected:
                report.rejected += 1
                report.rejection_s.append(time.perf_counter() - start)
                await asyncio.sleep(backoff_s)
                continue
            except Cancelled:
                report.cancelled += 1
                report.tokens += len(tokens)
                continue
            except (Incomplete, asyncio.TimeoutError) as e:  # counted nowhere: `lost`
                report.errors.append(f"lost: {str(e) or f'no end after {request_timeout_s}s'}")
                continue
            except Exception as e:
                report.failed += 1
                report.errors.append(f"{type(e).__name__}: {e}")
                continue
            report.requests += 1
            report.tokens += len(tokens)
            report.outputs.append((i, tokens))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        if hasattr(stream, "client"):
            await stream.client.aclose()
    report.seconds = time.perf_counter() - t0
    return report


# -- benchmarks (`moeray bench load`, `moeray bench scaling`) ------------------------------------------
def _model(preset: str, tmp: str) -> str:
    from actors.cli.bench import PRESETS
    from kernels.tiny import make_tiny

    make_tiny(tmp, "mixtral", seed=0, **PRESETS[preset])
    return tmp


def _prompts(model_dir: str, n: int, length: int, max_tokens: int, skew: bool) -> tuple[list[list[int]], str]:
    if skew:
        prompts, pair, share = skewed_prompts(model_dir, n=n, length=length, max_tokens=max_tokens)
        return prompts, f"skewed to expert {pair[1]} of layer {pair[0]}: {100 * share:.0f}% of its layer's rows"
    from kernels.args import ModelArgs

    g = torch.Generator().manual_seed(0)
    vocab = ModelArgs.from_dir(model_dir).vocab_size
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)], "random prompts"


def bench_load(url: str | None, config_path: str | None, model: str | None, preset: str, concurrency: int,
               duration: float, max_tokens: int, prompt_len: int, skew: bool, out: str | None) -> dict:
    """One load run against `url` (an HTTP server) or a Pipeline started here from `config_path`."""
    import tempfile

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        if url:
            if skew and not model:
                raise ValueError("--skew with --url needs --model: the checkpoint the server runs, to find prompts")
            model_dir = model or _model(preset, tmp)
            prompts, what = _prompts(model_dir, 16, prompt_len, max_tokens, skew)
            report = asyncio.run(run_load(url, prompts, params, concurrency, duration))
            status = None
        else:
            import ray

            from actors.pipeline import Pipeline
            from cluster.config import load_config

            cfg = load_config(config_path)
            cfg.model = model or cfg.model or _model(preset, tmp)
            prompts, what = _prompts(cfg.model, 16, prompt_len, max_tokens, skew)
            if not ray.is_initialized():
                ray.init(logging_level="ERROR", configure_logging=False)
            pipe = Pipeline.start(cfg)
            try:
                report = asyncio.run(run_load(pipe, prompts, params, concurrency, duration))
                status = pipe.scaler_status()
            finally:
                pipe.shutdown()
    print(f"{url or 'pipeline'}: {concurrency} concurrent streams for {duration:.0f}s, {what}, "
          f"{max_tokens} tokens each (greedy)")
    print(HEADER)
    print(table_row("load", report))
    if status:
        print("expert replicas (base + extra):", {k: n for k, n in status["replicas"].items() if n > 1} or "base only")
    if report.errors:
        print("first errors:", report.errors[:3])
    result = {"what": what, "concurrency": concurrency, **report.summary(), "scaler": status}
    write_report(out, result)
    return result


def _scaler_settled(pipe, limit_s: float = 60.0) -> Callable[[], bool]:
    """A `stop` for run_load: true once the pipeline's scaler has every target replica up and has ticked
    more than 10 times, or `limit_s` after this call."""
    t0, seen = time.monotonic(), {"at": 0.0, "done": False}

    def settled() -> bool:  # polled by every stream between requests: ask the scaler 2x/s
        if time.monotonic() - seen["at"] > 0.5:
            s, seen["at"] = pipe.scaler_status(), time.monotonic()
            seen["done"] = time.monotonic() - t0 > limit_s or (s["replicas"] == s["targets"] and s["ticks"] > 10)
        return seen["done"]
    return settled


def bench_scaling(preset: str, concurrency: int, duration: float, max_tokens: int, prompt_len: int,
                  shards: int, max_extra: int, out: str | None) -> dict:
    """The same skewed load with expert scaling off, then on, in one run. The 'off' run measures the hot
    pair's token rate; the 'on' run's target_tokens_per_s is a third of it, so the hot pair asks for 3
    replicas; it is measured after the scaler has settled (a warm-up under the same load)."""
    import tempfile

    import ray

    from actors.pipeline import Pipeline
    from cluster.config import MoerayConfig, ScalingConfig
    from kernels.engine import Engine, EngineConfig

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    rows, result = [], {"preset": preset, "concurrency": concurrency, "duration_s": duration, "runs": {}}
    def say(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        say(f"writing the {preset} model")
        model_dir = _model(preset, tmp)
        say("finding prompts that route to one expert")
        # the scan decodes 8 tokens per candidate, not max_tokens: a larger preset's scan stays under a minute
        prompts, pair, share = skewed_prompts(model_dir, n=8, length=prompt_len, max_tokens=min(max_tokens, 8))
        hot = f"{pair[0]}:{pair[1]}"
        reference = [c.token_ids for c in Engine.from_dir(model_dir).generate(prompts, params)]
        ray.init(logging_level="ERROR", configure_logging=False)
        try:
            target = None
            for mode in ("off", "on"):
                cfg = MoerayConfig(model=model_dir, engine=EngineConfig(max_num_seqs=max(concurrency, 8)))
                cfg.pipeline.experts.shards = shards
                if mode == "on":
                    cfg.scaling = ScalingConfig(enabled=True, max_replicas=3, max_extra_replicas=max_extra,
                                                target_tokens_per_s=target, upscale_delay_s=2, downscale_delay_s=30,
                                                cooldown_s=2, window_s=3, interval_s=0.5, ready_timeout_s=60)
                say(f"scaling {mode}: starting the pipeline")
                pipe = Pipeline.start(cfg)
                try:
                    if mode == "on":  # warm-up: the same load until the scaler has settled
                        say("scaling on: load until the scaler settles")
                        asyncio.run(run_load(pipe, prompts, params, concurrency, stop=_scaler_settled(pipe)))
                    asyncio.run(run_load(pipe, prompts, params, concurrency, duration_s=2))  # warm caches
                    say(f"scaling {mode}: measuring")
                    report = asyncio.run(run_load(pipe, prompts, params, concurrency, duration_s=duration))
                    rate = pipe.stats()["expert_tokens_per_s"].get(hot, 0.0)
                    status = pipe.scaler_status()
                finally:
                    pipe.shutdown()
                if mode == "off":
                    target = max(rate / 3, 1.0)
                same = all(tokens == reference[i] for i, tokens in report.outputs)
                replicas = status["replicas"] if status else {}
                extra = {k: n for k, n in replicas.items() if n > 1}
                rows.append((f"scaling {mode}", report, extra, same))
                result["runs"][mode] = {**report.summary(), "hot_rate": rate, "replicas": extra, "same_tokens": same,
                                        "target_tokens_per_s": target if mode == "on" else None}
        finally:
            ray.shutdown()
    print(f"preset {preset}, {shards} expert shards, {concurrency} concurrent streams, {duration:.0f}s measured "
          f"per run, {max_tokens} tokens each; prompts skewed to {hot} ({100 * share:.0f}% of layer {pair[0]}'s rows); "
          f"scaling on: target {target:.1f} tokens/s per replica (a third of the hot rate measured with it off)")
    print(HEADER + "  same tokens  extra replicas")
    for name, report, extra, same in rows:
        print(table_row(name, report) + f"  {'yes' if same else 'NO':<11}  {extra or '-'}")
    off, on = result["runs"]["off"], result["runs"]["on"]
    print(f"on / off: throughput {on['tokens_per_s'] / max(off['tokens_per_s'], 1e-9):.2f}x, "
          f"ITL p50 {on['itl_p50_ms'] / max(off['itl_p50_ms'], 1e-9):.2f}x")
    write_report(out, result)
    return result
