"""The soak (actors/cli/soak.py), bounded: `moeray serve`'s Serve app on a fresh local Ray instance over
loopback, streaming clients on every API (OpenAI chat and completions SSE, TGI stream, gRPC) with a
burst past a small waiting queue, then idle. Under a minute on 2 cores.

What makes it fail:
  - a sequence that outlives its client: one HTTP request in seven asks for a long answer and
    disconnects after 2 tokens (not gRPC ones: Ray Serve's gRPC proxy can lose that cancel, see
    actors.cli.soak.jobs; `moeray bench soak --grpc-disconnects` shows it). If the abort did not reach
    the engine (Serve's cancel lost, EngineLoop not calling engine.abort) the sequence would still be
    decoding at the idle check, and if it were aborted but its blocks not freed they would stay in
    use: `idle` would not be all zeros. (Checked: with EngineLoop's abort removed this test fails with
    3 sequences running and 89 KV blocks in use.)
  - a stream cut short or never answered: counted as lost (a completed stream must end with its final
    event and exactly the tokens it asked for);
  - a queue without bound: no 429 in the burst, or waiting above max_queued_requests;
  - a 429 without the API's error body, or any other error status: counted as failed;
  - memory that grows with requests: RSS after the soak above RSS after the warm-up by RSS_TOLERANCE.
"""

from actors.cli.soak import RSS_TOLERANCE, soak

MAX_QUEUED = 3


def test_soak_loses_nothing_rejects_past_the_queue_and_returns_to_empty():
    r = soak(concurrency=12, burst=24, duration=10, warmup=4, max_num_seqs=6, max_queued=MAX_QUEUED,
             request_timeout=60)
    assert r["lost"] == 0 and r["failed"] == 0, r["errors"]
    assert r["sent"] == r["completed"] + r["rejected"] + r["cancelled"] > 0
    assert r["burst_rejected"] > 0 and r["cancelled"] > 0
    for api, outcomes in r["by_api"].items():
        assert outcomes.get("completed") and outcomes.get("rejected"), (api, outcomes)
    assert 0 < r["waiting_max"] <= MAX_QUEUED
    assert r["idle"] == {"running": 0, "waiting": 0, "kv_blocks_in_use": 0}
    assert r["rss_growth"] <= RSS_TOLERANCE, r["rss_total_mb"]
