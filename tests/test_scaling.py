"""Expert autoscaling on a real multi-node Ray cluster (head + one attention node + two expert nodes):
a skewed load gives the hot expert a replica, a killed replica is replaced without failing a request,
and taking the load away drains and stops it. Every output is compared with the single-process engine."""

import asyncio
import time

import pytest
import ray
from conftest import four_nodes

from actors.cli.loadgen import pipeline_stream, run_load, skewed_prompts
from actors.pipeline import Pipeline
from actors.scaler import Policy
from cluster.config import MoerayConfig, ScalingConfig
from cluster.placement import PipelineConfig
from kernels.engine import Engine, EngineConfig
from kernels.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


# -- the policy alone: rates and a clock in, targets out ---------------------------------------------
def policy(**kw) -> Policy:
    cfg = ScalingConfig(enabled=True, **{"min_replicas": 1, "max_replicas": 3, "max_extra_replicas": 3,
                                         "target_tokens_per_s": 10, "upscale_delay_s": 5, "downscale_delay_s": 20,
                                         "cooldown_s": 10, **kw})
    return Policy(cfg, {(0, 0): 1, (0, 1): 1, (1, 0): 1})


def test_policy_waits_for_sustained_demand_then_respects_bounds_and_cooldown():
    p = policy()
    hot = {(0, 0): 25.0}  # ceil(25 / 10) = 3 replicas
    assert p.decide(hot, 0) == [] and p.decide(hot, 4.9) == []  # not sustained for upscale_delay_s yet
    assert p.decide(hot, 5) == [((0, 0), 1, 3)]
    assert p.decide({(0, 0): 1000.0}, 100) == []  # max_replicas 3
    assert p.decide({}, 101) == [] and p.decide({}, 120.9) == []  # downscale waits downscale_delay_s
    assert p.decide({}, 121) == [((0, 0), 3, 1)]
    assert p.decide(hot, 122) == [] and p.decide(hot, 130.9) == []  # sustained, but cooling down until 131
    assert p.decide(hot, 131) == [((0, 0), 1, 3)]


def test_policy_flapping_demand_changes_nothing():
    p = policy()
    for t in range(0, 30, 2):
        assert p.decide({(0, 0): 25.0} if t % 4 else {}, t) == []  # never sustained for 5 s


def test_policy_pool_budget_goes_to_the_hottest_pairs():
    p = policy(max_extra_replicas=2, upscale_delay_s=0)
    changes = p.decide({(0, 0): 15.0, (0, 1): 30.0, (1, 0): 30.0}, 0)  # each wants 2 or 3; 2 extra in all
    assert sum(new - 1 for _, _, new in changes) == 2 and p.target[(0, 0)] == 1


def test_config_rejects_bad_bounds():
    with pytest.raises(ValueError, match="min_replicas"):
        ScalingConfig(min_replicas=3, max_replicas=2)


# -- an attention actor's expert placement table, without Ray: swaps between steps, retries elsewhere ------
@pytest.fixture
def calls():
    from actors.common import Peers
    from actors.expert_calls import ExpertCalls
    from cluster.dataplane.transport import TransportConfig, serve

    transport_config = TransportConfig(timeout_s=5)
    doubling = serve(transport_config, experts=lambda layer, blocks, rows: rows * 2)  # stands in for every expert shard
    base = {(l, e): [doubling.address] for l in range(2) for e in range(8)}
    yield ExpertCalls(Peers(transport_config), base), doubling.address
    doubling.stop()


def test_a_new_table_takes_effect_only_between_steps(calls):
    ex, base = calls
    with ex.busy:  # a step is running
        assert ex.update_placement(1, {"0:3": ["127.0.0.1:9"]}) == 0  # an extra replica: the base shard serves too
        assert ex.placement_version == 0 and len(ex.table[0, 3]) == 1
    ex.try_swap()
    assert ex.placement_version == 1 and [c.address for c in ex.table[0, 3]] == [base, "127.0.0.1:9"]
    assert [c.address for c in ex.table[1, 3]] == [base]  # pairs the table omits keep their base shards
    assert ex.update_placement(0, {}) == 1  # an older version never replaces a newer one


def test_a_failed_expert_call_is_retried_on_another_holder(calls):
    import torch

    from cluster.ports import free_port

    ex, base = calls
    dead = f"127.0.0.1:{free_port()}"  # a port nobody listens on: a replica that is gone
    ex.update_placement(1, {"0:0": [dead], "0:1": [dead]})
    ex.begin_step()
    rows = torch.randn(10, 64)
    out = ex.stage(0)(rows, [(0, 0, 6), (1, 6, 4)])  # half of each expert's rows go to `dead`
    assert torch.equal(out, rows * 2) and ex.retries == 1
    assert (ex.calls, ex.round_trips) == (3, 2)  # base + dead, then the dead one's rows again on the base
    assert all(c.address != dead for c in ex.table[0, 0] + ex.table[0, 1])  # not called again until the next table
    assert dict(ex.rows) == {(0, 0): 6, (0, 1): 4}


def test_metrics_export_the_windowed_rate():
    from prometheus_client import generate_latest

    from cluster.api.service import Metrics

    m = Metrics()
    m.update({"expert_tokens_per_s": {"0:3": 12.5}, "tokens_per_expert": {"0:3": 40}})
    text = generate_latest(m.registry).decode()
    assert 'moeray:expert_tokens_per_second{expert="3",layer="0"} 12.5' in text
    m.update({"expert_tokens_per_s": {}})
    assert "expert_tokens_per_second{" not in generate_latest(m.registry).decode()


def test_load_generator_drives_an_http_server(tiny_model):
    """`moeray bench load --url`: streaming completions over HTTP, timed per token."""
    from servers import serve_http as serve  # the HTTP API's own test server: uvicorn on a free port

    service, loop, server = serve(tiny_model)
    try:
        r = asyncio.run(run_load(server.url, [[5, 9, 12], [7, 7]], SamplingParams(max_tokens=5, temperature=0,
                                 ignore_eos=True), concurrency=2, requests=4, model="tiny"))
        assert (r.requests, r.failed, len(r.ttft)) == (4, 0, 4), r.errors
        assert r.tokens >= 4 and len(r.itl) == r.tokens - 4  # one text chunk per token at most
    finally:
        server.stop()
        loop.stop()


# -- on a cluster ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    with four_nodes() as c:
        yield c


def config(model) -> MoerayConfig:
    pc = PipelineConfig()
    pc.attention.resources = {"attention_node": 0.01}
    pc.experts.shards, pc.experts.resources = 2, {"expert_node": 0.01}
    scaling = ScalingConfig(enabled=True, min_replicas=1, max_replicas=2, max_extra_replicas=1,
                            target_tokens_per_s=5, upscale_delay_s=1, downscale_delay_s=2, cooldown_s=1,
                            window_s=2, interval_s=0.25, ready_timeout_s=60)
    return MoerayConfig(model=str(model), engine=EngineConfig(kv_cache_tokens=4096), pipeline=pc, scaling=scaling)


@pytest.fixture(scope="module")
def skew(hf_mixtral):
    prompts, pair, share = skewed_prompts(str(hf_mixtral), n=6, length=8, max_tokens=GREEDY.max_tokens, candidates=48)
    reference = [c.token_ids for c in Engine.from_dir(hf_mixtral).generate(prompts, GREEDY)]
    return prompts, f"{pair[0]}:{pair[1]}", share, reference


async def until(pool, check, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while not check(s := (await pool.status.remote())["scaler"]):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {s}"
        await asyncio.sleep(0.2)
    return s


def test_skewed_load_scales_the_hot_expert_out_survives_a_kill_and_scales_back_in(cluster, hf_mixtral, skew):
    """Two pipeline replicas share one pool, the load spread over both: the pool's scaler (on their summed
    rates) adds a replica of the hot expert, replaces it when killed, and retires it once both routers
    acknowledged the table without it."""
    prompts, hot, share, reference = skew
    assert share > 2 / 8  # the load really is skewed: uniform routing gives this pair 1/8 of its layer's rows
    pipe = Pipeline.start(config(hf_mixtral))
    other = Pipeline.start(config(hf_mixtral), pool=pipe.pool)
    try:
        scaler, stop = pipe.pool, False  # the scaler runs in the expert pool's process

        async def control():
            nonlocal stop
            try:
                s = await until(scaler, lambda s: s["replicas"][hot] == 2, 45, f"a replica of {hot}")
                assert sum(s["replicas"].values()) == 16 + 1  # the one extra (the budget) went to the hot pair
                [victim] = await scaler.scaler_replicas.remote(hot)
                old = next(r["address"] for r in s["extra"] if r["state"] == "ready")
                ray.kill(victim)  # under load: calls in flight to it fail and are retried elsewhere
                s = await until(scaler, lambda s: any(r["state"] == "ready" and r["address"] != old
                                                      for r in s["extra"]), 45, "a replacement")
                assert [e["what"] for e in s["events"] if e["what"] == "lost"] == ["lost"]
                await asyncio.sleep(0.5)  # some steps on the replacement
            finally:
                stop = True

        async def scenario():
            return (await asyncio.gather(run_load(pipeline_stream(pipe, other), prompts, GREEDY, concurrency=6,
                                                  stop=lambda: stop), control()))[0]

        report = asyncio.run(scenario())
        assert report.failed == 0, report.errors
        assert report.requests > len(prompts)
        assert all(tokens == reference[i] for i, tokens in report.outputs)  # scaling never changes an output
        stats = [pipe.stats(), other.stats()]
        assert sum(s["expert_retries"] for s in stats) >= 1  # the kill did cost in-flight calls, re-sent
        assert all(s["placement_version"] >= 2 for s in stats)  # scale-out, then the replacement's table
        assert all(sum(s["tokens_per_expert"].values()) > 0 for s in stats)  # both routers carried load

        s = asyncio.run(until(scaler, lambda s: s["replicas"][hot] == 1 and not s["extra"], 30, "scale-in"))
        whats = [e["what"] for e in s["events"]]
        assert whats.index("drain") < whats.index("stopped") and s["unplaceable"] == 0
        # drained means every router acknowledged a table without it before it stopped
        for p in (pipe, other):
            assert p.stats()["placement_version"] == s["version"] and p.stats()["expert_replicas"][hot] == 1
            assert [c.token_ids for c in p.generate(prompts, GREEDY)] == reference
    finally:
        other.shutdown()
        pipe.shutdown()

