"""moeray.v1 through a real grpc.aio server on loopback, with the generated client stubs, over the
tiny model: tokens equal the single-process engine's, errors carry the right status and name the
field, overload is RESOURCE_EXHAUSTED, a cancelled stream frees its sequence, and the stubs are fresh.
"""

from contextlib import aclosing

import grpc
import pytest
from grpc_health.v1 import health_pb2
from servers import GrpcServer

from cluster.api.service import LocalBackend
from cluster.rpc import moeray_pb2 as pb
from kernels.engine import Engine, EngineConfig
from kernels.sampling import SamplingParams

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
LONG = pb.SamplingParameters(max_tokens=1500, ignore_eos=True)  # over a minute of tokens here: never ends in a test


@pytest.fixture(scope="module")
def server(tiny_model):
    s = GrpcServer(tiny_model, EngineConfig(max_num_seqs=4))
    yield s
    s.close()


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.from_dir(tiny_model)


def reference(engine, ids, p: pb.SamplingParameters):
    """The single-process engine's completion for the same ids and (proto-rounded) parameters."""
    optional = {f: getattr(p, f) for f in ("temperature", "top_p", "repetition_penalty", "seed", "logprobs")
                if p.HasField(f)}
    params = SamplingParams(max_tokens=p.max_tokens, top_k=p.top_k, stop=list(p.stop), **optional)
    return engine.generate([ids], params)[0]


def check_against(expected, unary: pb.GenerateResponse, stream: list, n_prompt: int, logprobs: bool):
    """Unary and streamed answers both equal the engine's completion, field by field."""
    assert list(unary.token_ids) == expected.token_ids == [m.token_id for m in stream]
    assert unary.text == expected.text == "".join(m.text for m in stream)
    assert unary.finish_reason == stream[-1].finish_reason == FINISH[expected.finish_reason]
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not m.HasField("usage") for m in stream[:-1])
    for msg in (unary, stream[-1]):
        assert (msg.usage.prompt_tokens, msg.usage.completion_tokens) == (n_prompt, len(expected.token_ids))
        reason = msg.WhichOneof("stop_reason")
        assert (getattr(msg, reason) if reason else None) == expected.stop_reason
    if logprobs:
        for got in (list(unary.logprobs), [m.logprobs for m in stream]):
            assert [e.logprob for e in got] == expected.logprobs  # float32 end to end: exact
            assert [[(t.token_id, t.logprob) for t in e.top] for e in got] == expected.top_logprobs
    else:
        assert not unary.logprobs and not any(m.HasField("logprobs") for m in stream)


GREEDY = pb.SamplingParameters(max_tokens=8, temperature=0)


@pytest.mark.parametrize("params", [
    GREEDY,
    pb.SamplingParameters(max_tokens=6, temperature=0, repetition_penalty=0.5, logprobs=3),
    pb.SamplingParameters(max_tokens=6, temperature=0.75, top_p=0.5, top_k=5, seed=7),  # each one changes the tokens
])
def test_generate_and_stream_equal_the_engine(server, engine, params):
    req = pb.GenerateRequest(text="The router sends each token", params=params)
    ids = server.service.tokenizer.encode(req.text, bos=True)
    expected = reference(engine, ids, params)
    check_against(expected, server.stub.Generate(req), list(server.stub.GenerateStream(req)), len(ids),
                  params.HasField("logprobs"))


def test_token_ids_prompt_and_stop_string(server, engine):
    ids = [1, 415, 7, 88, 301]
    plain = reference(engine, ids, GREEDY)
    stop = plain.text.strip()[2:4]  # a stop string that occurs in the greedy text
    params = pb.SamplingParameters(max_tokens=8, temperature=0, stop=[stop])
    req = pb.GenerateRequest(model="tiny-mixtral", token_ids=pb.TokenIds(ids=ids), params=params)
    expected = reference(engine, ids, params)
    assert expected.stop_reason == stop and len(expected.token_ids) < 8
    check_against(expected, server.stub.Generate(req), list(server.stub.GenerateStream(req)), len(ids), False)


def test_chat_and_chat_stream_equal_the_engine(server, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is an expert?"},
                {"role": "assistant", "content": "A feed-forward block."}, {"role": "user", "content": "And a router?"}]
    req = pb.ChatRequest(messages=[pb.Message(**m) for m in messages], params=GREEDY, request_id="chat-1")
    ids = server.service.tokenizer.encode_chat(messages)
    stream = list(server.stub.ChatStream(req))
    expected = reference(engine, ids, GREEDY)
    assert expected.text.startswith(" ")  # the engine continues the prompt; a chat reply drops that space
    expected.text = expected.text.removeprefix(" ")
    check_against(expected, server.stub.Chat(req), stream, len(ids), False)
    assert {m.request_id for m in stream} == {"chat-1"}


def test_tokenize_model_info_and_health(server):
    tok = server.service.tokenizer
    got = server.stub.Tokenize(pb.TokenizeRequest(text="Experts route tokens"))
    assert list(got.token_ids) == tok.encode("Experts route tokens", bos=True)
    assert list(got.pieces) == [tok.id_to_piece(i) for i in got.token_ids] and got.pieces[0] == "<s>"
    messages = [{"role": r, "content": c} for r, c in [("user", "hi"), ("assistant", "hello"), ("user", "bye")]]
    got = server.stub.Tokenize(pb.TokenizeRequest(messages=[pb.Message(**m) for m in messages]))
    assert list(got.token_ids) == tok.encode_chat(messages)

    info = server.stub.ModelInfo(pb.ModelInfoRequest())
    assert (info.id, info.architecture, info.max_model_len, info.vocab_size, info.bos_token_id, info.eos_token_id,
            info.created) == ("tiny-mixtral", "mixtral", 2048, 512, 1, 2, 1700000000)

    for service in ("", "moeray.v1.GenerationService"):
        reply = server.health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as e:
        server.health.Check(health_pb2.HealthCheckRequest(service="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def generate(text=None, ids=None, model="", **params):
    prompt = {"text": text} if text is not None else {"token_ids": pb.TokenIds(ids=ids)} if ids is not None else {}
    return pb.GenerateRequest(model=model, params=pb.SamplingParameters(**params), **prompt)


def chat(*roles):
    return pb.ChatRequest(messages=[pb.Message(role=r, content="hello") for r in roles],
                          params=pb.SamplingParameters(max_tokens=2))


BAD = [
    ("Generate", generate(text=""), "text"),
    ("Generate", generate(), "prompt"),
    ("Generate", generate(ids=[1, 5, 512]), "token_ids"),
    ("Generate", generate(text="hi", temperature=-1), "temperature"),
    ("Generate", generate(text="hi", top_p=2), "top_p"),
    ("Generate", generate(text="hi", model="gpt-4"), "model"),
    ("Generate", generate(ids=[1] * 2000, max_tokens=100), "max_tokens"),
    ("Chat", chat("user", "user"), "messages[1].role"),
    ("Tokenize", pb.TokenizeRequest(text="hi", model="gpt-4"), "model"),
    ("ModelInfo", pb.ModelInfoRequest(model="gpt-4"), "model"),
    ("Generate", generate(text="hi", temperature=float("nan")), "temperature must be a finite number, got nan"),
    ("Generate", generate(text="hi", top_p=float("nan")), "top_p must be a finite number, got nan"),
    ("Generate", generate(text="hi", repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
    ("Generate", generate(text="hi", stop_token_ids=[2, 512]), "stop_token_ids"),
    ("Generate", generate(text="hi", stop_token_ids=[2**31 - 1]), "stop_token_ids"),
    ("Generate", generate(text="hi", stop_token_ids=[-1]), "stop_token_ids"),
    ("Generate", generate(text="hi", json_schema='{"type": "strin"}'), "params.json_schema: invalid JSON schema"),
    ("Generate", generate(text="hi", json_schema="{not json"), "params.json_schema"),
    ("Generate", generate(text="hi", regex="a(b"), "params.regex: invalid regex"),
]


@pytest.mark.parametrize("method, request_, field", BAD + [(m + "Stream", r, f) for m, r, f in BAD[:8]],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_bad_requests_are_invalid_argument_naming_the_field(server, engine, method, request_, field):
    call = getattr(server.stub, method)
    with pytest.raises(grpc.RpcError) as e:
        reply = call(request_, timeout=10)
        if method.endswith("Stream"):
            next(reply)  # a stream fails before its first message
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert field in e.value.details()
    good = generate(ids=[1, 296, 454], max_tokens=3, temperature=0)
    assert list(server.stub.Generate(good).token_ids) == reference(engine, [1, 296, 454], good.params).token_ids


def test_request_id_in_use_is_already_exists(server, engine):
    """A request_id that a running generation holds: ALREADY_EXISTS naming the field (the request is valid; it
    succeeds once the other has ended), and the running generation goes on."""
    held = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 5, 6]), params=LONG, request_id="job-7")
    running = server.stub.GenerateStream(held)
    again = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 296, 454]), params=GREEDY, request_id="job-7")
    chat_ = pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], params=GREEDY, request_id="job-7")
    try:
        assert next(running).request_id == "job-7"
        for method, request_ in [("Generate", again), ("GenerateStream", again), ("Chat", chat_),
                                 ("ChatStream", chat_)]:
            with pytest.raises(grpc.RpcError) as e:
                call(server.stub, method, request_, None)
            assert (e.value.code(), e.value.details()) == \
                (grpc.StatusCode.ALREADY_EXISTS, "request_id 'job-7' is in use by a generation in progress"), method
        assert next(running).request_id == "job-7"  # unharmed
    finally:
        running.cancel()
    assert server.wait_for(lambda st: st["running"] == 0)["running"] == 0
    reply = server.stub.Generate(again)
    assert (reply.request_id, list(reply.token_ids)) == ("job-7", reference(engine, [1, 296, 454], GREEDY).token_ids)


def test_overload_is_resource_exhausted(tiny_model):
    s = GrpcServer(tiny_model, EngineConfig(max_num_seqs=1, max_queued_requests=1))
    try:
        running = s.stub.GenerateStream(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 5, 6]), params=LONG))
        next(running)  # holds the only batch slot
        queued = s.stub.Generate.future(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 7]), params=LONG))
        assert s.wait_for(lambda st: st["waiting"] == 1)["waiting"] == 1
        with pytest.raises(grpc.RpcError) as e:
            s.stub.Generate(generate(text="one too many", max_tokens=2), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
        running.cancel()
        queued.cancel()
        assert s.wait_for(lambda st: st["running"] + st["waiting"] == 0)["running"] == 0
    finally:
        s.close()


def test_cancelled_stream_frees_its_sequence(server):
    aborted = server.service.metrics.requests.labels("abort")
    before = aborted._value.get()
    stream = server.stub.GenerateStream(pb.GenerateRequest(text="Cancel me", params=LONG))
    next(stream), next(stream)
    assert server.stats()["running"] == 1 and server.stats()["kv_cache_usage"] > 0
    stream.cancel()
    stats = server.wait_for(lambda st: st["running"] == 0 and st["kv_cache_usage"] == 0)
    assert (stats["running"], stats["kv_cache_usage"]) == (0, 0)  # LONG would run for a minute otherwise
    assert aborted._value.get() == before + 1  # the service stream was closed early, not run to its end


class BreaksAfterTwo(LocalBackend):
    """A backend whose stream fails after two tokens, as a pipeline whose expert shard died would."""

    async def stream(self, prompt_ids, params, request_id):
        async with aclosing(super().stream(prompt_ids, params, request_id)) as events:
            yield await anext(events)
            yield await anext(events)
        raise RuntimeError("expert shard 3 is gone")


def test_backend_failure_mid_stream_ends_it_with_unavailable(tiny_model):
    """A backend that fails after tokens were sent: UNAVAILABLE (retryable), the cause in the details."""
    s = GrpcServer(tiny_model, EngineConfig(max_num_seqs=2), backend=BreaksAfterTwo)
    try:
        stream = s.stub.GenerateStream(pb.GenerateRequest(text="Experts", params=LONG))
        assert len([next(stream), next(stream)]) == 2
        for call in (lambda: next(stream), lambda: s.stub.Generate(pb.GenerateRequest(text="Experts", params=LONG))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "expert shard 3 is gone" in e.value.details()
        assert s.wait_for(lambda st: st["running"] == 0)["running"] == 0
    finally:
        s.close()


# -- API key ---------------------------------------------------------------------------------------
KEY = "sk-moeray-grpc-test"
CALLS = {"Generate": generate(ids=[1, 296, 454], max_tokens=3, temperature=0),
         "GenerateStream": generate(ids=[1, 296, 454], max_tokens=3, temperature=0),
         "Chat": pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], params=GREEDY),
         "ChatStream": pb.ChatRequest(messages=[pb.Message(role="user", content="hi")], params=GREEDY),
         "Tokenize": pb.TokenizeRequest(text="hi"), "ModelInfo": pb.ModelInfoRequest()}


@pytest.fixture(scope="module")
def keyed(tiny_model):
    s = GrpcServer(tiny_model, EngineConfig(max_num_seqs=4), api_key=KEY)
    yield s
    s.close()


def call(stub, method, request, metadata):
    reply = getattr(stub, method)(request, timeout=10, metadata=metadata)
    return list(reply) if method.endswith("Stream") else reply


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", KEY),),
                                      (("authorization", f"Bearer {KEY}x"),), (("x-api-key", KEY),),
                                      (("authorization-bin", f"Bearer {KEY}".encode()),)],
                         ids=["none", "wrong", "no scheme", "longer", "other header", "binary"])
def test_api_key_missing_or_wrong_is_unauthenticated(keyed, metadata):
    """Every moeray.v1 method, even with a request that would fail validation: the key comes first."""
    for method, request_ in [*CALLS.items(), ("Generate", generate(text=""))]:
        with pytest.raises(grpc.RpcError) as e:
            call(keyed.stub, method, request_, metadata)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, e.value.details())
        assert "API key" in e.value.details() and KEY not in e.value.details()
    assert keyed.stats()["running"] == 0


def test_api_key_right_key_works_and_health_is_open(keyed, engine):
    auth = (("authorization", f"Bearer {KEY}"),)
    for method, request_ in CALLS.items():
        call(keyed.stub, method, request_, auth)
    reply = keyed.stub.Generate(CALLS["Generate"], metadata=auth)
    assert list(reply.token_ids) == reference(engine, [1, 296, 454], CALLS["Generate"].params).token_ids
    with pytest.raises(grpc.RpcError) as e:  # past the key, the usual checks
        keyed.stub.Generate(generate(text=""), metadata=auth)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert keyed.health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
