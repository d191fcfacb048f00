"""`moeray bench autoscale`: the Serve application under a load ramp (OpenAI streaming over HTTP), sampled
every second: Router replicas (pipeline replicas, autoscaled by Serve on ongoing requests), the expert pool's
shard actors, requests in flight and tokens per second. Writes the trace as JSON and, when matplotlib is
installed, as a PNG."""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path

from actors.cli.loadgen import http_stream, run_load

PHASES = ((20.0, 2), (40.0, 12), (40.0, 1))  # (seconds, concurrent streams): low, high, low


def bench_autoscale(phases: tuple[tuple[float, int], ...], max_tokens: int, out: str) -> dict:
    import ray
    from ray import serve

    from actors.app import QUIET, moeray_app, serve_options
    from actors.common import live_actors
    from cluster.config import MoerayConfig, RoutersConfig
    from cluster.ports import free_port
    from kernels.engine import EngineConfig
    from kernels.sampling import SamplingParams
    from kernels.tiny import make_tiny

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny(tmp, "mixtral", seed=0)
        cfg = MoerayConfig(model=tmp, engine=EngineConfig(max_num_seqs=16, kv_cache_tokens=8192))
        cfg.pipeline.experts.shards = 2
        cfg.serve.routers = RoutersConfig(min_replicas=1, max_replicas=3, target_ongoing_requests=4,
                                          upscale_delay_s=2, downscale_delay_s=10, look_back_period_s=3,
                                          drain_timeout_s=60)
        cfg.serve.model_name, cfg.serve.http_port = "tiny", free_port()
        url = f"http://127.0.0.1:{cfg.serve.http_port}"
        ray.init(logging_level="ERROR", configure_logging=False)
        try:
            serve.start(**serve_options(cfg), logging_config=QUIET)
            serve.run(moeray_app(cfg), name="moeray", route_prefix="/", logging_config=QUIET)
            live = {"in_flight": 0, "tokens": 0}

            def counted():
                """A client stream (run_load closes its client at the end of a phase) counting tokens live."""
                http = http_stream(url, "tiny")

                async def stream(prompt, p):
                    live["in_flight"] += 1
                    try:
                        async for chunk in http(prompt, p):
                            live["tokens"] += 1
                            yield chunk
                    finally:
                        live["in_flight"] -= 1
                stream.client = http.client
                return stream

            trace: list[dict] = []
            stop = threading.Event()
            t0 = time.monotonic()

            def sample():
                last = (t0, 0)
                while not stop.wait(1.0):
                    states = serve.status().applications["moeray"].deployments["Router"].replica_states
                    shards = live_actors("ExpertShard")
                    now, tokens = time.monotonic(), live["tokens"]
                    trace.append({"t": round(now - t0, 2), "routers": states.get("RUNNING", 0),
                                  "routers_starting_or_stopping": sum(v for k, v in states.items() if k != "RUNNING"),
                                  "expert_shards": len(shards), "in_flight": live["in_flight"],
                                  "tokens_per_s": round((tokens - last[1]) / (now - last[0]), 1)})
                    last = (now, tokens)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            prompts = [[1, 5 + i, 9, 12 + i] for i in range(8)]
            reports = []
            for seconds, concurrency in phases:
                print(f"[{time.monotonic() - t0:5.1f}s] {concurrency} streams for {seconds:.0f}s", flush=True)
                reports.append(asyncio.run(run_load(counted(), prompts, params, concurrency=concurrency,
                                                    duration_s=seconds)).summary())
            time.sleep(5)
            stop.set()
            sampler.join()
            serve.shutdown()
        finally:
            ray.shutdown()
    result = {"phases": [{"seconds": s, "concurrency": c, **r} for (s, c), r in zip(phases, reports, strict=True)],
              "trace": trace}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    for (seconds, concurrency), r in zip(phases, reports, strict=True):
        print(f"{concurrency:>3} streams, {seconds:.0f}s: {r['requests']} requests, {r['failed']} failed, {r['lost']} "
              f"lost, {r['tokens_per_s']} tok/s")
    print(f"routers: max {max(s['routers'] for s in trace)}, at the end {trace[-1]['routers']}; expert shard "
          f"actors: {sorted({s['expert_shards'] for s in trace})}")
    _plot(trace, str(Path(out).with_suffix(".png")))
    return result


def _plot(trace: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: `pip install matplotlib` for the PNG")
        return
    t = [s["t"] for s in trace]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 5))
    top.step(t, [s["routers"] for s in trace], where="post", label="Router replicas (running)")
    top.step(t, [s["expert_shards"] for s in trace], where="post", label="expert shard actors (pool)")
    top.step(t, [s["in_flight"] for s in trace], where="post", label="requests in flight", alpha=0.6)
    top.set_ylabel("count")
    top.legend(loc="upper right", fontsize=8)
    bottom.plot(t, [s["tokens_per_s"] for s in trace], label="tokens/s")
    bottom.set_ylabel("tokens/s")
    bottom.set_xlabel("seconds")
    fig.suptitle("moeray serve under a load ramp: routers scale with requests, the expert pool stays")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")
