"""End to end: Ray Serve on a multi-node cluster (attention on one node, experts on two others), real
clients over HTTP (openai, huggingface_hub) and gRPC (stubs generated from proto/), every greedy
result compared with the single-process engine."""

import concurrent.futures
import json
import time

import grpc
import httpx
import pytest
from conftest import serve_config, serving
from ray import serve

from cluster.rpc import moeray_pb2 as pb
from cluster.rpc import moeray_pb2_grpc as rpc
from kernels.engine import Engine
from kernels.sampling import SamplingParams


@pytest.fixture(scope="module")
def server(tiny_model):
    cfg = serve_config(tiny_model)
    with serving(cfg) as url:
        yield {"http": url, "grpc": f"127.0.0.1:{cfg.serve.grpc_port}"}


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.from_dir(tiny_model)


def greedy(engine, ids, n=12):
    return engine.generate([ids], SamplingParams(max_tokens=n, temperature=0))[0]


def router_stats():
    return serve.get_deployment_handle("Router", "moeray").stats.remote().result()


def test_openai_chat_and_completions(server, engine):
    from openai import OpenAI

    client = OpenAI(base_url=server["http"] + "/v1", api_key="none")
    messages = [{"role": "user", "content": "What is an expert?"}]
    want = greedy(engine, engine.tokenizer.encode_chat(messages))
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == want.text.lstrip()
    assert chat.usage.completion_tokens == len(want.token_ids)
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want.text.lstrip()

    want = greedy(engine, engine.tokenizer.encode("The router sends"))
    done = client.completions.create(model="tiny", prompt="The router sends", max_tokens=12, temperature=0)
    assert done.choices[0].text == want.text and done.choices[0].finish_reason == want.finish_reason
    streamed = client.completions.create(model="tiny", prompt="The router sends", max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want.text
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_openai_tool_call(server, engine):
    """A forced tool call through Serve and the pipeline: the single process's greedy call, token for token."""
    from openai import OpenAI

    from kernels.tools import Tools

    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"],
        "additionalProperties": False}}}]
    messages = [{"role": "user", "content": "Add."}]
    spec = Tools.parse(tools, "required", False)
    want = engine.generate([engine.tokenizer.encode_chat(messages, tools)], SamplingParams(
        max_tokens=96, temperature=0, grammar=spec.grammar(engine.tokenizer)))[0]
    [expected] = spec.calls(want.token_ids, engine.tokenizer)
    r = OpenAI(base_url=server["http"] + "/v1", api_key="none").chat.completions.create(
        model="tiny", messages=messages, tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=96,
        temperature=0)
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and r.usage.completion_tokens == len(want.token_ids)
    assert (call.function.name, call.function.arguments) == (expected.name, expected.arguments)


def test_tgi_stream_with_details(server, engine):
    from huggingface_hub import InferenceClient

    want = greedy(engine, engine.tokenizer.encode("Experts and attention"))
    client = InferenceClient(server["http"])
    events = list(client.text_generation("Experts and attention", max_new_tokens=12, stream=True, details=True))
    assert [e.token.id for e in events] == want.token_ids
    assert events[-1].generated_text == want.text
    full = client.text_generation("Experts and attention", max_new_tokens=12, details=True)
    assert [t.id for t in full.details.tokens] == want.token_ids


def test_grpc_unary_and_stream_through_the_serve_proxy(server, engine):
    want = greedy(engine, engine.tokenizer.encode("Ray places actors"))
    with grpc.insecure_channel(server["grpc"]) as channel:
        stub = rpc.GenerationServiceStub(channel)
        request = pb.GenerateRequest(text="Ray places actors",
                                     params=pb.SamplingParameters(max_tokens=12, temperature=0))
        reply = stub.Generate(request)
        assert list(reply.token_ids) == want.token_ids and reply.text == want.text
        assert [m.token_id for m in stub.GenerateStream(request)] == want.token_ids
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(text="", params=pb.SamplingParameters(max_tokens=4)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(text="hi", params=pb.SamplingParameters(max_tokens=4, temperature=-1)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in err.value.details()
        assert list(stub.Generate(request).token_ids) == want.token_ids  # still serving


@pytest.mark.parametrize("path, body, status, needle", [
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ("/generate", {"inputs": "", "parameters": {"max_new_tokens": 4}}, 422, "inputs"),
])
def test_bad_http_requests_then_a_good_one(server, path, body, status, needle):
    r = httpx.post(server["http"] + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    payload = r.json()
    message = payload["error"]["message"] if isinstance(payload["error"], dict) else payload["error"]
    assert needle in json.dumps(payload) and message
    ok = httpx.post(server["http"] + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_concurrent_requests_all_complete(server, engine):
    prompts = [f"Request number {i} asks" for i in range(8)]
    want = [greedy(engine, engine.tokenizer.encode(p), 8).text for p in prompts]

    def one(p):
        r = httpx.post(server["http"] + "/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0},
                       timeout=60)
        return r.json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(one, prompts)) == want


def test_disconnected_stream_frees_its_sequence(server):
    body = {"prompt": "Go on", "max_tokens": 1000, "stream": True, "temperature": 0}
    with httpx.stream("POST", server["http"] + "/v1/completions", json=body, timeout=30) as r:
        chunks = 0
        for line in r.iter_lines():
            chunks += line.startswith("data:")
            if chunks == 3:
                break
    deadline = time.monotonic() + 15
    while (s := router_stats())["running"] or s["kv_cache_usage"]:
        assert time.monotonic() < deadline, f"the abandoned request still runs: {s}"
        time.sleep(0.1)


def test_health_and_metrics(server, engine):
    assert httpx.get(server["http"] + "/health", timeout=30).status_code == 200

    def metrics() -> dict[str, float]:
        r = httpx.get(server["http"] + "/metrics", timeout=30)
        assert r.status_code == 200
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in r.text.splitlines() if line[:1] != "#")}

    def expert_rows(m: dict[str, float]) -> float:  # the router's counts, summed over (layer, expert)
        return sum(v for k, v in m.items() if k.startswith("moeray:expert_tokens_total{"))

    before = metrics()
    r = httpx.post(server["http"] + "/v1/completions", json={"prompt": "Count me", "max_tokens": 3, "temperature": 0},
                   timeout=60)
    usage = r.raise_for_status().json()["usage"]
    after = metrics()
    assert after["moeray:time_to_first_token_seconds_count"] == before["moeray:time_to_first_token_seconds_count"] + 1
    generated = after["moeray:generation_tokens_total"] - before["moeray:generation_tokens_total"]
    assert generated == usage["completion_tokens"]
    # every token the model read (the prompt, then each sampled token but the last) went to top-k experts per layer
    read = usage["prompt_tokens"] + usage["completion_tokens"] - 1
    assert expert_rows(after) - expert_rows(before) == read * engine.args.n_layers * engine.args.moe.num_experts_per_tok
    assert (after["moeray:num_requests_running"], after["moeray:kv_cache_usage_perc"]) == (0, 0)
