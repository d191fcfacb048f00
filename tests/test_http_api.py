"""The HTTP API end to end: a real uvicorn server on 127.0.0.1, real clients (openai, huggingface_hub,
httpx), every greedy result compared token for token with Engine.generate on the same prompt ids."""

import asyncio
import contextlib
import json

import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import TextGenerationError

try:
    import httpx
except ImportError:  # some environments ship httpx as "httpx2" (what openai and huggingface_hub import there)
    import httpx2 as httpx

from servers import CHAT, IDLE, load, serve_http

from cluster.api.http_api import build_http_app
from cluster.api.service import ModelCard, Service
from kernels.engine import Engine
from kernels.sampling import SamplingParams
from kernels.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def api(tiny_model):
    service, loop, server = serve_http(tiny_model)
    yield server.url, service
    server.stop()
    loop.stop()


@pytest.fixture(scope="module")
def oracle(tiny_model):
    """Engine.generate in this process: the reference every answer must equal."""
    engine = Engine.from_dir(tiny_model)

    def run(ids, max_tokens, **kw):
        return engine.generate([ids], SamplingParams(max_tokens=max_tokens, **{"temperature": 0, **kw}))[0]

    return run


def sse(response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:") and "[DONE]" not in line]


def test_chat_matches_engine(api, oracle):
    url, service = api
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
    ids = service.tokenizer.encode_chat(CHAT)
    want = oracle(ids, 6, logprobs=3)
    reply = want.text.removeprefix(" ")
    assert want.text.startswith(" ")  # so the test checks that the reply's leading space is dropped

    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    c = r.choices[0]
    assert (c.message.role, c.message.content, c.finish_reason) == ("assistant", reply, "length")
    assert [e.logprob for e in c.logprobs.content] == pytest.approx(want.logprobs, abs=1e-4)
    assert [e.token for e in c.logprobs.content] == [service.token_text(t) for t in want.token_ids]
    assert [[t.token for t in e.top_logprobs] for e in c.logprobs.content] == \
        [[service.token_text(t) for t, _ in top] for top in want.top_logprobs]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 6, len(ids) + 6)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny"

    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1]) == reply
    assert [ch.choices[0].finish_reason for ch in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_completions_match_engine(api, oracle):
    url, service = api
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
    texts = ["The router", "Experts are"]
    ids = [service.tokenizer.encode(t) for t in texts]
    want = [oracle(i, 5, logprobs=2) for i in ids]

    r = client.completions.create(model="tiny", prompt=texts[0], max_tokens=5, temperature=0, logprobs=2)
    c = r.choices[0]
    assert (c.text, c.finish_reason, r.object) == (want[0].text, "length", "text_completion")
    assert c.logprobs.tokens == [service.token_text(t) for t in want[0].token_ids]
    assert c.logprobs.token_logprobs == pytest.approx(want[0].logprobs, abs=1e-4)
    assert r.id.startswith("cmpl-") and r.usage.completion_tokens == 5

    for prompt in (ids, texts):  # a list of prompts: one choice per prompt, in order
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0)
        assert [(c.index, c.text) for c in r.choices] == [(0, want[0].text), (1, want[1].text)]
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (sum(map(len, ids)), 10)
    r = client.completions.create(model="tiny", prompt=ids[1], max_tokens=5, temperature=0, echo=True)
    assert r.choices[0].text == texts[1] + want[1].text

    chunks = list(client.completions.create(model="tiny", prompt=texts[1], max_tokens=5, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want[1].text
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "length"

    # n samples with a seed: choice j draws with seed + j, so it equals the engine with that seed
    r = client.completions.create(model="tiny", prompt=texts[0], max_tokens=5, temperature=1.0, n=2, seed=7)
    sampled = [oracle(ids[0], 5, temperature=1.0, seed=7 + j).text for j in range(2)]
    assert [c.text for c in r.choices] == sampled and sampled[0] != sampled[1]


def test_finish_reasons_and_models(api, oracle):
    url, service = api
    ids = service.tokenizer.encode("The router")
    text = oracle(ids, 6).text
    stop = text[2:4]
    want = oracle(ids, 6, stop=[stop])
    assert want.finish_reason == "stop" and want.stop_reason == stop and len(want.token_ids) < 6

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
    c = client.completions.create(model="tiny", prompt="The router", max_tokens=6, temperature=0, stop=stop).choices[0]
    assert (c.text, c.finish_reason) == (want.text, "stop")
    out = InferenceClient(url).text_generation("The router", max_new_tokens=6, stop=[stop], details=True)
    assert out.generated_text == want.text + stop  # TGI keeps the stop sequence
    assert (out.details.finish_reason, [t.id for t in out.details.tokens]) == ("stop_sequence", want.token_ids)

    eos = oracle(ids, 12, temperature=1.0, seed=16)  # this seed samples EOS as the 3rd token
    assert eos.token_ids[-1] == service.tokenizer.eos_id and len(eos.token_ids) == 3
    out = InferenceClient(url).text_generation("The router", max_new_tokens=12, do_sample=True, seed=16, details=True)
    assert (out.generated_text, [t.id for t in out.details.tokens]) == (eos.text, eos.token_ids)
    assert (out.details.finish_reason, out.details.seed, out.details.tokens[-1].special) == ("eos_token", 16, True)
    r = client.completions.create(model="tiny", prompt="The router", max_tokens=12, temperature=1, seed=16)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == (eos.text, "stop", 3)

    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_tgi_client_matches_engine(api, oracle):
    url, service = api
    client = InferenceClient(url)
    want = oracle(service.tokenizer.encode("The router"), 6)

    out = client.text_generation("The router", max_new_tokens=6, details=True)
    assert out.generated_text == want.text
    assert [t.id for t in out.details.tokens] == want.token_ids
    assert [t.logprob for t in out.details.tokens] == pytest.approx(want.logprobs, abs=1e-4)
    assert (out.details.finish_reason, out.details.generated_tokens) == ("length", 6)

    events = list(client.text_generation("The router", max_new_tokens=6, details=True, stream=True))
    assert [e.token.id for e in events] == want.token_ids
    assert [e.generated_text for e in events] == [None] * 5 + [want.text]
    assert (events[-1].details.finish_reason, events[-1].details.generated_tokens) == ("length", 6)

    assert client.text_generation("The router", max_new_tokens=6, return_full_text=True) == "The router" + want.text
    r = httpx.post(f"{url}/generate", json={"inputs": "The router", "parameters": {"max_new_tokens": 6}})
    assert r.json() == {"generated_text": want.text}
    with httpx.stream("POST", f"{url}/generate_stream", json={"inputs": "The router",
                                                              "parameters": {"max_new_tokens": 6}}) as r:
        assert [e["token"]["id"] for e in sse(r)] == want.token_ids


def test_huggingface_chat_completion(api, oracle):
    """InferenceClient(url).chat_completion sends a placeholder model name (TGI ignores the field there): served."""
    url, service = api
    reply = oracle(service.tokenizer.encode_chat(CHAT), 6).text.removeprefix(" ")
    client = InferenceClient(url)
    out = client.chat_completion(CHAT, max_tokens=6, temperature=0)
    assert (out.choices[0].message.content, out.choices[0].finish_reason, out.model) == (reply, "length", "tiny")
    chunks = list(client.chat_completion(CHAT, max_tokens=6, temperature=0, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == reply
    assert chunks[-1].choices[0].finish_reason == "length"


def test_response_format_text_is_plain_output(api, oracle):
    """Absent, null and {"type": "text"} mean prose: the same text as without (JSON modes: test_structured.py)."""
    url, service = api
    want = oracle(service.tokenizer.encode_chat(CHAT), 4).text.removeprefix(" ")
    for response_format in (None, {"type": "text"}):
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, "temperature": 0,
                                                             "response_format": response_format})
        assert r.json()["choices"][0]["message"]["content"] == want, r.text


OK_CHAT = {"model": "tiny", "messages": CHAT, "max_tokens": 2}
OK_TEXT = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}
BAD_OPENAI = [  # (route, body, the field the error must name)
    ("chat", {k: v for k, v in OK_CHAT.items() if k != "messages"}, "messages"),
    ("chat", {**OK_CHAT, "messages": "hi"}, "messages"),
    ("chat", {**OK_CHAT, "messages": []}, "messages"),
    ("chat", {**OK_CHAT, "messages": [{"role": "assistant", "content": "Hi"}, *CHAT]}, "messages"),
    ("chat", {**OK_CHAT, "messages": CHAT * 2}, "messages"),
    ("chat", {**OK_CHAT, "messages": [{"role": "bot", "content": "Hi"}]}, "messages"),
    ("chat", {**OK_CHAT, "messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
    ("chat", {**OK_CHAT, "temperature": -1}, "temperature"),
    ("chat", {**OK_CHAT, "temperature": "0.5"}, "temperature"),
    ("chat", {**OK_CHAT, "top_p": 2}, "top_p"),
    ("chat", {**OK_CHAT, "n": 0}, "n"),
    ("chat", {**OK_CHAT, "n": 9}, "n"),
    ("chat", {**OK_CHAT, "max_tokens": 0}, "max_tokens"),
    ("chat", {**OK_CHAT, "max_tokens": 5000}, "max_tokens"),
    ("chat", {**OK_CHAT, "max_completion_tokens": 5000}, "max_completion_tokens"),
    ("chat", {**OK_CHAT, "model": "gpt-4"}, "model"),
    ("chat", {**OK_CHAT, "model": "tgi-x"}, "model"),  # only huggingface_hub's exact placeholders pass
    ("chat", {**OK_CHAT, "response_format": {"type": "yaml"}}, "response_format"),
    ("chat", {**OK_CHAT, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("chat", {**OK_CHAT, "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name"),
    ("chat", {**OK_CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema"),
    ("chat", {**OK_CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}},
     "response_format.json_schema.schema"),
    ("chat", {**OK_CHAT, "response_format": "json"}, "response_format"),
    ("chat", {**OK_CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {**OK_CHAT, "stop": 5}, "stop"),
    ("chat", {**OK_CHAT, "stream": "yes"}, "stream"),
    ("chat", {**OK_CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {**OK_CHAT, "presence_penalty": 1}, "presence_penalty"),
    ("chat", {**OK_CHAT, "stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ("completions", {**OK_TEXT, "prompt": ""}, "prompt"),
    ("completions", {**OK_TEXT, "prompt": []}, "prompt"),
    ("completions", {**OK_TEXT, "prompt": 5}, "prompt"),
    ("completions", {**OK_TEXT, "prompt": [1, -3]}, "prompt"),
    ("completions", {**OK_TEXT, "prompt": [1, 99999]}, "prompt"),
    ("completions", {**OK_TEXT, "prompt": ["a", ""]}, "prompt.1"),
    ("completions", {**OK_TEXT, "prompt": [[1, 2], []]}, "prompt.1"),
    ("completions", {**OK_TEXT, "prompt": [1] * 2047, "max_tokens": 2}, "max_tokens"),
    ("completions", {**OK_TEXT, "logprobs": 6}, "logprobs"),
    ("completions", {**OK_TEXT, "echo": True, "logprobs": 1}, "echo"),
    ("completions", {**OK_TEXT, "stream": True, "seed": 1.5}, "seed"),
    ("completions", {**OK_TEXT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#/$defs/missing"}}}}, "response_format.json_schema.schema"),
]


@pytest.mark.parametrize("route, body, param", BAD_OPENAI)
def test_bad_openai_requests_name_the_field(api, route, body, param):
    url, _ = api
    r = httpx.post(f"{url}/v1/{'chat/completions' if route == 'chat' else 'completions'}", json=body)
    err = r.json()["error"]
    assert (r.status_code, err["type"], err["param"]) == (400, "invalid_request_error", param), err
    assert param.split(".")[0] in err["message"]


BAD_TGI = [  # (body, a word the message must contain)
    ({"inputs": ""}, "inputs"),
    ({"parameters": {"max_new_tokens": 2}}, "inputs"),
    ({"inputs": 5}, "inputs"),
    ({"inputs": "Hi", "parameters": {"temperature": 0}}, "temperature"),
    ({"inputs": "Hi", "parameters": {"top_p": 2}}, "top_p"),
    ({"inputs": "Hi", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
    ({"inputs": "Hi", "parameters": {"max_new_tokens": 5000}}, "max_new_tokens"),
    ({"inputs": "Hi", "parameters": {"seed": -1}}, "seed"),
    ({"inputs": "Hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "stop"),
    ({"inputs": "Hi", "parameters": {"watermark": True}}, "watermark"),
    ({"inputs": "Hi", "parameters": {"details": "yes"}}, "details"),
    ({"inputs": "Hi", "parameters": {"decoder_input_details": True, "details": True}}, "decoder_input_details"),
    ({"inputs": "Hi", "parameters": {"grammar": {"type": "xml", "value": "<a/>"}}}, "grammar.type"),
    ({"inputs": "Hi", "parameters": {"grammar": {"type": "json"}}}, "grammar.value"),
    ({"inputs": "Hi", "parameters": {"grammar": {"type": "json", "value": {"type": "strin"}}}}, "invalid JSON schema"),
    ({"inputs": "Hi", "parameters": {"grammar": {"type": "json", "value": "{oops"}}}, "grammar.value"),
    ({"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "a(b"}}}, "invalid regex"),
]


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/"])
@pytest.mark.parametrize("body, word", BAD_TGI)
def test_bad_tgi_requests_are_422(api, path, body, word):
    url, _ = api
    r = httpx.post(url + path, json=body)
    assert (r.status_code, r.json()["error_type"]) == (422, "validation") and word in r.json()["error"], r.text


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}', "temperature"),
    ("/v1/completions", '{"prompt": "Hi", "top_p": NaN}', "top_p"),
    ("/v1/completions", '{"prompt": "Hi", "repetition_penalty": Infinity}', "repetition_penalty"),
    ("/generate", '{"inputs": "Hi", "parameters": {"temperature": Infinity}}', "parameters.temperature"),
    ("/generate", '{"inputs": "Hi", "parameters": {"repetition_penalty": NaN}}', "parameters.repetition_penalty"),
])
def test_non_finite_numbers_are_refused_as_such(api, path, body, param):
    """Python's json writes and reads NaN and Infinity; the answer says that is the problem (a NaN temperature
    was refused as not "<= 2", an infinite TGI one as not "in [0, 100]")."""
    url, _ = api
    r = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
    message = f"{param}: Input should be a finite number"
    if path == "/generate":
        assert (r.status_code, r.json()) == (422, {"error": message, "error_type": "validation"})
    else:
        assert (r.status_code, r.json()["error"]["message"], r.json()["error"]["param"]) == (400, message, param)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate"])
@pytest.mark.parametrize("raw", [b'{"model": ', b'{"prompt": "\xff", "inputs": "\xff"}', b"[1, 2]", b""])
def test_undecodable_bodies(api, path, raw):
    url, _ = api
    r = httpx.post(url + path, content=raw, headers={"content-type": "application/json"})
    if path == "/generate":
        assert (r.status_code, r.json()["error_type"]) == (422, "validation")
    else:
        assert (r.status_code, r.json()["error"]["param"]) == (400, "body")
    assert "body" in r.text


def test_good_request_after_bad_ones_and_concurrency(api, oracle):
    url, service = api
    texts = ["The router", "Experts are", "Hello world", "Tokens", "A cache", "Ray serve", "Mixtral", "Sparse"]
    want = [oracle(service.tokenizer.encode(t), 4).text for t in texts]

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json={"prompt": t, "max_tokens": 4,
                                                                          "temperature": 0}) for t in texts])

    assert [r.json()["choices"][0]["text"] for r in asyncio.run(run())] == want


async def data_lines(response, n: int):
    """Reads n SSE events; returns the line iterator, which the caller holds to keep the connection open
    (an abandoned `async for` over aiter_lines closes it once the generator is collected)."""
    lines = response.aiter_lines()
    while n:
        n -= (await anext(lines)).startswith("data:")
    return lines


async def wait_idle(service, seconds=15.0) -> dict:
    stats = {}
    for _ in range(int(seconds / 0.05)):
        stats = await service.backend.stats()
        if load(stats) == IDLE:
            break
        await asyncio.sleep(0.05)
    return stats


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": CHAT, "stream": True, "temperature": 0, "ignore_eos": True}),
    ("/generate_stream", {"inputs": "Hello", "parameters": {"max_new_tokens": None}}),  # greedy: no EOS for 300+
])
def test_disconnect_frees_the_sequence(api, path, body):
    url, service = api
    aborted = service.metrics.requests.labels("abort")

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async with c.stream("POST", path, json=body) as r:  # up to the whole context: minutes if not aborted
                assert r.status_code == 200
                lines = await data_lines(r, 2)
                assert (await service.backend.stats())["running"] == 1
                await lines.aclose()  # the client goes away
        return await wait_idle(service)

    before = aborted._value.get()
    assert load(asyncio.run(run())) == IDLE
    assert aborted._value.get() == before + 1  # closed early, not run to the end of the context


def test_overload_is_429(tiny_model):
    service, loop, server = serve_http(tiny_model, max_num_seqs=1, max_queued_requests=1)
    long = {"prompt": "Hi", "stream": True, "temperature": 0, "ignore_eos": True}

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            async with c.stream("POST", "/v1/completions", json=long) as r:  # the one batch slot
                lines = await data_lines(r, 1)
                queued = asyncio.ensure_future(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2,
                                                                           "temperature": 0}))
                for _ in range(500):
                    if (await service.backend.stats())["waiting"] == 1:
                        break
                    await asyncio.sleep(0.02)
                refused = [await c.post("/v1/chat/completions", json={"messages": CHAT}),
                           await c.post("/generate", json={"inputs": "Hi"}),
                           await c.post("/", json={"inputs": "Hi", "stream": True})]
                del lines
            return refused, await queued  # the stream closed: the queued request runs

    try:
        (chat, tgi, tgi_stream), queued = asyncio.run(run())
    finally:
        server.stop()
        loop.stop()
    assert chat.status_code == 429 and chat.json()["error"]["type"] == "rate_limit_error"
    for r in (tgi, tgi_stream):
        assert (r.status_code, r.json()["error_type"]) == (429, "overloaded")
    assert queued.status_code == 200 and queued.json()["usage"]["completion_tokens"] == 2


def test_health_and_metrics(api):
    url, _ = api
    r = httpx.get(f"{url}/health")
    assert (r.status_code, r.json()["status"]) == (200, "ok")

    def metrics() -> dict[str, float]:
        r = httpx.get(f"{url}/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in r.text.splitlines() if line[:1] != "#")}

    before = metrics()
    httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0}).raise_for_status()
    after = metrics()
    assert after["moeray:time_to_first_token_seconds_count"] == before["moeray:time_to_first_token_seconds_count"] + 1
    assert after["moeray:generation_tokens_total"] == before["moeray:generation_tokens_total"] + 3
    assert after["moeray:num_requests_running"] == 0
    assert after["moeray:prefix_cache_queries_total"] > before["moeray:prefix_cache_queries_total"]
    assert after["moeray:num_preemptions_total"] == 0 and "moeray:prefix_cache_hits_total" in after


def test_health_is_503_while_the_backend_fails(tiny_model):
    class Broken:
        def stream(self, prompt_ids, params, request_id):
            raise RuntimeError("no replica")

        async def stats(self):
            raise RuntimeError("no replica")

    app = build_http_app(Service(Broken(), Tokenizer.from_dir(tiny_model), ModelCard("tiny", 2048, 512, "mixtral")))

    async def get():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/health")

    r = asyncio.run(get())
    assert r.status_code == 503 and "no replica" in r.json()["error"]["message"]


# -- API key -----------------------------------------------------------------------------------
KEY = "sk-moeray-test-0123456789"


@pytest.fixture(scope="module")
def keyed(tiny_model):
    service, loop, server = serve_http(tiny_model, api_key=KEY)
    yield server.url, service
    server.stop()
    loop.stop()


def test_api_key_real_clients(keyed, oracle):
    """openai and huggingface_hub send their key as a Bearer token: the right one gets the engine's tokens,
    a wrong one a 401 that the clients recognize."""
    url, service = keyed
    want = oracle(service.tokenizer.encode_chat(CHAT), 4).text.removeprefix(" ")
    r = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY).chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=4, temperature=0)
    assert r.choices[0].message.content == want
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{url}/v1", api_key=KEY + "x", max_retries=0).models.list()
    assert (e.value.status_code, e.value.code, e.value.type) == (401, "invalid_api_key", "invalid_request_error")

    text = oracle(service.tokenizer.encode("The router"), 4).text
    assert InferenceClient(url, token=KEY).text_generation("The router", max_new_tokens=4) == text
    with pytest.raises(TextGenerationError) as e:  # from the HTTP error, whose response is ours
        InferenceClient(url, token="hf_wrong").text_generation("The router", max_new_tokens=4)
    assert e.value.__cause__.response.status_code == 401 and "invalid API key" in str(e.value)


OPENAI_ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
                 ("GET", "/v1/models/tiny"), ("GET", "/metrics")]
TGI_ROUTES = [("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/")]
NO_KEY = {"none": None, "empty": "", "bearer only": "Bearer", "wrong key": "Bearer sk-wrong",
          "prefix": f"Bearer {KEY[:-1]}", "longer": f"Bearer {KEY}0", "basic": f"Basic {KEY}", "raw key": KEY,
          "non-ascii": "Bearer ключ".encode()}


@pytest.mark.parametrize("header", NO_KEY.values(), ids=NO_KEY.keys())
def test_api_key_missing_or_wrong_is_401_in_each_routes_shape(keyed, header):
    """Refused before the body is read: an undecodable body still gets 401, not 400."""
    url, _ = keyed
    headers = {"content-type": "application/json", **({"authorization": header} if header is not None else {})}
    for method, path in OPENAI_ROUTES + TGI_ROUTES:
        r = httpx.request(method, url + path, content=b'{"not json', headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
        if (method, path) in TGI_ROUTES:
            assert r.json()["error_type"] == "authentication" and r.json()["error"], r.text
        else:
            err = r.json()["error"]
            assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "invalid_api_key", None)
        assert KEY not in r.text


def test_api_key_right_key_on_every_route_and_health_open(keyed):
    url, _ = keyed
    auth = {"authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/health").json()["status"] == "ok"  # load balancers probe without a key
    assert httpx.get(f"{url}/health", headers={"authorization": "Bearer wrong"}).status_code == 200
    assert httpx.get(f"{url}/metrics", headers=auth).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"bearer  {KEY}"}).status_code == 200  # case, spaces
    r = httpx.post(f"{url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, headers=auth)
    assert r.status_code == 200
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 0}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # past the key, the usual checks
    assert httpx.get(f"{url}/nope", headers=auth).status_code == 404


def test_no_api_key_configured_accepts_any_header(api):
    url, _ = api
    for header in ({}, {"authorization": "Bearer anything"}):
        assert httpx.get(f"{url}/v1/models", headers=header).status_code == 200


def test_oversized_body_is_413_unread(api):
    from cluster.api.service import MAX_REQUEST_BYTES as MAX_BODY_BYTES

    url, _ = api
    r = httpx.post(f"{url}/v1/completions", content=b" " * (MAX_BODY_BYTES + 1),
                   headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error"]["param"]) == (413, "body")

    def chunks():  # no Content-Length: refused as it arrives
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b" " * (1 << 20)

    r = httpx.post(f"{url}/generate", content=chunks(), headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["error_type"]) == (413, "validation")


@pytest.mark.parametrize("how", ["before its first event", "under Ray Serve"])
def test_a_stream_whose_client_left_is_aborted(tiny_model, how):
    """A client that goes away between the SSE headers and the first event: the response's generator never
    started, so its `finally` cannot close the generation; the response closes it (KV freed, nothing running).
    Under Ray Serve a client that leaves mid-stream can instead make the ASGI receive() raise TaskCancelledError
    (Ray's race, ray-project/ray#52477): the response ends without raising it (Serve printed it as a traceback on
    the console), its generation closed the same way."""
    from ray.exceptions import TaskCancelledError

    from cluster.api.http_common import EventStream

    service, loop, server = serve_http(tiny_model)

    async def run():
        stream = await service.open_stream(service.tokenizer.encode("Hello", bos=True),
                                           SamplingParams(max_tokens=300, ignore_eos=True))

        async def events():
            async for ev in stream:
                yield ev.text

        sent = asyncio.Event()

        async def send(message):
            if how == "before its first event":
                raise OSError("the client went away")
            sent.set()

        async def receive():
            if how == "before its first event":
                await asyncio.Event().wait()
            await sent.wait()  # Serve's receive() once the request's task is cancelled
            raise TaskCancelledError()

        aborted = service.metrics.requests.labels("abort")
        before = aborted._value.get()
        response = EventStream(events(), [stream])({"type": "http"}, receive, send)
        if how == "before its first event":
            with contextlib.suppress(Exception):  # the OSError, or an ExceptionGroup holding it (anyio's task group)
                await response
        else:
            await response  # no exception
            assert sent.is_set()
        assert aborted._value.get() == before + 1  # closed by the time the response returned, not left to run
        return await wait_idle(service)

    try:
        assert load(asyncio.run(run())) == IDLE
    finally:
        server.stop()
        loop.stop()


def test_decode_steps_stream_what_single_steps_do(tiny_model, oracle, monkeypatch):
    """A server with engine.decode_steps 8 (greedy steps up to 8 a C call): over the OpenAI API, streamed and not,
    one prompt or several at once, the text and finish reasons Engine.generate gives one step a call; a stop string
    that ends a burst midway cuts the text where a single step would; the bursts ran."""
    from kernels.engine import LocalExecutor

    bursts = []
    decode_steps = LocalExecutor.decode_steps
    monkeypatch.setattr(LocalExecutor, "decode_steps",
                        lambda self, t, seqs, steps: bursts.append(steps) or decode_steps(self, t, seqs, steps))
    service, loop, server = serve_http(tiny_model, decode_steps=8, decode_burst_ms=1e9)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
        texts = ["The router", "Experts are"]
        want = [oracle(service.tokenizer.encode(t), 20) for t in texts]
        chunks = list(client.completions.create(model="tiny", prompt=texts[0], max_tokens=20, temperature=0,
                                                stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == want[0].text and len(chunks) > 2
        assert chunks[-1].choices[0].finish_reason == "length"
        r = client.completions.create(model="tiny", prompt=texts, max_tokens=20, temperature=0)
        assert [c.text for c in r.choices] == [w.text for w in want]
        stop = want[1].text[len(want[1].text) // 2:][:3]  # somewhere past the first burst
        cut = oracle(service.tokenizer.encode(texts[1]), 20, stop=[stop])
        assert cut.finish_reason == "stop"
        r = client.completions.create(model="tiny", prompt=texts[1], max_tokens=20, temperature=0, stop=[stop])
        assert (r.choices[0].text, r.choices[0].finish_reason) == (cut.text, "stop")
        assert bursts and max(bursts) == 8
        assert load(asyncio.run(wait_idle(service))) == IDLE
    finally:
        server.stop()
        loop.stop()
