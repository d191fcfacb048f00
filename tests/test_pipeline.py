"""The disaggregated pipeline on a real multi-node Ray cluster (ray.cluster_utils.Cluster): attention on
one node, experts on two others, the data plane between them (kind tcp, the default; gloo in one test).
Every result is compared with the single-process engine, token for token."""

import asyncio
import copy
import json
import time

import pytest
import ray
import torch
from conftest import four_nodes
from servers import prompts

from actors.pipeline import Pipeline
from cluster.config import MoerayConfig
from cluster.dataplane import transport
from cluster.placement import PipelineConfig
from kernels.engine import Engine, EngineConfig
from kernels.sampling import SamplingParams
from kernels.structured import Grammar

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster():
    with four_nodes() as c:
        yield {"attention": c.attention.node_id, "expert": {n.node_id for n in c.experts}}


def config(model, shards=1, replicas=1, attention_actors=1, micro_batches=1, **engine) -> MoerayConfig:
    pc = PipelineConfig(micro_batches=micro_batches)
    pc.attention.actors, pc.attention.resources = attention_actors, {"attention_node": 0.01}
    pc.experts.shards, pc.experts.replicas, pc.experts.resources = shards, replicas, {"expert_node": 0.01}
    return MoerayConfig(model=str(model), engine=EngineConfig(**{"kv_cache_tokens": 4096, **engine}), pipeline=pc)


@pytest.fixture(scope="module")
def reference(hf_mixtral, hf_mistral):
    """Greedy tokens of the single-process engine, the oracle."""
    return {arch: [c.token_ids for c in Engine.from_dir(path).generate(prompts(), GREEDY)]
            for arch, path in (("mixtral", hf_mixtral), ("mistral", hf_mistral))}


@pytest.mark.parametrize("shards, micro_batches", [(1, 1), (2, 1), (8, 1), (1, 2), (4, 2)])
def test_mixtral_expert_layouts_match_single_process(cluster, hf_mixtral, reference, shards, micro_batches):
    pipe = Pipeline.start(config(hf_mixtral, shards=shards, micro_batches=micro_batches))
    try:
        assert [c.token_ids for c in pipe.generate(prompts(), GREEDY)] == reference["mixtral"]
        info = pipe.info()
        assert info["attention"][0]["node_id"] == cluster["attention"]
        expert_nodes = {e["node_id"] for e in info["experts"]}
        assert expert_nodes <= cluster["expert"] and len(expert_nodes) == min(shards, 2)  # spread over both
        # each shard holds exactly its experts: 2 layers x 8 experts / shards, 3 matrices of 64 x 128 fp32
        for e in info["experts"]:
            assert len(e["pairs"]) == 16 // shards
            assert e["param_bytes"] == len(e["pairs"]) * 3 * 64 * 128 * 4
        held = sorted(p for e in info["experts"] for p in map(tuple, e["pairs"]))
        assert held == [(l, x) for l in range(2) for x in range(8)]
        stats = pipe.stats()
        counts = stats["tokens_per_expert"]
        assert sum(counts.values()) > 0 and set(counts) <= {f"{l}:{x}" for l in range(2) for x in range(8)}
        # a step waits on one round trip per attention actor (the router's call) and one per layer and
        # micro-batch (the actor's expert fan-out, to the shards that hold rows of the last step's tokens)
        last = stats["data_plane"]["last_step"]
        mb = last["micro_batches"]  # 1 when the last step had one sequence left (requests arrive one by one)
        assert 1 <= mb <= micro_batches
        assert last["round_trips"] == 1 + 2 * mb and 1 + 2 * mb <= last["calls"] <= 1 + 2 * mb * shards
    finally:
        pipe.shutdown()


@pytest.mark.parametrize("dtype,expert_quant,weight_quant", [("bfloat16", "int8", "int8"), ("bfloat16", "int8", "none"),
                                                              ("float32", "w8a8", "w8a8")])
def test_quantized_pipeline_matches_single_process(cluster, hf_mixtral, dtype, expert_quant, weight_quant):
    """bf16 with int8 experts (and attention and LM head in int8, or in bf16 prepacked for oneDNN), or fp32 with
    W8A8 everywhere (moeray's C kernels, activations quantized per row): the shards, attention actor and router
    build them as the single-process engine does (kernels.build) and run the same CPU kernels, so the tokens are
    the same, however the pipeline's steps batched the requests
    (test_engine.py::test_bf16_tokens_do_not_depend_on_batching)."""
    engine = dict(dtype=dtype, expert_quant=expert_quant, weight_quant=weight_quant)
    want = [c.token_ids for c in Engine.from_dir(hf_mixtral, EngineConfig(kv_cache_tokens=4096, **engine))
            .generate(prompts(), GREEDY)]
    pipe = Pipeline.start(config(hf_mixtral, shards=2, **engine))
    try:
        assert [c.token_ids for c in pipe.generate(prompts(), GREEDY)] == want
    finally:
        pipe.shutdown()


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_mistral_dense_sliding_window_split_layers(cluster, hf_mistral, reference, micro_batches):
    """Dense FFN as one expert per layer, layers split over 2 attention actors and 2 shards; window 8."""
    pipe = Pipeline.start(config(hf_mistral, shards=2, attention_actors=2, micro_batches=micro_batches))
    try:
        assert [c.token_ids for c in pipe.generate(prompts(), GREEDY)] == reference["mistral"]
        assert [a["layers"] for a in pipe.info()["attention"]] == [[0], [1]]
        # one call to each attention actor, and from each one call a layer and micro-batch to the shard
        # holding its dense FFN (the layer's sole expert)
        last = pipe.stats()["data_plane"]["last_step"]
        n = 2 + 2 * last["micro_batches"]
        assert 1 <= last["micro_batches"] <= micro_batches and last == {"calls": n, "round_trips": n,
                                                                        "micro_batches": last["micro_batches"]}
    finally:
        pipe.shutdown()


def test_gloo_data_plane_matches_single_process_and_a_restarted_shard_falls_back_to_grpc(cluster, hf_mixtral,
                                                                                       reference):
    """transport.kind gloo: the router (rank 0), the attention actor and two shards form a group and the
    per-layer tensors go over it; a shard Ray restarts is outside the group and is called over gRPC."""
    cfg = config(hf_mixtral, shards=2)
    cfg.pipeline.transport = transport.TransportConfig(kind="gloo")
    pipe = Pipeline.start(cfg)
    try:
        assert [c.token_ids for c in pipe.generate(prompts(), GREEDY)] == reference["mixtral"]
        before = pipe.stats()
        assert before["collective_peers"] == 3 and before["collective_calls"] > 0
        victim = pipe.experts[1]
        pid = ray.get(victim.info.remote())["pid"]
        ray.kill(victim, no_restart=False)
        deadline = time.monotonic() + 60
        while True:  # Ray restarts it (max_restarts=-1)
            assert time.monotonic() < deadline
            try:
                if ray.get(victim.info.remote())["pid"] != pid:
                    break
            except ray.exceptions.RayActorError:  # ActorUnavailableError while it restarts
                pass
            time.sleep(0.2)
        assert [c.token_ids for c in pipe.generate(prompts(), GREEDY)] == reference["mixtral"]
        after = pipe.stats()
        assert after["worker_recoveries"] == 1 and after["collective_peers"] == 2
        assert after["collective_calls"] > before["collective_calls"]  # the others still over the group
    finally:
        pipe.shutdown()


def test_unequal_micro_batches_and_sequences_finishing_at_different_steps(cluster, hf_mixtral):
    """micro_batches 2 over 32 sequences: the first step's halves are 1 sequence (31 prompt tokens) and 31
    (one token each); the sequences then finish at different steps, so the halves change as they go."""
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(3, 512, (31 if i == 0 else 1,), generator=g).tolist() for i in range(32)]
    params = [SamplingParams(max_tokens=2 + i % 9, temperature=0, ignore_eos=True) for i in range(32)]
    want = [c.token_ids for c in Engine.from_dir(hf_mixtral).generate(ps, params)]
    pipe = Pipeline.start(config(hf_mixtral, shards=2, micro_batches=2))
    try:
        assert [c.token_ids for c in pipe.generate(ps, params)] == want
        assert [len(t) for t in want] == [2 + i % 9 for i in range(32)]
        stats = pipe.stats()
        assert stats["step"] < stats["data_plane"]["micro_batches"] <= 2 * stats["step"]  # some steps in 2 halves
    finally:
        pipe.shutdown()


def test_prefix_cache_and_preemption_over_the_attention_actors(cluster, hf_mixtral):
    """A shared 40-token prefix, and a KV cache of 16 blocks for 6 sequences that grow to 7 each: the router's
    scheduler shares computed blocks between sequences and preempts the latest ones, whose cache the attention
    actors recompute; tokens equal the single process with room for all and no prefix cache."""
    shared = torch.randint(3, 512, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    ps = [shared + [5 + i] * (i + 1) for i in range(6)]
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    single = Engine.from_dir(hf_mixtral, EngineConfig(enable_prefix_caching=False))
    want = [c.token_ids for c in single.generate(ps, params)]
    pipe = Pipeline.start(config(hf_mixtral, shards=2, kv_cache_tokens=256))
    try:  # the first alone computes the shared blocks; the others find them
        assert [c.token_ids for c in pipe.generate(ps[:1], params) + pipe.generate(ps[1:], params)] == want
        stats = pipe.stats()
        assert stats["prefix_cache_hits"] >= 5 * 32 and stats["num_preemptions"] > 0
    finally:
        pipe.shutdown()


def test_structured_output_matches_single_process(cluster, tiny_model):
    """The router samples with the engine's own code, so a JSON schema constrains the pipeline's output as it
    does the single process's, token for token, batched with an unconstrained request."""
    schema = {"type": "object", "required": ["id", "ok"], "additionalProperties": False,
              "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}
    grammar = Grammar.json_schema(schema)
    params = [SamplingParams(max_tokens=40, temperature=t, seed=1, grammar=grammar) for t in (0, 1.0)] + [GREEDY]
    ps = prompts()[:3]
    want = Engine.from_dir(tiny_model).generate(ps, params)
    pipe = Pipeline.start(config(tiny_model, shards=2))
    try:
        got = pipe.generate(ps, params)
    finally:
        pipe.shutdown()
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for c in got[:2]:
        assert c.finish_reason == "stop" and set(json.loads(c.text)) == {"id", "ok"}


@pytest.fixture(scope="module")
def replicated(cluster, hf_mixtral):
    pipe = Pipeline.start(config(hf_mixtral, shards=2, replicas=2, micro_batches=2, max_num_batched_tokens=64))
    yield pipe
    pipe.shutdown()


def test_replicas_share_load_and_keep_tokens(replicated, reference):
    assert [c.token_ids for c in replicated.generate(prompts(), GREEDY)] == reference["mixtral"]
    busy = [e["busy_s"] for e in replicated.info()["experts"]]
    assert len(busy) == 4 and all(b > 0 for b in busy)  # every replica did work


def test_requests_join_a_running_batch(replicated, reference):
    ps = prompts()
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    [alone] = replicated.generate([ps[0]], long)

    async def scenario():
        a_tokens, b_tokens, a_done_at, b_first_at = [], [], None, None

        async def run_a():
            nonlocal a_done_at
            async for ev in replicated.stream(ps[0], long):
                a_tokens.append(ev.token)
            a_done_at = time.monotonic()

        async def run_b():
            nonlocal b_first_at
            while len(a_tokens) < 5:
                await asyncio.sleep(0.005)
            async for ev in replicated.stream(ps[1], GREEDY):
                b_first_at = b_first_at or time.monotonic()
                b_tokens.append(ev.token)

        await asyncio.gather(run_a(), run_b())
        return a_tokens, b_tokens, b_first_at < a_done_at

    a_tokens, b_tokens, joined_midway = asyncio.run(scenario())
    assert a_tokens == alone.token_ids and b_tokens == reference["mixtral"][1]
    assert joined_midway


def test_cancelled_stream_frees_its_cache(replicated):
    async def read_three():
        got = []
        async for ev in replicated.stream(prompts()[2], SamplingParams(max_tokens=500, ignore_eos=True)):
            got.append(ev)
            if len(got) == 3:
                break
        return got

    assert len(asyncio.run(read_three())) == 3
    deadline = time.monotonic() + 10
    while (s := replicated.stats())["running"] or s["kv_cache_usage"]:
        assert time.monotonic() < deadline, f"request still holds the cache: {s}"
        time.sleep(0.05)


def test_bad_data_plane_messages_are_refused_and_the_shard_keeps_serving(replicated, reference):
    transport_config = copy.deepcopy(replicated.config.pipeline.transport)
    address = ray.get(replicated.experts[0].address.remote())
    client = transport.connect(transport_config, address)
    bad = [
        ((0, [(0, 2)], torch.zeros(2, 7)), "dim"),  # wrong hidden size
        ((0, [(7, 2)], torch.zeros(2, 64)), "not on this shard"),  # an expert this shard lacks
        ((5, [(0, 2)], torch.zeros(2, 64)), "not on this shard"),  # a layer the model lacks
        ((0, [(0, 3)], torch.zeros(2, 64)), "3"),  # counts that do not add up to the rows
    ]
    for (layer, blocks, rows), message in bad:
        with pytest.raises(transport.TransportError) as err:
            client.experts(layer, blocks, rows).result()
        assert err.value.code == "INVALID_ARGUMENT" and message in str(err.value)
    too_big = torch.zeros((transport_config.max_message_mb << 20) // (64 * 4) + 1, 64)
    with pytest.raises(transport.TransportError) as err:
        client.experts(0, [(0, too_big.shape[0])], too_big).result()
    assert err.value.code == "RESOURCE_EXHAUSTED"
    client.close()
    assert [c.token_ids for c in replicated.generate(prompts(), GREEDY)] == reference["mixtral"]
