"""One expert pool shared by several pipeline replicas (actors/pool.py): on a real multi-node Ray cluster
(ray.cluster_utils.Cluster), every replica's tokens against the single-process engine, one copy of the
expert weights in the whole cluster, faults of a shard and of a router; and, in this process, the pool's
view of the routers' load that its expert scaler acts on."""

import time

import pytest
import ray
from conftest import four_nodes
from servers import live_shards, prompts

from actors.pipeline import Pipeline
from actors.pool import ExpertPool
from actors.scaler import Policy
from actors.workers import InProcess
from cluster.config import MoerayConfig, ScalingConfig
from cluster.placement import PipelineConfig
from kernels.engine import Engine, EngineConfig
from kernels.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def config(model, **scaling) -> MoerayConfig:
    pc = PipelineConfig()
    pc.attention.resources = {"attention_node": 0.01}
    pc.experts.shards, pc.experts.resources = 2, {"expert_node": 0.01}
    return MoerayConfig(model=str(model), engine=EngineConfig(kv_cache_tokens=4096), pipeline=pc,
                        scaling=ScalingConfig(**scaling))


# -- the pool's view of its routers, in this process -------------------------------------------------------
def test_the_pool_sums_the_routers_load_and_waits_for_every_ack(hf_mixtral):
    """Two routers each below the scaler's per-replica target for a pair, together above it: the scaler sees
    their sum. A table is acknowledged only when every live router uses it; a router gone silent stops counting."""
    cfg = config(hf_mixtral, interval_s=0.2)
    pool = ExpertPool(cfg, InProcess())
    try:
        assert pool.join("a").version == 0 and pool.join("b").table == {}
        pool.update_placement(1, {"0:3": ["127.0.0.1:9"]})
        assert pool.report("a", {"0:3": 3.0}, 1) == (1, {"0:3": ["127.0.0.1:9"]})
        pool.report("b", {"0:3": 4.0, "1:0": 1.0}, 0)
        stats = pool.stats()
        assert stats == {"expert_tokens_per_s": {"0:3": 7.0, "1:0": 1.0}, "placement_version": 0}  # b still on 0
        policy = Policy(ScalingConfig(target_tokens_per_s=5, max_replicas=4), {(0, 3): 1})
        assert policy.desired({(0, 3): 3.0}) == {(0, 3): 1}  # one router alone: no replica
        assert policy.desired({(0, 3): stats["expert_tokens_per_s"]["0:3"]}) == {(0, 3): 2}  # both: one more
        pool.report("b", {}, 1)
        assert pool.stats()["placement_version"] == 1
        time.sleep(3 * 0.2 + 5.5)  # a's last report is now older than three intervals (+5 s of slack)
        pool.report("b", {"1:0": 2.0}, 1)
        assert pool.stats()["expert_tokens_per_s"] == {"1:0": 2.0}
        pool.leave("b")
        assert pool.stats() == {"expert_tokens_per_s": {}, "placement_version": 1}  # no router: the latest
    finally:
        for shard in pool.experts:
            shard.server.stop()


# -- on a cluster ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    with four_nodes() as c:
        yield c


@pytest.fixture(scope="module")
def reference(hf_mixtral):
    return [c.token_ids for c in Engine.from_dir(hf_mixtral).generate(prompts(), GREEDY)]


def test_three_replicas_share_one_pool(cluster, hf_mixtral, reference):
    """Three pipeline replicas on one pool: each one's greedy tokens equal the single process; the cluster
    holds one copy of the expert weights (2 shards), not three; one replica's router killed, the others and
    the pool go on serving."""
    first = Pipeline.start(config(hf_mixtral))
    others = [Pipeline.start(config(hf_mixtral), pool=first.pool) for _ in range(2)]
    pipes = [first, *others]
    try:
        for pipe in pipes:
            assert [c.token_ids for c in pipe.generate(prompts(), GREEDY)] == reference
        shards = live_shards()
        assert len(shards) == 2 and all(p.experts == first.experts for p in pipes)
        held = ray.get([e.info.remote() for e in first.experts])
        one_copy = 2 * 8 * 3 * 64 * 128 * 4  # 2 layers x 8 experts, 3 matrices of 64 x 128 fp32
        assert sum(h["param_bytes"] for h in held) == one_copy
        # every replica's attention actors called the same shards (each shard counts its calls)
        assert all(p.stats()["data_plane"]["calls"] > 0 for p in pipes)
        # the three decoding at once, tokens unchanged; a shard runs calls of several replicas for a layer as one
        # batch whenever they wait at the same moment (a shard computes a tiny call in microseconds, so that
        # takes some rounds to happen)
        for _ in range(20):
            streams = [pipe._submit(q, GREEDY, None) for pipe in pipes for q in prompts()]
            assert [[ray.get(ref).token for ref in gen] for gen in streams] == reference * 3
            if max(i["callers_per_batch"] for i in ray.get([e.info.remote() for e in first.experts])) > 1:
                break
        else:
            pytest.fail("no shard ever batched calls of several replicas")

        ray.kill(others[0].router)
        assert [c.token_ids for c in others[1].generate(prompts(), GREEDY)] == reference
        assert [c.token_ids for c in first.generate(prompts(), GREEDY)] == reference
        assert len(live_shards()) == 2
    finally:
        for pipe in reversed(pipes):
            try:
                pipe.shutdown()
            except ray.exceptions.RayActorError:  # the router killed above
                for actor in pipe.attention:
                    ray.kill(actor)
    deadline = time.monotonic() + 60
    while live_shards():  # they die with the pool, their owner (Ray's state API catches up in a moment)
        assert time.monotonic() < deadline, "the pool's shards outlived it"
        time.sleep(0.5)


def test_a_killed_pool_shard_recovers_for_every_replica(cluster, hf_mixtral, reference):
    """Two replicas decoding at once when one pool shard dies: Ray restarts it, every attention actor finds
    it again, and both replicas' tokens are unchanged."""
    first = Pipeline.start(config(hf_mixtral))
    second = Pipeline.start(config(hf_mixtral), pool=first.pool)
    try:
        long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
        want = [c.token_ids for c in Engine.from_dir(hf_mixtral).generate(prompts(), long)]
        streams = [pipe._submit(p, long, None) for pipe in (first, second) for p in prompts()]
        firsts = [ray.get(next(gen)).token for gen in streams]  # every request is decoding
        ray.kill(first.experts[1], no_restart=False)
        got = [[token] + [ray.get(ref).token for ref in gen] for token, gen in zip(firsts, streams, strict=True)]
        assert got == want + want
        assert first.stats()["worker_recoveries"] >= 1 and second.stats()["worker_recoveries"] >= 1  # both found it
    finally:
        second.shutdown()
        first.shutdown()
