"""KV blocks on demand with preemption, and prefix caching, in the single-process engine: outputs identical to
the old policies (worst case reserved, nothing cached), more sequences admitted at once, and the counters
showing what happened. (The pipeline runs the same scheduler in its router: tests/test_pipeline.py.)"""

import pytest
import torch

from kernels.engine import Engine, EngineConfig, Request
from kernels.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def tokens(engine: Engine, prompts, params=GREEDY) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(prompts, params)]


def test_shared_system_prompt_and_multi_turn_reuse_the_cache(hf_mixtral):
    """Four requests behind one 40-token system prompt, then a conversation of three turns (each prompt = the
    last prompt + its answer + a new user turn): with prefix caching the same tokens as without, and the
    prefix's full blocks (16 tokens) are taken from the cache rather than computed."""
    system = ids(40, 0)
    batch = [system + ids(5 + i, i + 1) for i in range(4)]
    on, off = Engine.from_dir(hf_mixtral), Engine.from_dir(hf_mixtral, EngineConfig(enable_prefix_caching=False))
    assert tokens(on, batch[:1]) + tokens(on, batch[1:]) == tokens(off, batch)
    s = on.scheduler
    assert s.cache_hits == 3 * 32 and s.cache_queries == sum(map(len, batch))  # 2 full blocks of the system prompt
    assert off.scheduler.cache_hits == 0

    prompt, last = system, 0
    for turn in range(3):
        prompt = prompt + ids(7, 10 + turn)
        before = s.cache_hits
        [answer] = tokens(on, [prompt])
        assert [answer] == tokens(off, [prompt])
        # the full blocks of the turn before were computed and named, except its answer's last token (sampled,
        # never computed); the first turn finds the system prompt's
        full = min((last + len(answer) - 1) // 16, (len(prompt) - 1) // 16) if last else 2
        assert s.cache_hits - before == full * 16, turn
        last, prompt = len(prompt), prompt + answer


def test_eviction_under_memory_pressure_changes_no_token(hf_mixtral):
    """A cache of 6 blocks: named blocks are reused for new sequences (least recently released first) while
    requests come and go; the outputs equal those of an engine with no prefix cache."""
    cfg = dict(kv_cache_tokens=96, max_num_seqs=2, max_num_batched_tokens=64)
    on = Engine.from_dir(hf_mixtral, EngineConfig(**cfg))
    off = Engine.from_dir(hf_mixtral, EngineConfig(**cfg, enable_prefix_caching=False))
    shared = ids(33, 0)
    workload = [shared + ids(3, 1), ids(40, 2), shared + ids(4, 3), ids(50, 4), shared + ids(2, 5)]
    for prompt in workload:  # one at a time: each finished sequence leaves its blocks cached
        assert tokens(on, [prompt]) == tokens(off, [prompt])
    assert on.scheduler.cache_hits > 0 and on.scheduler.pool.num_free == on.config.num_blocks


@pytest.mark.parametrize("arch", ["mixtral", "mistral"])
def test_on_demand_admits_more_and_preemption_changes_no_token(arch, hf_mixtral, hf_mistral):
    """Eight requests of max_tokens 100 on a 16-block cache: reserving the worst case (7 blocks each) admits 2 at
    once, on demand admits all 8; as they grow the most recent ones are preempted and recomputed later. Every
    sequence's tokens equal those of an engine with room for all. (Mistral's window of 8 caps a sequence at one
    block: there on demand admits all and never preempts.)"""
    model = {"mixtral": hf_mixtral, "mistral": hf_mistral}[arch]
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    prompts = [ids(10, i) for i in range(8)]
    roomy = tokens(Engine.from_dir(model), prompts, params)
    small = dict(kv_cache_tokens=256, max_num_seqs=8)
    running = {}
    for policy in ("reserve", "on_demand"):
        engine = Engine.from_dir(model, EngineConfig(**small, kv_allocation=policy))
        for i, p in enumerate(prompts):
            engine.add_request(Request(f"r{i}", p, params))
        engine.step()
        running[policy] = engine.num_running
        for i in range(len(prompts)):
            engine.abort(f"r{i}")
        assert tokens(engine, prompts, params) == roomy
        if policy == "on_demand" and arch == "mixtral":
            assert engine.scheduler.preemptions > 0
    assert running == ({"reserve": 2, "on_demand": 8} if arch == "mixtral" else {"reserve": 8, "on_demand": 8})


def test_sliding_window_models_cache_no_prefix(hf_mistral):
    """A rolling buffer overwrites its blocks, so prefix caching stays off for a sliding-window model."""
    engine = Engine.from_dir(hf_mistral)
    prompt = ids(40, 0)
    assert tokens(engine, [prompt]) == tokens(engine, [prompt])
    assert engine.scheduler.cache_hits == 0 and not engine.scheduler.caching


def test_sampled_tokens_survive_preemption(hf_mixtral):
    """A seeded sampled request preempted mid-generation draws the same tokens (its generator is not replayed:
    recomputing samples nothing)."""
    params = [SamplingParams(max_tokens=100, temperature=0.9, seed=s, ignore_eos=True) for s in range(4)]
    prompts = [ids(12, i) for i in range(4)]
    want = tokens(Engine.from_dir(hf_mixtral), prompts, params)
    engine = Engine.from_dir(hf_mixtral, EngineConfig(kv_cache_tokens=192, max_num_seqs=4))
    assert tokens(engine, prompts, params) == want and engine.scheduler.preemptions > 0
