"""`moeray serve`'s Router deployment autoscaling on a multi-node cluster: pipeline replicas follow HTTP load
out and back in through Serve while the expert pool stays; a router scaled in finishes its requests first."""

import asyncio
import time

import pytest
from conftest import four_nodes
from ray import serve
from ray.util.state import list_actors

from actors.app import moeray_app, serve_options
from actors.cli.loadgen import run_load
from cluster.config import MoerayConfig, RoutersConfig
from cluster.placement import PipelineConfig
from cluster.ports import free_port
from kernels.engine import Engine, EngineConfig
from kernels.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def server(tiny_model):
    with four_nodes():
        pc = PipelineConfig()
        pc.attention.resources, pc.experts.resources = {"attention_node": 0.01}, {"expert_node": 0.01}
        pc.experts.shards = 2
        cfg = MoerayConfig(model=str(tiny_model), pipeline=pc,
                           engine=EngineConfig(max_num_seqs=16, kv_cache_tokens=16384, max_queued_requests=64))
        cfg.serve.routers = RoutersConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                                          upscale_delay_s=1, downscale_delay_s=3, look_back_period_s=2,
                                          drain_timeout_s=60)
        cfg.serve.model_name, cfg.serve.http_port = "tiny", free_port()
        serve.start(**serve_options(cfg))
        serve.run(moeray_app(cfg), name="moeray", route_prefix="/")
        yield f"http://127.0.0.1:{cfg.serve.http_port}"
        serve.shutdown()


def routers() -> int:
    """Router replicas serving now."""
    states = serve.status().applications["moeray"].deployments["Router"].replica_states
    return states.get("RUNNING", 0)


def shards() -> set[str]:
    return {a.actor_id for a in list_actors(filters=[("class_name", "=", "ExpertShard"), ("state", "=", "ALIVE")])}


def test_routers_scale_out_and_in_with_load_while_the_pool_stays(server, tiny_model):
    engine = Engine.from_dir(tiny_model)
    ps = [engine.tokenizer.encode(f"Question {i}: who serves the experts?") for i in range(8)]
    want = [c.text for c in engine.generate(ps, GREEDY)]
    pool = shards()
    assert len(pool) == 2 and routers() == 1
    seen = {"max": 1}

    async def phase(concurrency: int, until, what: str, timeout: float = 180):
        done = False

        async def watch():
            nonlocal done
            deadline = time.monotonic() + timeout
            try:
                while not until():
                    seen["max"] = max(seen["max"], routers())
                    assert time.monotonic() < deadline, f"timed out waiting for {what}"
                    await asyncio.sleep(0.5)
            finally:
                done = True
        return (await asyncio.gather(run_load(server, ps, GREEDY, concurrency=concurrency, stop=lambda: done,
                                              model="tiny"), watch()))[0]

    heavy = asyncio.run(phase(8, lambda: routers() == 2, "a second router"))
    light = asyncio.run(phase(1, lambda: routers() == 1, "scale-in to one router with requests still flowing"))
    for report in (heavy, light):
        assert report.failed == 0 and report.lost == 0, report.errors
        assert all("".join(chunks) == want[i] for i, chunks in report.outputs)  # every completed request
    assert light.requests >= 1 and seen["max"] == 2
    assert shards() == pool  # the pool's shards served both routers and never restarted
