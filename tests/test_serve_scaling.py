"""`moeray serve`'s Router deployment autoscaling on a multi-node cluster: pipeline replicas follow HTTP load
out and back in through Serve while the expert pool stays; a router scaled in finishes its requests first."""

import asyncio
import time

import pytest
from conftest import serve_config, serving
from ray import serve
from servers import live_shards

from actors.cli.loadgen import run_load
from cluster.config import RoutersConfig
from kernels.engine import Engine
from kernels.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def server(tiny_model):
    cfg = serve_config(tiny_model)
    cfg.serve.routers = RoutersConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=1,
                                      downscale_delay_s=3, look_back_period_s=2, drain_timeout_s=60)
    with serving(cfg) as url:
        yield url


def routers() -> int:
    """Router replicas serving now."""
    states = serve.status().applications["moeray"].deployments["Router"].replica_states
    return states.get("RUNNING", 0)


def test_routers_scale_out_and_in_with_load_while_the_pool_stays(server, tiny_model):
    engine = Engine.from_dir(tiny_model)
    ps = [engine.tokenizer.encode(f"Question {i}: who serves the experts?") for i in range(8)]
    want = [c.text for c in engine.generate(ps, GREEDY)]
    pool = set(live_shards())
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
    assert set(live_shards()) == pool  # the pool's shards served both routers and never restarted
