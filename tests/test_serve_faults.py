"""`moeray serve` on a multi-node cluster with expert scaling on: the scaler follows HTTP load inside the
ExpertPool replica, and the replicas Serve runs (router, ingress) can die mid-generation. Every request
in flight ends quickly (completed, or an error the client can retry), nothing hangs, and Serve's
restarted replica serves the next requests."""

import asyncio
import os
import signal
import time

import httpx
import pytest
from conftest import serve_config, serving
from ray import serve
from servers import live_shards

from actors.cli.faults import in_flight, serve_pid, serves_again
from actors.cli.loadgen import http_stream, run_load
from cluster.config import ScalingConfig
from cluster.placement import PipelineConfig
from kernels.engine import Engine
from kernels.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def server(tiny_model):
    scaling = ScalingConfig(enabled=True, min_replicas=1, max_replicas=2, max_extra_replicas=1, target_tokens_per_s=5,
                            upscale_delay_s=1, downscale_delay_s=2, cooldown_s=1, window_s=2, interval_s=0.25,
                            ready_timeout_s=60)
    with serving(serve_config(tiny_model, PipelineConfig(restart_timeout_s=60), scaling=scaling)) as url:
        yield url


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.from_dir(tiny_model)


def router(method: str):
    return getattr(serve.get_deployment_handle("Router", "moeray"), method).remote().result()


def scaler_status() -> dict:
    """The expert scaler's view, from the ExpertPool deployment that runs it."""
    return serve.get_deployment_handle("ExpertPool", "moeray").status.remote().result()["scaler"]


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)
    return value


def prompts(engine) -> list[list[int]]:
    return [engine.tokenizer.encode(f"Question {i}: which expert answers?") for i in range(6)]


def test_expert_scaling_follows_http_load_inside_serve(server, engine):
    """Heavy load scales the hot expert out; a trickle that keeps flowing lets it drain and stop (scale-in
    under traffic): no request fails and every output equals the single-process engine's."""
    ps = prompts(engine)
    want = [c.text for c in engine.generate(ps, GREEDY)]
    done = False

    def scaled_out() -> bool:
        return 2 in router("stats")["expert_replicas"].values()

    def drained() -> bool:
        s = scaler_status()
        return not s["extra"] and "stopped" in [e["what"] for e in s["events"]]

    http = http_stream(server, "tiny")

    async def trickle(prompt, params):  # one request at a time, 2 s apart: under the scale-in threshold
        await asyncio.sleep(2)
        async for chunk in http(prompt, params):
            yield chunk
    trickle.client = http.client  # run_load closes it

    async def phase(target, concurrency, until, what):
        nonlocal done
        done = False

        async def watch():
            nonlocal done
            try:
                await asyncio.to_thread(wait_for, until, 60, what)
            finally:
                done = True
        return (await asyncio.gather(run_load(target, ps, GREEDY, concurrency=concurrency, stop=lambda: done,
                                              model="tiny"), watch()))[0]

    heavy = asyncio.run(phase(server, 6, scaled_out, "an extra expert replica"))
    # the replica that became ready was decided, then started (with one extra replica allowed, a hotter pair may
    # take it first from a pair whose replica was starting: "cancel")
    events = scaler_status()["events"]
    ready = next(e["pair"] for e in events if e["what"] == "ready")
    whats = [e["what"] for e in events if e["pair"] == ready]
    assert whats.index("scale") < whats.index("start") < whats.index("ready"), events
    light = asyncio.run(phase(trickle, 1, drained, "scale-in while a trickle of requests keeps flowing"))
    for report in (heavy, light):
        assert report.failed == 0 and report.lost == 0, report.errors
        assert all("".join(chunks) == want[i] for i, chunks in report.outputs)  # scaling changes no output
    assert light.requests >= 2  # requests ran while the replica drained
    whats = [e["what"] for e in scaler_status()["events"]]
    assert whats.index("drain") < whats.index("stopped")
    assert set(router("stats")["expert_replicas"].values()) == {1}
    metrics = [line for line in httpx.get(server + "/metrics", timeout=30).text.splitlines()
               if line.startswith("moeray:expert_replicas{")]
    assert len(metrics) == 2 * 8 and all(line.endswith(" 1.0") for line in metrics)  # every pair, base shard only


def base_shards() -> set[str]:
    """The pool's base shards (named: the scaler's extra replicas are not, and come and go with the load)."""
    return {actor for actor, name in live_shards().items() if name}


def test_killed_router_replica(server):
    """Streams in flight end with an error event (their tokens so far were sent), non-streaming requests
    with 503 (retryable), within seconds; requests not yet started on it are sent again; Serve restarts
    the replica (and with it the replica's attention actors), which joins the expert pool again and serves;
    the pool's shards are never restarted."""
    pool = base_shards()
    pid = router("info")["pid"]
    outcomes = in_flight(server, 3, 2, lambda: os.kill(pid, signal.SIGKILL), model="tiny")
    for o in outcomes:
        assert o.seconds < 15, o
        assert o.kind in ("stream-error", "done") or (o.kind, o.status) == ("status", 503), o
        assert o.kind == "done" or "retry" in o.detail, o
    assert serves_again(server, "tiny") < 120
    assert router("info")["pid"] != pid
    assert base_shards() == pool  # the base shards never restarted


def test_killed_pool_replica(server):
    """The ExpertPool replica dies mid-generation: its shards are detached, so every request in flight completes
    (the data path never passes the pool); Serve restarts the replica, which adopts the same shards (none
    restarted) and publishes tables that supersede its predecessor's, which the router takes."""
    pool = serve.get_deployment_handle("ExpertPool", "moeray")
    before, old_version = base_shards(), router("stats")["placement_version"]
    assert len(before) == 2
    pid = serve_pid("ServeReplica:moeray:ExpertPool")
    outcomes = in_flight(server, 3, 2, lambda: os.kill(pid, signal.SIGKILL), model="tiny", max_tokens=200)
    assert [o.kind for o in outcomes] == ["done"] * 5, outcomes
    status = wait_for(lambda: (s := pool.status.remote().result())["routers"] and s, 120, "the routers to report")
    assert serve_pid("ServeReplica:moeray:ExpertPool") != pid
    assert base_shards() == before  # adopted, not restarted
    assert status["version"] > old_version
    wait_for(lambda: router("stats")["placement_version"] >= status["version"], 60, "the router to take the table")
    assert serves_again(server, "tiny") < 60


def test_killed_ingress_replica(server):
    """Serve's proxy sees the replica die: streams on it are cut, non-streaming requests get Serve's 500
    (not ours to shape); nothing hangs, and the restarted ingress serves again. The router keeps going."""
    pid = serve_pid("ServeReplica:moeray:Ingress")
    outcomes = in_flight(server, 2, 2, lambda: os.kill(pid, signal.SIGKILL), model="tiny")
    for o in outcomes:
        assert o.seconds < 15, o
        assert o.kind in ("cut", "done") or (o.kind, o.status) in (("status", 500), ("status", 503)), o
    assert serves_again(server, "tiny") < 120
    wait_for(lambda: router("stats")["running"] == 0, 120, "the orphaned generations to end")
