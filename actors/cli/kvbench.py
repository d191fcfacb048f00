"""`moeray bench kv`: the engine's KV-cache policies, each against its baseline in the same run, same checkpoint
and cache size (single-process engine, greedy).

- chat: conversations of several turns behind one long shared system prompt, each turn's prompt the whole
  conversation so far; prefix caching on vs off: TTFT p50/p99 and prompt tokens computed.
- early stop: requests that ask for many tokens and stop after a few (the client is done: here an abort, what a
  disconnect or a stop condition does); KV on demand vs reserved for the worst case: peak running sequences and
  generated tokens per second.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from actors.cli.bench import PRESETS, write_report


def _ids(n: int, seed: int, vocab: int) -> list[int]:
    import torch

    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _warm(engine) -> dict[str, int]:
    """One short request first (first-call costs are not what is measured); the counters after it."""
    from kernels.sampling import SamplingParams

    engine.generate([[3, 4, 5]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    return engine.counters


def _chat(model: str, caching: bool, conversations: int, turns: int, system_len: int, user_len: int,
          answer_len: int) -> dict:
    from kernels.engine import Engine, EngineConfig, Request
    from kernels.sampling import SamplingParams

    engine = Engine.from_dir(model, EngineConfig(enable_prefix_caching=caching, max_num_seqs=conversations))
    vocab = engine.args.vocab_size
    params = SamplingParams(max_tokens=answer_len, temperature=0, ignore_eos=True)
    system = _ids(system_len, 0, vocab)
    warm = _warm(engine)
    history = [list(system) for _ in range(conversations)]
    ttft, n = [], 0
    t0 = time.perf_counter()
    for turn in range(turns):  # every conversation's turn at once; the next turn after all answered
        start, answers = {}, {}
        for c in range(conversations):
            history[c] += _ids(user_len, 1 + turn * conversations + c, vocab)
            rid = f"c{c}t{turn}"
            engine.add_request(Request(rid, list(history[c]), params))
            start[rid], answers[rid] = time.perf_counter(), []
            n += 1
        while engine.has_unfinished():
            for ev in engine.step():
                if not answers[ev.request_id]:
                    ttft.append(time.perf_counter() - start[ev.request_id])
                answers[ev.request_id].append(ev.token)
        for c in range(conversations):
            history[c] += answers[f"c{c}t{turn}"]
    counters = {k: v - warm[k] for k, v in engine.counters.items()}
    q = statistics.quantiles(ttft, n=100)
    return {"requests": n, "seconds": time.perf_counter() - t0, "ttft_p50_s": statistics.median(ttft),
            "ttft_p99_s": q[98], "prompt_tokens": counters["prefix_cache_queries"],
            "prompt_tokens_computed": counters["prefix_cache_queries"] - counters["prefix_cache_hits"],
            "history": history}


def _early_stop(model: str, policy: str, requests: int, prompt_len: int, max_tokens: int, stop_after: int,
                kv_tokens: int) -> dict:
    from kernels.engine import Engine, EngineConfig, Request
    from kernels.sampling import SamplingParams

    engine = Engine.from_dir(model, EngineConfig(kv_allocation=policy, kv_cache_tokens=kv_tokens,
                                                 max_num_seqs=requests, enable_prefix_caching=False))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    got: dict[str, list[int]] = {}
    warm = _warm(engine)
    for i in range(requests):
        engine.add_request(Request(f"r{i}", _ids(prompt_len, 100 + i, engine.args.vocab_size), params))
        got[f"r{i}"] = []
    peak, t0 = 0, time.perf_counter()
    while engine.has_unfinished():
        events = engine.step()
        peak = max(peak, engine.num_running)
        for ev in events:
            if len(tokens := got[ev.request_id]) == stop_after:
                continue  # a burst's tokens past the client's abort (engine.decode_steps)
            tokens.append(ev.token)
            if len(tokens) == stop_after and not ev.finish_reason:
                engine.abort(ev.request_id)  # the client has what it wanted
    seconds = time.perf_counter() - t0
    return {"peak_running": peak, "seconds": seconds, "tok_s": requests * stop_after / seconds,
            "preemptions": engine.counters["num_preemptions"] - warm["num_preemptions"],
            "tokens": [got[f"r{i}"] for i in range(requests)]}


def bench_kv(preset: str, conversations: int, turns: int, system_len: int, requests: int, max_tokens: int,
             stop_after: int, kv_tokens: int, out: str | None) -> dict:
    from kernels.tiny import make_tiny

    with tempfile.TemporaryDirectory() as tmp:
        make_tiny(tmp, "mixtral", seed=0, **PRESETS[preset])
        print(f"preset {preset}; chat: {conversations} conversations x {turns} turns, system prompt {system_len} "
              f"tokens, 32-token user turns and answers", flush=True)
        chat = {name: _chat(tmp, caching, conversations, turns, system_len, 32, 32)
                for name, caching in (("off", False), ("on", True))}
        same_chat = chat["on"].pop("history") == chat["off"].pop("history")
        print(f"early stop: {requests} requests, prompt 32, max_tokens {max_tokens}, stop after {stop_after}, "
              f"KV cache {kv_tokens} tokens", flush=True)
        early = {policy: _early_stop(tmp, policy, requests, 32, max_tokens, stop_after, kv_tokens)
                 for policy in ("reserve", "on_demand")}
        same_early = early["reserve"].pop("tokens") == early["on_demand"].pop("tokens")
    on, off = chat["on"], chat["off"]
    print("\nprefix caching    TTFT p50    TTFT p99    prompt tokens computed    wall")
    for name, r in (("off", off), ("on", on)):
        print(f"{name:<17} {r['ttft_p50_s'] * 1e3:7.1f} ms {r['ttft_p99_s'] * 1e3:8.1f} ms "
              f"{r['prompt_tokens_computed']:>12} of {r['prompt_tokens']:<10} {r['seconds']:6.1f} s")
    print(f"on / off: TTFT p50 {on['ttft_p50_s'] / off['ttft_p50_s']:.2f}x, "
          f"p99 {on['ttft_p99_s'] / off['ttft_p99_s']:.2f}x, "
          f"prompt tokens computed {on['prompt_tokens_computed'] / off['prompt_tokens_computed']:.2f}x; "
          f"same tokens: {'yes' if same_chat else 'NO'}")
    print("\nKV allocation    peak running    tok/s    preemptions")
    for name, r in early.items():
        print(f"{name:<16} {r['peak_running']:>12} {r['tok_s']:8.1f} {r['preemptions']:>13}")
    r, o = early["reserve"], early["on_demand"]
    print(f"on_demand / reserve: peak running {o['peak_running'] / r['peak_running']:.2f}x, "
          f"tok/s {o['tok_s'] / r['tok_s']:.2f}x; same tokens: {'yes' if same_early else 'NO'}")
    report = {"preset": preset, "chat": chat, "chat_same_tokens": same_chat, "early_stop": early,
              "early_stop_same_tokens": same_early}
    write_report(out, report)
    return report
