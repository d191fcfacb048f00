"""Faults on a real multi-node Ray cluster (head + one attention node + two expert nodes), under a
continuous load of concurrent streams: a worker process killed with SIGKILL mid-generation is
restarted by Ray and found again by the router, and every request in flight still completes with the
single-process engine's tokens. A stuck (SIGSTOPped) shard cannot freeze the router: the requests on it
fail within the deadlines, and once it runs again so do new requests."""

import pytest
from conftest import four_nodes
from servers import prompts

from actors.cli.faults import shard_stuck, worker_killed
from actors.pipeline import Pipeline
from cluster.config import MoerayConfig
from cluster.placement import PipelineConfig
from kernels.engine import Engine, EngineConfig
from kernels.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    with four_nodes() as c:
        yield c


def config(model, **transport) -> MoerayConfig:
    pc = PipelineConfig(restart_timeout_s=60)
    pc.attention.resources = {"attention_node": 0.01}
    pc.experts.shards, pc.experts.resources = 2, {"expert_node": 0.01}
    for k, v in transport.items():
        setattr(pc.transport, k, v)
    return MoerayConfig(model=str(model), engine=EngineConfig(kv_cache_tokens=4096), pipeline=pc)


@pytest.fixture(scope="module")
def reference(hf_mixtral):
    return [c.token_ids for c in Engine.from_dir(hf_mixtral).generate(prompts(), GREEDY)]


@pytest.fixture(scope="module")
def pipe(cluster, hf_mixtral):
    p = Pipeline.start(config(hf_mixtral))
    yield p
    p.shutdown()


def test_killed_expert_shard_is_restarted_and_no_request_fails(pipe, reference):
    run, report, info = worker_killed(pipe, "expert", prompts(), GREEDY)
    assert run.failed == 0 and run.lost == 0, run.errors
    assert run.sent >= 1 and run.completed == run.sent  # every request sent completed (how many: the machine's speed)
    assert all(tokens == reference[i] for i, tokens in report.outputs)
    assert info["new"]["pid"] != info["old"]["pid"] and info["new"]["pairs"] == info["old"]["pairs"]
    assert pipe.stats()["expert_retries"] >= 1  # the rows in flight were re-sent
    assert [c.token_ids for c in pipe.generate(prompts(), GREEDY)] == reference


def test_killed_attention_actor_is_restarted_and_kv_recomputed(pipe, reference):
    before = pipe.stats()
    run, report, info = worker_killed(pipe, "attention", prompts(), GREEDY)
    assert run.failed == 0 and run.lost == 0, run.errors
    assert all(tokens == reference[i] for i, tokens in report.outputs)  # recomputed caches change no token
    stats = pipe.stats()
    assert stats["kv_recomputes"] > before["kv_recomputes"]  # its KV cache died with it
    assert info["new"]["pid"] != info["old"]["pid"]
    assert stats["kv_cache_usage"] == 0.0  # every block came back


def test_stuck_shard_cannot_freeze_the_router(cluster, hf_mixtral, reference):
    """SIGSTOP: the shard's process is alive but answers nothing. Calls to it hit their deadline, the
    router waits restart_timeout_s for it to serve again, then fails the requests on it: they end (an
    error each), nothing hangs. SIGCONT: it serves again and so does the pipeline."""
    cfg = config(hf_mixtral, timeout_s=2.0)
    cfg.pipeline.restart_timeout_s = 3.0
    pipe = Pipeline.start(cfg)
    try:
        run, report = shard_stuck(pipe, prompts(), GREEDY)
        assert run.lost == 0 and run.failed == 5, run  # every request ended, with an error
        # each one the router's own giving up (a call past its deadline, then restart_timeout_s), which is
        # what ends them within seconds; not the load's 120 s request timeout (that would count as lost)
        assert len(report.errors) == 5, report.errors
        assert all("not serving again" in e or "DEADLINE_EXCEEDED" in e for e in report.errors), report.errors
        assert [c.token_ids for c in pipe.generate(prompts(), GREEDY)] == reference
    finally:
        pipe.shutdown()
