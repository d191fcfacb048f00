"""`moeray bench pool`: N pipeline replicas sharing one expert pool against N private pipelines (each with
its own pool: the layout before the pool), on one Ray instance, one layout after the other: expert weight
bytes held in the cluster and the resident memory of every moeray process, then the same streaming load
spread over the replicas (tokens/s, TTFT and ITL), and the expert shards' mean rows per expert matrix
multiply (cross-caller batching)."""

from __future__ import annotations

import asyncio
import tempfile

from actors.cli.bench import PRESETS, write_report
from actors.cli.loadgen import HEADER, pipeline_stream, run_load, table_row

ROLES = ("Router", "AttentionActor", "ExpertShard", "ExpertPool")


def _memory() -> dict[str, dict]:
    """Per role: live actors and their resident memory (bytes), from Ray's state API and /proc."""
    import psutil

    from actors.common import live_actors

    out: dict[str, dict] = {role: {"actors": 0, "rss": 0} for role in ROLES}
    for a in live_actors():
        if a["class"] in out and a["pid"]:
            out[a["class"]]["actors"] += 1
            try:
                out[a["class"]]["rss"] += psutil.Process(a["pid"]).memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return out


def _expert_bytes(pipes) -> int:
    """Expert weight bytes the replicas' pools hold, each shard counted once."""
    import ray

    shards = {s._actor_id.hex(): s for p in pipes for s in p.experts}
    return sum(i["param_bytes"] for i in ray.get([s.info.remote() for s in shards.values()]))


def _shard_counters(pipes) -> tuple[int, int]:
    """(rows, expert matrix multiplies) the replicas' shards have run so far."""
    import ray

    shards = {s._actor_id.hex(): s for p in pipes for s in p.experts}
    infos = ray.get([s.info.remote() for s in shards.values()])
    return sum(i["rows"] for i in infos), sum(i["expert_gemms"] for i in infos)


def bench_pool(preset: str, replicas: list[int], concurrency: int, duration: float, max_tokens: int,
               prompt_len: int, shards: int, out: str | None) -> dict:
    import ray
    import torch

    from actors.pipeline import Pipeline
    from cluster.config import MoerayConfig
    from kernels.engine import EngineConfig
    from kernels.sampling import SamplingParams
    from kernels.tiny import make_tiny

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    report: dict = {"preset": preset, "shards": shards, "concurrency_per_replica": concurrency,
                    "duration_s": duration, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny(tmp, "mixtral", seed=0, **PRESETS[preset])
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 32000 if preset == "small" else 512, (16, prompt_len), generator=g).tolist()
        cfg = MoerayConfig(model=tmp, engine=EngineConfig(max_num_seqs=64, kv_cache_tokens=16384))
        cfg.pipeline.experts.shards = shards
        ray.init(logging_level="ERROR", configure_logging=False)
        try:
            print(f"preset {preset}, {shards} expert shards per pool, 1 attention actor per replica, "
                  f"{concurrency} streams per replica for {duration:.0f} s, {max_tokens} new tokens each")
            for layout in ("private", "shared"):
                for n in replicas:
                    first = Pipeline.start(cfg)
                    pipes = [first] + [Pipeline.start(cfg, pool=first.pool if layout == "shared" else None)
                                       for _ in range(n - 1)]
                    try:
                        run = {"layout": layout, "replicas": n, "expert_bytes": _expert_bytes(pipes),
                               "memory": _memory()}
                        if n in (1, max(replicas)):
                            rows0, gemms0 = _shard_counters(pipes)
                            load = asyncio.run(run_load(pipeline_stream(*pipes), prompts, params,
                                                        concurrency=concurrency * n, duration_s=duration))
                            rows, gemms = (a - b for a, b in zip(_shard_counters(pipes), (rows0, gemms0), strict=True))
                            run["load"] = load.summary()
                            run["rows_per_expert_call"] = rows / gemms if gemms else None
                            run["table_row"] = table_row(f"{layout}, {n} replica(s)", load)
                        report["runs"].append(run)
                    finally:
                        for p in reversed(pipes):
                            p.shutdown()
        finally:
            ray.shutdown()
    _print(report)
    write_report(out, report)
    return report


def _print(report: dict) -> None:
    mb = 1 << 20
    print("\n| layout | replicas | expert weight MB (cluster) | expert shard actors | RSS MB, all moeray processes "
          "| of which expert shards |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in report["runs"]:
        m = r["memory"]
        print(f"| {r['layout']} | {r['replicas']} | {r['expert_bytes'] / mb:.1f} | {m['ExpertShard']['actors']} | "
              f"{sum(v['rss'] for v in m.values()) / mb:.0f} | {m['ExpertShard']['rss'] / mb:.0f} |")
    print("\nthe same load spread over the replicas:")
    print(HEADER)
    for r in report["runs"]:
        if "load" in r:
            print(r["table_row"])
    print("\n| layout | replicas | mean rows per expert matrix multiply |")
    print("| --- | --- | --- |")
    for r in report["runs"]:
        if "load" in r:
            rows = r["rows_per_expert_call"]
            print(f"| {r['layout']} | {r['replicas']} | {'n/a' if rows is None else f'{rows:.1f}'} |")
