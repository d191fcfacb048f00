"""Tool calling: the prompt token for token as mistral-common's v3 instruct tokenizer writes it (the real v3 tokenizer
that mistral-common ships), the v1 text layout, and replies held to the tools by the grammar, on tiny random models
with a v1 tokenizer (trained) and a v3 one (Mistral's), through the engine and through the openai client."""

import json
import re
import shutil
from pathlib import Path
from typing import Literal

import jsonschema
import mistral_common
import openai
import pydantic
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from servers import serve_http

from kernels.engine import Engine
from kernels.sampling import SamplingParams
from kernels.tiny import make_tiny
from kernels.tokenizer import ChatTemplateError, Tokenizer
from kernels.tools import CallStream, ToolError, Tools

V3_FILE = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Adds two numbers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
CALL = {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
CALL2 = {"id": "123456789", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "Weather in Paris?"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}],
    "result": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None,
                                                                   "tool_calls": [CALL]},
               {"role": "tool", "tool_call_id": "abcdefghi", "content": '{"temp": 21}'}],
    "parallel": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris, and 1 + 2?"},
                 {"role": "assistant", "tool_calls": [CALL, CALL2]},
                 {"role": "tool", "tool_call_id": "abcdefghi", "content": "sunny"},
                 {"role": "tool", "tool_call_id": "123456789", "content": [{"type": "text", "text": "3"}]},
                 {"role": "assistant", "content": "Sunny, and 3. "}, {"role": "user", "content": "Thanks!"}],
}


def reply_ids(tok, text):
    """A reply's ids as a model writes them: SentencePiece's dummy-prefix space included."""
    return tok.sp.encode(text)


# -- the prompt --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v3():
    return Tokenizer(V3_FILE)


@pytest.mark.parametrize("with_tools", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_v3_prompt_matches_mistral_common(v3, name, with_tools):
    messages, tools = CONVERSATIONS[name], TOOLS if with_tools else None
    expected = MistralTokenizer.from_file(str(V3_FILE)).encode_chat_completion(
        ChatCompletionRequest(messages=messages, tools=tools)).tokens
    assert v3.encode_chat(messages, tools) == expected
    assert v3.tool_calls_id == v3.sp.piece_to_id("[TOOL_CALLS]") == 5


def test_v1_prompt_is_the_v3_layout_in_text(tiny_model):
    tok = Tokenizer.from_dir(tiny_model)
    assert tok.controls == {} and tok.tool_calls_id is None
    messages = CONVERSATIONS["parallel"]
    tools = [TOOLS[1]]
    ids = tok.encode_chat(messages, tools)
    calls = '[{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}, ' \
            '{"name": "add", "arguments": {"a": 1, "b": 2}, "id": "123456789"}]'
    segments = ["[INST] Be brief.\n\nParis, and 1 + 2? [/INST]", f"[TOOL_CALLS] {calls}", "</s>",
                '[TOOL_RESULTS] {"content": "sunny", "call_id": "abcdefghi"}[/TOOL_RESULTS]',
                '[TOOL_RESULTS] {"content": 3, "call_id": "123456789"}[/TOOL_RESULTS]', "Sunny, and 3. ", "</s>",
                f"[AVAILABLE_TOOLS] {json.dumps(tools)}[/AVAILABLE_TOOLS][INST] Thanks! [/INST]"]
    expected = [tok.bos_id] + [i for s in segments for i in ([tok.eos_id] if s == "</s>" else tok.sp.encode(s))]
    assert ids == expected
    # without tools nor tool messages, the v1 template is unchanged (tests/test_tokenizer.py checks it against
    # mistral-common's v1)
    assert tok.encode_chat(messages[:2]) == tok.encode_chat(messages[:2], [])


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "x", "content": "r"}],
     "messages[1].role: expected role 'assistant', got 'tool'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [CALL]}, {"role": "user", "content": "b"}],
     "messages[2].role: expected role 'tool', got 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "hm", "tool_calls": [CALL]}],
     "messages[1].content: an assistant message with tool_calls must have no content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": []}],
     "messages[1].tool_calls: expected a non-empty list"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}],
     "messages[1].tool_calls[0]: expected {'id', 'type': 'function'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool", "content": "r"}],
     "messages[2].tool_call_id: expected the id of the tool call answered"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [CALL]}],
     "messages[1].role: conversation must end with role 'user' or 'tool', got 'assistant'"),
])
def test_bad_tool_conversations(v3, messages, message):
    with pytest.raises(ChatTemplateError) as e:
        v3.encode_chat(messages, TOOLS)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("tools, choice, parallel, param, message", [
    ([{"type": "function"}], None, None, "tools.0", "expected {"),
    ([{"type": "function", "function": {"name": "bad name"}}], None, None, "tools.0.function.name", "must be 1 to 64"),
    ([TOOLS[0], TOOLS[0]], None, None, "tools.1.function.name", "two tools are named 'get_weather'"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], None, None,
     "tools.0.function.parameters", "invalid JSON schema"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, None, "tool_choice", "names no tool of this request"),
    (TOOLS, "sometimes", None, "tool_choice", 'expected "none", "auto", "required"'),
    (None, "required", None, "tool_choice", "requires tools"),
    (TOOLS, None, "yes", "parallel_tool_calls", "must be a boolean"),
])
def test_bad_tools_are_refused_naming_the_field(tools, choice, parallel, param, message):
    with pytest.raises(ToolError) as e:
        Tools.parse(tools, choice, parallel)
    assert e.value.param == param and str(e.value).startswith(message), (e.value.param, str(e.value))


def test_calls_are_read_back_or_not(v3, tiny_model):
    tools = Tools.parse(TOOLS, "auto", None)
    text = '[{"name": "add", "arguments": {"a": 1, "b": 2}}]'
    v1 = Tokenizer.from_dir(tiny_model)
    for tok, ids in [(v3, [5, *reply_ids(v3, text), v3.eos_id]), (v1, reply_ids(v1, f"[TOOL_CALLS] {text}"))]:
        [call] = tools.calls(ids, tok)
        assert (call.name, json.loads(call.arguments)) == ("add", {"a": 1, "b": 2})
        assert len(call.id) == 9 and call.id.isalnum()
        assert tools.calls(ids[:-3], tok) is None  # cut short: not JSON
        assert tools.calls(reply_ids(tok, "Hello"), tok) is None
        assert Tools.parse(TOOLS, "none", None).calls(ids, tok) is None
    assert tools.calls([5, *reply_ids(v3, '[{"name": "rm", "arguments": {}}]')], v3) is None  # not an offered tool


def test_call_stream_reads_calls_however_the_text_is_cut():
    """CallStream on the grammar's layout, the text arriving in random pieces: the deltas add up to the calls
    (strings with quotes and braces, nested arrays and objects, empty arguments)."""
    import random

    body = (' [{"name": "get_weather", "arguments": {"city": "Pa\\"r}is", "n": [1, {"a": 2}]}}, '
            '{"name": "add", "arguments": {}}]')
    rng = random.Random(0)
    for _ in range(300):
        stream, calls = CallStream(), {}
        for cut in [*sorted(rng.sample(range(1, len(body)), rng.randint(1, 40))), len(body)]:
            for d in stream.feed(body[:cut]):
                call = calls.setdefault(d["index"], {"name": None, "arguments": ""})
                if "id" in d:
                    assert call["name"] is None and len(d["id"]) == 9
                    call["name"] = d["function"]["name"]
                call["arguments"] += d["function"]["arguments"]
        assert stream.state == "done"
        assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
            ("get_weather", {"city": 'Pa"r}is', "n": [1, {"a": 2}]}), ("add", {})]


# -- replies, through the engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v3_model(tmp_path_factory):
    """A tiny random Mixtral whose tokenizer is Mistral's v3 (32768 pieces)."""
    path = make_tiny(tmp_path_factory.mktemp("tiny-v3"), "mixtral", vocab_size=32768)
    shutil.copy(V3_FILE, path / "tokenizer.model")
    return path


@pytest.fixture(scope="module", params=["v1", "v3"])
def engine(request, tiny_model, v3_model):
    return Engine.from_dir(tiny_model if request.param == "v1" else v3_model)


MODES = [dict(temperature=0), dict(temperature=1.0, seed=1), dict(temperature=1.2, top_k=40, seed=2, logprobs=2),
         dict(temperature=0.9, top_p=0.9, seed=3)]


def test_required_and_named_calls_validate(engine):
    """Random models: every reply is calls of offered tools whose arguments validate, because of the grammar. (One
    call each: a random model would chain parallel calls until max_tokens; test_parallel_calls checks those.)"""
    tok = engine.tokenizer
    cases = [(choice, False, mode) for choice in ("required", {"type": "function", "function": {"name": "add"}})
             for mode in MODES]
    tools = [Tools.parse(TOOLS, choice, parallel) for choice, parallel, _ in cases]
    prompt = tok.encode_chat(CONVERSATIONS["system"], TOOLS)
    outs = engine.generate([prompt] * len(cases), [SamplingParams(max_tokens=160, grammar=t.grammar(tok), **mode)
                                                   for t, (_, _, mode) in zip(tools, cases, strict=True)])
    for t, (choice, _, mode), out in zip(tools, cases, outs, strict=True):
        assert out.finish_reason == "stop", (choice, mode, out.text)
        calls = t.calls(out.token_ids, tok)
        assert calls, (choice, mode, out.text)
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        assert len(calls) == 1 and (choice == "required" or calls[0].name == "add")


@pytest.mark.parametrize("parallel", [None, True, False])
def test_parallel_calls(engine, parallel):
    """Two calls in one reply: held to the grammar, and read back, unless parallel_tool_calls is false."""
    tok = engine.tokenizer
    tools = Tools.parse(TOOLS, "required", parallel)
    one = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    text = f"[{one}, {one.replace('1', '7')}]"
    ids = [tok.tool_calls_id, *reply_ids(tok, text)] if tok.tool_calls_id else reply_ids(tok, f"[TOOL_CALLS] {text}")
    state = engine.grammars.state(tools.grammar(tok))
    for i in ids:
        state.accept(i)
    assert (not state.matcher.is_error() and state.accepting) == (parallel is not False)
    calls = tools.calls([*ids, tok.eos_id], tok)
    assert [json.loads(c.arguments)["a"] for c in calls] == [1, 7]


def test_auto_is_text_or_valid_calls(engine):
    tok = engine.tokenizer
    tools = Tools.parse(TOOLS, "auto", None)
    prompt = tok.encode_chat(CONVERSATIONS["one_turn"], TOOLS)
    outs = engine.generate([prompt] * 12, [SamplingParams(max_tokens=160, temperature=1.0, seed=s,
                                                          grammar=tools.grammar(tok)) for s in range(12)])
    for out in outs:
        calls = tools.calls(out.token_ids, tok)
        if calls:
            for call in calls:
                jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        elif tok.tool_calls_id is None:  # v1: a text reply cannot start with "[" (that would be a call)
            assert not out.text.lstrip(" ").startswith("["), out.text
        else:
            assert out.token_ids[0] != tok.tool_calls_id
    assert len({o.text for o in outs}) > 1


# -- through the server, with the openai client ---------------------------------------------------------------
@pytest.fixture(scope="module", params=["v1", "v3"])
def client(request, tiny_model, v3_model):
    service, loop, server = serve_http(tiny_model if request.param == "v1" else v3_model)
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    c.tokenizer = service.tokenizer  # type: ignore[attr-defined]
    yield c
    server.stop()
    loop.stop()


class Add(pydantic.BaseModel):
    """Adds two numbers."""
    a: int = pydantic.Field(ge=0, le=99)
    b: int = pydantic.Field(ge=0, le=99)
    op: Literal["+", "-"]


def test_openai_tool_calls(client):
    chat = CONVERSATIONS["system"]
    r = client.chat.completions.create(model="tiny", messages=chat, tools=TOOLS, tool_choice="required", seed=0,
                                       max_tokens=160)
    [choice] = r.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    # the client's own parsing: strict pydantic tools, arguments parsed into the model
    r = client.chat.completions.parse(model="tiny", messages=chat, tools=[openai.pydantic_function_tool(Add)],
                                      tool_choice={"type": "function", "function": {"name": "Add"}}, max_tokens=160)
    [call] = r.choices[0].message.tool_calls
    assert isinstance(call.function.parsed_arguments, Add)
    # the calls and their results sent back: the prompt is what the tokenizer makes of them
    followup = [*chat, r.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "42"}]
    r = client.chat.completions.create(model="tiny", messages=followup, tools=[openai.pydantic_function_tool(Add)],
                                       tool_choice="none", max_tokens=4, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(client.tokenizer.encode_chat(followup))  # tool_choice none: tools left out


def test_openai_tool_call_stream(client):
    kw = dict(model="tiny", messages=CONVERSATIONS["one_turn"], tools=TOOLS, max_tokens=160, temperature=0)
    whole = client.chat.completions.create(**kw, tool_choice="required")
    with client.chat.completions.stream(**kw, tool_choice="required") as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    assert ([(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls]
            == [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls])
    # as OpenAI streams them: a call's id and name first, then its arguments in pieces
    chunks = list(client.chat.completions.create(**kw, tool_choice="required", parallel_tool_calls=False,
                                                 stream=True))
    deltas = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name and all(d.id is None for d in deltas[1:])
    assert len(deltas) > 2 and {d.index for d in deltas} == {0}
    jsonschema.validate(json.loads("".join(d.function.arguments for d in deltas)), SCHEMAS[deltas[0].function.name])
    # auto, greedy: the stream holds nothing back from a text reply it can tell apart, and says the same as
    # the whole response, whichever the reply is
    whole = client.chat.completions.create(**kw, tool_choice="auto", n=1, seed=5)
    chunks = list(client.chat.completions.create(**kw, tool_choice="auto", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    if whole.choices[0].message.tool_calls:
        assert chunks[-1].choices[0].finish_reason == "tool_calls" and text == ""
    else:
        assert text == whole.choices[0].message.content and whole.choices[0].finish_reason != "tool_calls"


def test_openai_tool_errors(client):
    chat = CONVERSATIONS["one_turn"]
    for kw, match in [(dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]),
                       "tools.0.function.parameters: invalid JSON schema"),
                      (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}}),
                       "tool_choice: names no tool of this request"),
                      (dict(tools=TOOLS, response_format={"type": "json_object"}),
                       "response_format: cannot be combined with tools"),
                      (dict(messages=[*chat, {"role": "tool", "tool_call_id": "x", "content": "r"}]),
                       "messages[1].role: expected role 'assistant', got 'tool'")]:
        with pytest.raises(openai.BadRequestError, match=re.escape(match)) as e:
            client.chat.completions.create(**{"model": "tiny", "messages": chat, **kw})
        assert e.value.status_code == 400
    r = client.chat.completions.create(model="tiny", messages=chat, max_tokens=3)  # still serving
    assert r.choices[0].finish_reason == "length"
