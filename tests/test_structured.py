"""Structured output in the single-process engine, on the tiny random model with its trained tokenizer: its
text is random, so every output that parses and validates against its schema is the grammar's doing."""

import json
import re
from typing import Annotated, Literal

import jsonschema
import openai
import pydantic
import pytest
import torch
from huggingface_hub import InferenceClient
from huggingface_hub.errors import TextGenerationError
from servers import GrpcServer, serve_http
from test_engine import LosingExecutor

from cluster.rpc import moeray_pb2 as pb
from kernels.engine import Engine, EngineConfig, Request
from kernels.sampling import SamplingParams
from kernels.structured import Grammar, constrain

# Bounded strings, numbers and arrays: the random model would write an unbounded string until max_tokens.
NAME = {"type": "string", "maxLength": 6}
SCHEMAS = {
    "object": {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 1,
              "maxItems": 4},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                              "shade": {"type": "string", "enum": ["light", "dark"]}},
             "required": ["color", "shade"], "additionalProperties": False},
    "nested": {"type": "object", "additionalProperties": False, "required": ["user", "ok"], "properties": {
        "user": {"type": "object", "additionalProperties": False, "required": ["id", "tags"], "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}},
        "ok": {"type": "boolean"}}},
    "optional": {"type": "object", "additionalProperties": False, "required": ["id"],
                 "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}, "note": NAME,
                                "flag": {"type": "boolean"}}},
}
# every sampling path: greedy, temperature, top-k, top-p, repetition penalty, with and without logprobs
MODES = [dict(temperature=0), dict(temperature=1.0, seed=1, logprobs=3), dict(temperature=1.5, top_k=50, seed=2),
         dict(temperature=0.8, top_p=0.9, seed=3, logprobs=0), dict(temperature=0, repetition_penalty=1.3, logprobs=1)]
MAX = 96  # above the longest output any of the schemas allows, in this vocabulary's tokens


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine.from_dir(tiny_model)


def prompt(engine, i=0):
    return engine.tokenizer.encode(["Write JSON:", "The answer is", "Once upon a time", "Q: what?"][i % 4])


def test_every_output_validates_against_its_schema(engine):
    """Each schema, on every sampling path, in one batch: every output stops at EOS (allowed only where the
    JSON is complete) and validates."""
    cases = [(name, mode) for name in SCHEMAS for mode in MODES]
    params = [SamplingParams(max_tokens=MAX, grammar=Grammar.json_schema(SCHEMAS[name]), **mode)
              for name, mode in cases]
    outs = engine.generate([prompt(engine, i) for i in range(len(cases))], params)
    for (name, mode), out in zip(cases, outs, strict=True):
        assert (out.finish_reason, out.stop_reason) == ("stop", engine.args.eos_id), (name, mode, out.text)
        jsonschema.validate(json.loads(out.text), SCHEMAS[name])
        assert all(lp > float("-inf") for lp in out.logprobs)
    assert len({o.text for o in outs}) > len(SCHEMAS)  # random text indeed: the modes differ


def test_regex_and_json_object(engine):
    regex = r"(yes|no), [0-9]{2,3}!"
    outs = engine.generate([prompt(engine, i) for i in range(3)],
                           [SamplingParams(max_tokens=MAX, temperature=1.0, seed=i, grammar=Grammar.regex(regex))
                            for i in range(3)])
    for out in outs:
        assert out.finish_reason == "stop" and re.fullmatch(regex, out.text), out.text
    # JSON mode: any object. Unbounded keys and strings, so a random model may not finish: what it wrote is
    # then where an object starts
    [out] = engine.generate([prompt(engine)], SamplingParams(max_tokens=MAX, temperature=0,
                                                             grammar=Grammar.json_object()))
    assert out.text.startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)


def test_logprobs_are_of_the_masked_distribution(engine):
    """A regex of one digit allows only the digit tokens (pieces and byte-fallback pieces): the reported top
    logprobs are of the distribution over them alone, so the probabilities of the first token's top 20 add up
    to 1 (the model's own distribution puts most of its mass elsewhere)."""
    tok = engine.tokenizer
    digits = [i for i in range(tok.vocab_size)
              if tok.decode([i]).strip() in list("0123456789") and not tok.id_to_piece(i).startswith("\u2581")]
    assert 10 <= len(digits) <= 20
    for temperature in (0, 1.0):
        params = SamplingParams(max_tokens=4, temperature=temperature, seed=0, logprobs=20,
                                grammar=Grammar.regex("[0-9]"))
        [out] = engine.generate([prompt(engine)], params)
        top = out.top_logprobs[0]
        assert {t for t, _ in top} == set(digits)
        assert sum(torch.tensor([lp for _, lp in top]).exp()) == pytest.approx(1, abs=1e-5)
        assert out.token_ids[0] in digits and out.logprobs[0] == pytest.approx(dict(top)[out.token_ids[0]])
        assert out.token_ids[1:] == [engine.args.eos_id] and out.finish_reason == "stop"
    [raw] = engine.generate([prompt(engine)], SamplingParams(max_tokens=1, temperature=0, logprobs=20))
    assert sum(torch.tensor([lp for _, lp in raw.top_logprobs[0] if _ in digits]).exp()) < 0.5


def test_unconstrained_requests_in_the_batch_are_unchanged(engine):
    """Constrained and unconstrained requests in one batch: the unconstrained ones give the tokens they give
    alone, greedy and seeded, and the same logprobs (to float rounding: a batch of another size sums in
    another order)."""
    free = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2),
            SamplingParams(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True, logprobs=0)]
    alone = engine.generate([prompt(engine, 0), prompt(engine, 1)], free)
    grammar = Grammar.json_schema(SCHEMAS["nested"])
    mixed = engine.generate([prompt(engine, 0), prompt(engine, 2), prompt(engine, 1), prompt(engine, 3)],
                            [free[0], SamplingParams(max_tokens=MAX, temperature=1.0, seed=1, grammar=grammar),
                             free[1], SamplingParams(max_tokens=MAX, temperature=0, grammar=grammar)])
    for a, m in zip(alone, [mixed[0], mixed[2]], strict=True):
        assert m.token_ids == a.token_ids
        ranked = [[[t for t, _ in top or []] for top in c.top_logprobs] for c in (m, a)]
        assert ranked[0] == ranked[1]
        torch.testing.assert_close(torch.tensor(m.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=0)
    for m in (mixed[1], mixed[3]):
        jsonschema.validate(json.loads(m.text), SCHEMAS["nested"])


def test_max_tokens_mid_json_is_length_and_ignore_eos_still_stops(engine):
    grammar = Grammar.json_schema(SCHEMAS["nested"])
    [cut] = engine.generate([prompt(engine)], SamplingParams(max_tokens=5, temperature=0, grammar=grammar))
    assert cut.finish_reason == "length" and len(cut.token_ids) == 5 and cut.text.startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.text)
    [full] = engine.generate([prompt(engine)], SamplingParams(max_tokens=MAX, temperature=0, grammar=grammar,
                                                              ignore_eos=True))
    assert full.token_ids[:5] == cut.token_ids and full.text.startswith(cut.text) and full.finish_reason == "stop"
    jsonschema.validate(json.loads(full.text), SCHEMAS["nested"])


def test_grammar_survives_a_lost_kv_cache(tiny_model, engine):
    """CacheLost mid-prefill and mid-decode: the grammar state is not in the cache, and the output is unchanged."""
    params = [SamplingParams(max_tokens=MAX, temperature=t, seed=4, grammar=Grammar.json_schema(SCHEMAS[name]))
              for name, t in (("nested", 0), ("object", 1.0), ("array", 0.7))]
    ps = [prompt(engine, i) for i in range(3)]
    expected = engine.generate(ps, params)
    lossy = Engine.from_dir(tiny_model, EngineConfig(max_num_batched_tokens=8, max_num_seqs=3))
    lossy.executor = LosingExecutor(lossy.executor, lose_at={2, 9, 20})
    got = lossy.generate(ps, params)
    assert lossy.recomputes == 3
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]


@pytest.mark.parametrize("make, message", [
    (lambda: Grammar.json_schema({"type": "strin"}), "invalid JSON schema: Invalid type: strin"),
    (lambda: Grammar.json_schema({"$ref": "#/defs/missing"}), "invalid JSON schema: Pointer '/defs/missing'"),
    (lambda: Grammar.json_schema({"type": "string", "pattern": "(?=a)"}), "look-around"),
    (lambda: Grammar.json_schema([1, 2]), "a JSON schema must be an object, got list"),
    (lambda: Grammar("json_schema", "{not json"), "invalid JSON schema"),
    (lambda: Grammar.regex("a(b"), "invalid regex"),
    (lambda: Grammar.regex(None), "grammar value must be a string"),
    (lambda: Grammar("ebnf", "start: /a/"), "grammar kind must be one of"),
    (lambda: Grammar("lark", "start: b"), "invalid grammar"),
])
def test_invalid_grammars_are_refused_naming_the_problem(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?").replace("$", r"\$")):
        make()


def test_a_model_without_tokenizer_refuses_a_grammar(hf_mixtral):
    engine = Engine.from_dir(hf_mixtral)
    with pytest.raises(ValueError, match="structured output needs a tokenizer"):
        engine.add_request(Request("r", [1, 2, 3], SamplingParams(grammar=Grammar.json_object())))


# -- through the servers, with the real clients ------------------------------------------------------------
@pytest.fixture(scope="module")
def http(tiny_model):
    service, loop, server = serve_http(tiny_model)
    yield server.url
    server.stop()
    loop.stop()


@pytest.fixture(scope="module")
def grpc_server(tiny_model):
    s = GrpcServer(tiny_model, EngineConfig(max_num_seqs=4))
    yield s
    s.close()


class Person(pydantic.BaseModel):  # what openai's .parse() turns into a strict json_schema response_format
    name: Annotated[str, pydantic.StringConstraints(max_length=6)]
    color: Literal["red", "green", "blue"]
    tags: Annotated[list[bool], pydantic.Field(max_length=3)]


def test_openai_response_format(http):
    client = openai.OpenAI(base_url=f"{http}/v1", api_key="x")
    chat = [{"role": "user", "content": "Who?"}]
    for seed in range(2):
        r = client.chat.completions.parse(model="tiny", messages=chat, max_tokens=MAX, seed=seed,
                                          response_format=Person)
        assert r.choices[0].finish_reason == "stop" and isinstance(r.choices[0].message.parsed, Person)
    schema = {"name": "nested", "schema": SCHEMAS["nested"], "strict": True}
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=chat, max_tokens=MAX, temperature=0, stream=True,
        response_format={"type": "json_schema", "json_schema": schema}))
    jsonschema.validate(json.loads(text), SCHEMAS["nested"])
    r = client.completions.create(model="tiny", prompt="JSON:", max_tokens=MAX, temperature=0, n=2, seed=3,
                                  extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                      "name": "enum", "schema": SCHEMAS["enum"]}}})
    for c in r.choices:
        jsonschema.validate(json.loads(c.text), SCHEMAS["enum"])
    with pytest.raises(openai.BadRequestError, match="response_format.json_schema.schema: invalid JSON schema"):
        client.chat.completions.create(model="tiny", messages=chat, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    # JSON mode: any object; the random model's unbounded keys may not end, so it says only how the text starts
    r = client.chat.completions.create(model="tiny", messages=chat, max_tokens=8, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")


def test_tgi_grammar(http):
    client = InferenceClient(http)
    for stream in (False, True):
        out = client.text_generation("JSON:", max_new_tokens=MAX, seed=1, do_sample=True, stream=stream,
                                     grammar={"type": "json", "value": SCHEMAS["object"]})
        jsonschema.validate(json.loads(out if not stream else "".join(out)), SCHEMAS["object"])
    out = client.text_generation("Answer:", max_new_tokens=MAX, grammar={"type": "regex", "value": "(yes|no)!"})
    assert out in ("yes!", "no!")
    with pytest.raises(TextGenerationError, match="invalid regex"):
        client.text_generation("Answer:", grammar={"type": "regex", "value": "(yes"})


def test_grpc_grammar(grpc_server):
    params = pb.SamplingParameters(max_tokens=MAX, temperature=0.9, seed=2, json_schema=json.dumps(SCHEMAS["array"]))
    request = pb.GenerateRequest(text="Numbers:", params=params)
    unary = grpc_server.stub.Generate(request)
    streamed = "".join(m.text for m in grpc_server.stub.GenerateStream(request))
    assert unary.text == streamed and unary.finish_reason == pb.FINISH_REASON_STOP
    jsonschema.validate(json.loads(unary.text), SCHEMAS["array"])
    regex = pb.GenerateRequest(text="Code:", params=pb.SamplingParameters(max_tokens=MAX, regex="[A-Z]{3}-[0-9]{2}"))
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", grpc_server.stub.Generate(regex).text)


def test_a_matcher_in_error_allows_only_eos(engine):
    """Never reached by the engine (it feeds a matcher only tokens its mask allowed), but if llguidance ever
    errs, the sequence must end, not sample from an empty distribution (NaN for the whole batch)."""
    state = engine.grammars.state(Grammar.regex("[0-9]+"))
    state.accept(engine.tokenizer.encode("x", bos=False)[-1])  # forbidden: the matcher is now in error
    logits = torch.zeros(2, engine.args.vocab_size)
    constrain(logits, [state, None])
    assert logits[0].isfinite().nonzero().flatten().tolist() == [engine.args.eos_id]
    assert logits[1].eq(0).all()
