"""Hostile input against the real servers of test_http_api.py and test_grpc_api.py (uvicorn, grpc.aio)
over the tiny model: Hypothesis bodies for every generation route (valid fields mixed with wrong types,
huge, negative and non-finite numbers, deep nesting, unicode and lone surrogates, long stop lists,
invalid UTF-8, wrong content types) and protobuf messages or raw bytes for every moeray.v1 method.

The properties: no 5xx (no INTERNAL / UNKNOWN / UNAVAILABLE over gRPC); a refused request has its
route's error shape, and never reached the engine (so no field of it allocated anything); a 200 stream
carries no error event; afterwards a good request still gets the engine's exact tokens and nothing is
left running. The card's context is short (CONTEXT tokens), so a body that leaves max_tokens out
still generates little, and a run stays well under a minute on two cores. Derandomized: CI sees the
same examples every time.
"""

import asyncio
import json

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import CHAT, IDLE, GrpcServer, load, serve_http

from cluster.api.service import LocalBackend
from cluster.rpc import moeray_pb2 as pb
from kernels.engine import Engine, EngineConfig
from kernels.sampling import SamplingParams

CONTEXT = 40
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class CountingBackend(LocalBackend):
    """Counts the generations that reach the engine."""

    started = 0

    def stream(self, prompt_ids, params, request_id):
        self.started += 1
        return super().stream(prompt_ids, params, request_id)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.from_dir(tiny_model)


def greedy(engine, ids, n=3) -> list[int]:
    return engine.generate([ids], SamplingParams(max_tokens=n, temperature=0))[0].token_ids


# -- values ------------------------------------------------------------------------------------
INTS = st.integers(-2, 6) | st.sampled_from([2**31, 2**63, -(2**63) - 1, 10**12, 10**30]) | st.integers()
FLOATS = st.floats() | st.sampled_from([1e-300, 5e-324, 1e-6, -0.0, 0.5, 1e300, float("nan"), float("inf")])
TEXT = (st.text(max_size=30) | st.text(st.characters(categories=["Cs", "Co", "Cc", "Zs", "So"]), max_size=8)
        | st.sampled_from(["", " ", "tiny", "tiny-mixtral", "gpt-4", "a" * 600, "\u2581" * 50]))
SCALARS = st.none() | st.booleans() | INTS | FLOATS | TEXT
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=10)


def within(lo, hi, *edges, exclude_min=False) -> st.SearchStrategy:
    """Floats the schema accepts, with the extremes a sampler might not survive."""
    return st.floats(lo, hi, exclude_min=exclude_min) | st.sampled_from(edges)


# Each field: values the schema accepts (sizes small, so most valid examples generate a few tokens).
# A body takes some of them, then has up to two fields replaced by anything JSON can hold.
SAMPLING = {"temperature": within(0, 2, 0.0, 1e-300, 5e-324, 1e-6, 2.0),
            "top_p": within(0, 1, 1e-300, 1.0, exclude_min=True), "top_k": st.integers(0, 50) | st.just(10**12),
            "repetition_penalty": within(0, 10, 1e-300, 1e-3, 10.0, exclude_min=True),
            "stop": TEXT | st.lists(TEXT, max_size=4)}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": TEXT})
OPENAI = {**SAMPLING, "model": st.sampled_from(["tiny", "", None]), "max_tokens": st.integers(1, 3),
          "n": st.integers(1, 3), "seed": st.integers() | st.just(2**64), "stream": st.booleans(),
          "stream_options": st.builds(dict, include_usage=st.booleans()), "user": TEXT, "ignore_eos": st.booleans(),
          "presence_penalty": st.sampled_from([0, 0.0, 1.5]), "frequency_penalty": st.sampled_from([0, 0.0, -2]),
          "logit_bias": st.sampled_from([None, {}, {"1": 5}]), "suffix": st.sampled_from([None, ""]),
          "best_of": st.sampled_from([None, 1, 2])}
CHAT_FIELDS = {**OPENAI, "messages": st.sampled_from([CHAT, CHAT, []]) | st.lists(MESSAGE, max_size=3),
               "max_completion_tokens": st.integers(1, 3), "logprobs": st.booleans(),
               "top_logprobs": st.sampled_from([None, 0]) | st.integers(0, 20),
               "tools": st.sampled_from([None, [], [{"type": "function"}]])}
COMPLETION_FIELDS = {**OPENAI, "logprobs": st.integers(0, 5), "echo": st.booleans(),
                     "prompt": TEXT | st.lists(TEXT, max_size=3) | st.lists(st.integers(0, 600), max_size=5)
                     | st.lists(st.lists(st.integers(0, 520), max_size=4), max_size=3)}
TGI_PARAMETERS = {
    **SAMPLING, "temperature": within(0, 100, 1e-300, 5e-324, 100.0, exclude_min=True),
    "stop": st.lists(TEXT, max_size=4),
    "top_k": st.integers(1, 50) | st.just(10**12), "max_new_tokens": st.integers(1, 3) | st.none(),
    "do_sample": st.booleans(), "seed": st.integers(0, 2**64 - 1) | st.just(2**64), "details": st.booleans(),
    "decoder_input_details": st.booleans(), "return_full_text": st.booleans(),
    "truncate": st.integers(1, 10) | st.just(10**12), "top_n_tokens": st.integers(0, 5), "best_of": st.integers(1, 2),
    "frequency_penalty": st.sampled_from([None, 0.0, 0.5]), "typical_p": st.sampled_from([None, 1.0, 0.5]),
    "watermark": st.booleans(), "grammar": st.none(), "adapter_id": st.sampled_from([None, "", "lora"]),
}


@st.composite
def objects(draw, fields: dict, required: str) -> dict:
    obj = draw(st.fixed_dictionaries({required: fields[required]},
                                     optional={k: v for k, v in fields.items() if k != required}))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        obj[draw(st.sampled_from(sorted(fields)))] = draw(JSON)
    return obj


TGI_FIELDS = {"inputs": TEXT, "parameters": objects(TGI_PARAMETERS, "max_new_tokens"), "stream": st.booleans()}


def splice(body: bytes, at: int, junk: bytes) -> bytes:
    at %= len(body) + 1
    return body[:at] + junk + body[at:]


def raw_bodies(fields: dict, required: str) -> st.SearchStrategy:
    """Bytes no parser should choke on: any JSON value, random bytes, a body with invalid UTF-8 spliced
    in, or nesting past the JSON parser's depth limit."""
    spliced = st.tuples(objects(fields, required).map(lambda o: json.dumps(o).encode()), st.integers(0, 10**6),
                        st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"]))
    return st.one_of(
        JSON.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=100),
        spliced.map(lambda t: splice(*t)),
        st.integers(1, 3000).map(lambda k: b'{"%s": ' % required.encode() + b"[" * k + b"]" * k + b"}"),
    )


CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                 "multipart/form-data; boundary=x", None])
OPENAI_TYPES = {"invalid_request_error", "rate_limit_error"}
TGI_TYPES = {"validation", "overloaded"}


# -- HTTP --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def http(tiny_model):
    service, loop, server = serve_http(tiny_model, max_model_len=CONTEXT, backend=CountingBackend)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client, service
    server.stop()
    loop.stop()


def check_http(path: str, r: httpx.Response, backend: CountingBackend, started: int) -> None:
    assert r.status_code < 500, r.text
    tgi = path in ("/generate", "/generate_stream", "/")
    if r.status_code >= 400:
        err = r.json()
        if tgi:
            assert set(err) == {"error", "error_type"} and err["error_type"] in TGI_TYPES, err
            assert isinstance(err["error"], str) and err["error"]
        else:
            e = err["error"]
            assert set(e) == {"message", "type", "param", "code"} and e["type"] in OPENAI_TYPES, err
            assert isinstance(e["message"], str) and e["message"] and isinstance(e["param"], str | None)
        if r.status_code != 429:
            assert backend.started == started, "a refused request reached the engine"
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [json.loads(line.split(":", 1)[1]) for line in r.text.splitlines()
                  if line.startswith("data:") and line != "data: [DONE]"]
        assert events and not any("error" in ev for ev in events), r.text
    else:
        reply = r.json()
        assert ("choices" in reply) if not tgi else ("generated_text" in (reply[0] if path == "/" else reply)), reply


ROUTES = {"/v1/chat/completions": (CHAT_FIELDS, "messages"), "/v1/completions": (COMPLETION_FIELDS, "prompt"),
          "/generate": (TGI_FIELDS, "inputs"), "/generate_stream": (TGI_FIELDS, "inputs"), "/": (TGI_FIELDS, "inputs")}


def assert_http_serves(client: httpx.Client, service, engine) -> None:
    ids = service.tokenizer.encode_chat(CHAT)
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "temperature": 0})
    assert r.json()["usage"]["completion_tokens"] == 3
    assert r.json()["choices"][0]["message"]["content"] == service.tokenizer.decode(greedy(engine, ids)).lstrip()
    assert load(service.backend.loop.stats()) == IDLE


@pytest.mark.parametrize("path", ROUTES)
def test_http_hostile_fields(http, engine, path):
    """JSON bodies: valid fields at their extremes, some replaced by anything (NaN and Infinity written
    as Python writes them)."""
    client, service = http

    @FUZZ
    @given(body=objects(*ROUTES[path]))
    def run(body):
        started = service.backend.started
        check_http(path, client.post(path, content=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"}), service.backend, started)

    run()
    assert_http_serves(client, service, engine)


@pytest.mark.parametrize("path", ROUTES)
def test_http_hostile_bytes(http, engine, path):
    client, service = http

    @FUZZ
    @given(body=raw_bodies(*ROUTES[path]), content_type=CONTENT_TYPES)
    def run(body, content_type):
        started = service.backend.started
        r = client.post(path, content=body, headers={"content-type": content_type} if content_type else {})
        check_http(path, r, service.backend, started)

    run()
    assert_http_serves(client, service, engine)


HUGE_HTTP = [  # every field that sizes work or memory, far too large: refused before the engine
    ("/v1/chat/completions", {"max_tokens": 10**12}), ("/v1/chat/completions", {"max_completion_tokens": 10**12}),
    ("/v1/chat/completions", {"n": 10**9}), ("/v1/chat/completions", {"best_of": 10**9}),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 10**9}),
    ("/v1/chat/completions", {"stop": ["x"] * 10**5}), ("/v1/chat/completions", {"stop": "x" * 10**6}),
    ("/v1/chat/completions", {"messages": CHAT * 10**4}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 10**5}]}),
    ("/v1/completions", {"prompt": [1] * 10**5}), ("/v1/completions", {"prompt": [[1]] * 10**5, "n": 10**9}),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 10**9}),
    ("/generate", {"parameters": {"max_new_tokens": 10**12}}), ("/generate", {"parameters": {"best_of": 10**9}}),
    ("/generate", {"parameters": {"top_n_tokens": 10**9}}), ("/generate", {"parameters": {"stop": ["x"] * 10**5}}),
    ("/generate", {"parameters": {"stop": ["x" * 10**6]}}), ("/generate", {"inputs": "word " * 10**5}),
]


@pytest.mark.parametrize("path, fields", HUGE_HTTP, ids=[f"{p} {next(iter(f))}" for p, f in HUGE_HTTP])
def test_http_size_fields_are_refused_before_the_engine(http, path, fields):
    client, service = http
    base = {"messages": CHAT} if "chat" in path else {"prompt": "Hi"} if "completions" in path else {"inputs": "Hi"}
    started = service.backend.started
    r = client.post(path, json={**base, **fields})
    assert r.status_code == (422 if path == "/generate" else 400), r.text[:300]
    check_http(path, r, service.backend, started)


def test_sampler_extremes_leave_the_batch_alone(tiny_model, engine):
    """Values the schemas accept but the sampler cannot survive (logits / 1e-300 overflow, softmax gives
    NaN, the engine step fails for EVERY sequence in it): greedy for a tiny temperature, 400 for a tiny
    repetition penalty, and a stream running beside them never notices."""
    service, loop, server = serve_http(tiny_model)
    want = service.tokenizer.decode(greedy(engine, service.tokenizer.encode_chat(CHAT))).lstrip()

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            body = {"prompt": "Hi", "stream": True, "temperature": 0, "ignore_eos": True, "max_tokens": 1000}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.aiter_lines()
                assert (await anext(lines)).startswith("data:")
                replies = [await c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3,
                                                                      "temperature": 1e-300}),
                           await c.post("/generate", json={"inputs": "Hi", "parameters": {
                               "max_new_tokens": 3, "do_sample": True, "temperature": 1e-300}}),
                           await c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3,
                                                                      "repetition_penalty": 1e-300})]
                running = (await service.backend.stats())["running"]
                after = []  # the stream's next 30 events: tokens, or an error if its batch failed
                while len(after) < 30 and (line := await anext(lines)) != "data: [DONE]":
                    if line.startswith("data:"):
                        after.append(json.loads(line[5:]))
                return replies, running, after

    try:
        (cold, tgi, penalty), running, after = asyncio.run(run())
    finally:
        server.stop()
        loop.stop()
    assert cold.json()["choices"][0]["message"]["content"] == want
    assert tgi.status_code == 200
    assert (penalty.status_code, penalty.json()["error"]["param"]) == (400, "repetition_penalty")
    assert running == 1 and len(after) == 30 and not any("error" in ev for ev in after), after[-1:]


# -- gRPC --------------------------------------------------------------------------------------
INT32 = st.integers(-3, 5) | st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
PB_TEXT = st.text(max_size=30) | st.sampled_from(["", "tiny-mixtral", "a" * 600, "\u2581" * 50])
PB_FLOAT = st.floats(width=32) | st.sampled_from([1e-30, 1e-45, 1e38, float("nan"), float("inf"), 0.0])


@st.composite
def messages(draw, message_type, good: dict, bad: dict):
    """A protobuf message with some of the `good` field values, up to two of them replaced by `bad` ones
    (anything the field's type can hold)."""
    fields = draw(st.fixed_dictionaries({}, optional=good))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        name = draw(st.sampled_from(sorted(bad)))
        fields[name] = draw(bad[name])
    return message_type(**fields)


def float32_within(lo, hi, *edges, exclude_min=False):
    return st.floats(lo, hi, width=32, exclude_min=exclude_min) | st.sampled_from(edges)


PARAMS = messages(
    pb.SamplingParameters,
    good=dict(max_tokens=st.integers(1, 3), temperature=float32_within(0, 100, 0.0, 1e-30, 1e-45, 100.0),
              top_p=float32_within(0, 1, 1e-30, 1.0, exclude_min=True), top_k=st.integers(0, 50),
              repetition_penalty=float32_within(0, 10, 1e-30, 1e-3, 10.0, exclude_min=True), seed=INT64,
              stop=st.lists(PB_TEXT, max_size=4), stop_token_ids=st.lists(st.integers(0, 600), max_size=4),
              ignore_eos=st.booleans(), logprobs=st.integers(0, 20)),
    bad=dict(max_tokens=INT32, temperature=PB_FLOAT, top_p=PB_FLOAT, top_k=INT32, repetition_penalty=PB_FLOAT,
             stop=st.lists(PB_TEXT, max_size=8), stop_token_ids=st.lists(INT32, max_size=4), logprobs=INT32))
MODEL = st.sampled_from(["", "tiny-mixtral"])
MESSAGE_LIST = st.lists(st.builds(pb.Message, role=st.sampled_from(["user", "assistant", "system"]), content=PB_TEXT),
                        max_size=4)
BAD_MESSAGES = st.lists(st.builds(pb.Message, role=PB_TEXT, content=PB_TEXT), max_size=4)
IDS = st.lists(st.integers(0, 520), min_size=1, max_size=6).map(lambda ids: pb.TokenIds(ids=ids))
GENERATE = messages(pb.GenerateRequest, good=dict(model=MODEL, text=PB_TEXT, params=PARAMS, request_id=PB_TEXT),
                    bad=dict(model=PB_TEXT, token_ids=IDS | st.lists(INT32).map(lambda ids: pb.TokenIds(ids=ids))))
CHAT_REQUEST = messages(pb.ChatRequest, good=dict(model=MODEL, messages=MESSAGE_LIST, params=PARAMS,
                                                  request_id=PB_TEXT), bad=dict(model=PB_TEXT, messages=BAD_MESSAGES))
REQUESTS = {"Generate": GENERATE, "GenerateStream": GENERATE, "Chat": CHAT_REQUEST, "ChatStream": CHAT_REQUEST,
            "Tokenize": messages(pb.TokenizeRequest, good=dict(model=MODEL, text=PB_TEXT, messages=MESSAGE_LIST),
                                 bad=dict(model=PB_TEXT, messages=BAD_MESSAGES)),
            "ModelInfo": messages(pb.ModelInfoRequest, good=dict(model=MODEL), bad=dict(model=PB_TEXT))}
REQUEST_TYPES = {"Generate": pb.GenerateRequest, "GenerateStream": pb.GenerateRequest, "Chat": pb.ChatRequest,
                 "ChatStream": pb.ChatRequest, "Tokenize": pb.TokenizeRequest, "ModelInfo": pb.ModelInfoRequest}
FINE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@pytest.fixture(scope="module")
def rpc(tiny_model):
    s = GrpcServer(tiny_model, EngineConfig(max_num_seqs=4), backend=CountingBackend, max_model_len=CONTEXT)
    yield s
    s.close()


def call(s: GrpcServer, method: str, request) -> grpc.StatusCode:
    try:
        reply = getattr(s.stub, method)(request, timeout=60)
        if method.endswith("Stream"):
            assert list(reply)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert e.details() or e.code() == grpc.StatusCode.OK
        return e.code()


def check_still_serving(s: GrpcServer, engine) -> None:
    reply = s.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 296, 454]),
                                               params=pb.SamplingParameters(max_tokens=3, temperature=0)))
    assert list(reply.token_ids) == greedy(engine, [1, 296, 454])
    assert s.wait_for(lambda st_: st_["running"] + st_["waiting"] == 0)["kv_cache_usage"] == 0


@pytest.mark.parametrize("method", REQUESTS)
def test_grpc_hostile_messages(rpc, engine, method):
    @FUZZ
    @given(request=REQUESTS[method])
    def run(request):
        started = rpc.service.backend.started
        code = call(rpc, method, request)
        assert code in FINE, (code, request)
        if code != grpc.StatusCode.OK:
            assert rpc.service.backend.started == started, "a refused request reached the engine"

    run()
    check_still_serving(rpc, engine)


def test_grpc_random_bytes(rpc, engine):
    """Bytes that parse as the method's message are requests like any other; bytes that do not are
    INVALID_ARGUMENT, naming the message type."""
    channel = rpc.channel

    @FUZZ
    @given(method=st.sampled_from(list(REQUESTS)), data=st.binary(max_size=120))
    def run(method, data):
        path = f"/moeray.v1.GenerationService/{method}"
        call_ = (channel.unary_stream if method.endswith("Stream") else channel.unary_unary)(path)
        try:
            parsed = REQUEST_TYPES[method].FromString(data)
        except Exception:
            parsed = None
        try:
            reply = call_(data, timeout=60)
            if method.endswith("Stream"):
                list(reply)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
        if parsed is None:
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "is not a valid moeray.v1." in details, details
        else:
            assert code in FINE, (code, parsed)

    run()
    check_still_serving(rpc, engine)


HUGE_GRPC = {
    "max_tokens": pb.SamplingParameters(max_tokens=2**31 - 1),
    "logprobs": pb.SamplingParameters(max_tokens=2, logprobs=2**31 - 1),
    "stop count": pb.SamplingParameters(max_tokens=2, stop=["x"] * 10**4),
    "stop length": pb.SamplingParameters(max_tokens=2, stop=["x" * 10**6]),
}


@pytest.mark.parametrize("params", HUGE_GRPC.values(), ids=HUGE_GRPC.keys())
def test_grpc_size_fields_are_refused_before_the_engine(rpc, params):
    started = rpc.service.backend.started
    for request in (pb.GenerateRequest(text="Hi", params=params),
                    pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 10**5), params=pb.SamplingParameters())):
        with pytest.raises(grpc.RpcError) as e:
            rpc.stub.Generate(request, timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert rpc.service.backend.started == started
