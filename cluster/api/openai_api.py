"""OpenAI's /v1 routes over one Service: chat completions, completions, and the model list.

Decisions clients can rely on:
- usage.completion_tokens counts every sampled token, the EOS included (it took a decode step; vLLM
  counts it too), so it equals the number of logprob entries. prompt_tokens counts each prompt once,
  whatever n.
- presence/frequency_penalty: only 0. They are additive OpenAI penalties; our sampler has transformers'
  multiplicative `repetition_penalty`, accepted as an extra field (with `top_k`), as vLLM does.
- n > 1 runs n generations; with a seed, choice j samples with seed + j (distinct, and reproducible).
- max_tokens / max_completion_tokens absent: up to the context (also on /v1/completions, where OpenAI
  would stop at 16). The KV cache grows as the reply does (engine.kv_allocation on_demand): a large
  max_tokens reserves nothing up front.
- echo (completions) prepends the prompt text; echo with logprobs is refused (no prompt logprobs).
- Extra OpenAI fields, as vLLM's: top_k, repetition_penalty, ignore_eos.
- response_format: {"type": "text"} (or absent), {"type": "json_object"} (any JSON object) and
  {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}: the schema is enforced whatever
  `strict` says (kernels/structured.py); an invalid schema is a 400 that names the problem.
- tools, tool_choice ("none" | "auto" | "required" | a named function), parallel_tool_calls: kernels/tools.py. A reply
  that calls tools has message.tool_calls (content null) and finish_reason "tool_calls"; each call names an offered
  function and its arguments validate against its parameters schema (the grammar holds the reply to them). A
  stream holds a reply back while it may still be a tool call; a call streams as OpenAI's do: its id and name,
  then its arguments piece by piece (a reply cut by max_tokens mid-call then ends with finish_reason "length").
  Tools with response_format are refused (both constrain the reply). The conversation may carry earlier calls
  (assistant tool_calls) and their results (role "tool", with tool_call_id).
- model: absent, this server's model name, or huggingface_hub's placeholder ("dummy", "tgi"); others are 400.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field
from starlette.exceptions import HTTPException

from cluster.api.http_common import Body, EventStream, close_all, open_all, parse, refuse, sse, stream_error
from cluster.api.service import MAX_STOP, ApiError, InvalidRequest, Service, TokenStream
from kernels.engine import TokenEvent
from kernels.sampling import SamplingParams
from kernels.structured import Grammar
from kernels.tools import CallStream, ToolCall, ToolError, Tools

# The "model" that huggingface_hub's InferenceClient(base_url).chat_completion sends when it knows no model name
# ("dummy"; "tgi" in older versions): TGI ignores the field on its OpenAI routes, so these name no model here.
HF_PLACEHOLDER_MODELS = ("dummy", "tgi")


# -- request bodies ----------------------------------------------------------------------------
class StreamOptions(Body):
    include_usage: bool | None = False


class _OpenAIBody(Body):
    model: str | None = None  # optional, as in vLLM: this server has one model
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(le=1, gt=0)] | None = None
    n: Annotated[int, Field(ge=1, le=8)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    user: str | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # extensions, as in vLLM
    repetition_penalty: Annotated[float, Field(le=10, gt=0)] | None = None
    ignore_eos: bool | None = False
    logit_bias: dict[str, Any] | None = None
    suffix: str | None = None
    best_of: int | None = None
    response_format: Any = None


class ChatBody(_OpenAIBody):
    messages: list[Any]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None


class CompletionBody(_OpenAIBody):
    prompt: Any  # str | list[str] | list[int] | list[list[int]]: checked in _prompts, with clearer messages
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = False


def error_body(e: ApiError) -> dict:
    """`e` in OpenAI's shape: an error response's body, or the last event of a stream that failed."""
    return {"error": {"message": e.message, "type": e.openai_type, "param": e.param, "code": e.code}}


# -- the routes ------------------------------------------------------------------------------
def routes(service: Service) -> APIRouter:
    """/v1/chat/completions, /v1/completions, /v1/models and /v1/models/{id}, serving `service`."""
    router = APIRouter()

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse(request, ChatBody)
        refuse(("top_logprobs", bool(body.top_logprobs) and not body.logprobs, "requires logprobs: true"))
        try:
            tools = Tools.parse(body.tools, body.tool_choice, body.parallel_tool_calls)
        except ToolError as e:
            raise InvalidRequest(f"{e.param}: {e}", e.param) from None
        grammar = tools.grammar(service.tokenizer) if tools else None
        refuse(("response_format", grammar is not None and _grammar(body.response_format) is not None,
                "cannot be combined with tools (both constrain the reply); use tool_choice \"none\""))
        prompt = service.prompt_from_chat(body.messages, tools=list(tools.offered) if tools else None)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = body.top_logprobs if body.logprobs else None
        try:
            jobs = _jobs(service, body, [prompt], max_tokens, param, top, grammar)
        except InvalidRequest as e:  # the service calls a too-long prompt "prompt"; here it is the messages
            if e.param != "prompt":
                raise
            raise InvalidRequest(f"messages: {e.message}", "messages") from None
        return await _respond(service, body, [prompt], jobs, chat=True, logprobs=bool(body.logprobs), tools=tools)

    @router.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse(request, CompletionBody)
        refuse(("echo", bool(body.echo and body.logprobs is not None), "echo with logprobs is not supported"))
        prompts, texts = _prompts(service, body.prompt)
        jobs = _jobs(service, body, prompts, body.max_tokens, "max_tokens", body.logprobs)
        return await _respond(service, body, prompts, jobs, chat=False, logprobs=body.logprobs is not None,
                              echo=texts if body.echo else None)

    @router.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(service)]}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != service.card.id:
            raise HTTPException(404, f"model {model_id!r} does not exist; this server serves {service.card.id!r}")
        return _model_card(service)

    return router


def _model_card(service: Service) -> dict:
    card = service.card
    return {"id": card.id, "object": "model", "created": card.created, "owned_by": "moeray",
            "max_model_len": card.max_model_len}


# -- requests --------------------------------------------------------------------------------
def _prompts(service: Service, prompt: Any) -> tuple[list[list[int]], list[str]]:
    """(prompt ids, prompt texts) for each prompt of str | list[str] | list[int] | list[list[int]]."""
    if isinstance(prompt, str):
        return [service.prompt_from_text(prompt)], [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [service.prompt_from_text(p, f"prompt.{i}") for i, p in enumerate(prompt)], prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        ids = [service.prompt_from_ids(p, f"prompt.{i}") for i, p in enumerate(prompt)]
        return ids, [service.tokenizer.decode(p) for p in ids]
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [service.prompt_from_ids(prompt)], [service.tokenizer.decode(prompt)]
    raise InvalidRequest("prompt must be a non-empty string, list of strings, list of token ids, or list of "
                         "lists of token ids", "prompt")


def _stops(body: _OpenAIBody) -> list[str]:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    refuse(("stop", len(stop) > MAX_STOP, f"at most {MAX_STOP} stop sequences, got {len(stop)}"),
           ("stop", not all(stop), "stop sequences must be non-empty"))
    return stop


def _jobs(service: Service, body: _OpenAIBody, prompts: list[list[int]], max_tokens: int | None, param: str,
          top: int | None, grammar: Grammar | None = None) -> list[tuple[list[int], SamplingParams]]:
    """(prompt ids, sampling params) for each choice: n per prompt, prompt-major. `grammar`: the tools' (else
    response_format's)."""
    service.check_model(None if body.model in HF_PLACEHOLDER_MODELS else body.model)
    refuse(("presence_penalty", bool(body.presence_penalty), "only 0 is supported; use repetition_penalty"),
           ("frequency_penalty", bool(body.frequency_penalty), "only 0 is supported; use repetition_penalty"),
           ("logit_bias", bool(body.logit_bias), "not supported"), ("suffix", bool(body.suffix), "not supported"),
           ("best_of", (body.best_of or 1) > 1, "not supported; use n"))
    n, seed, stop = body.n or 1, body.seed, _stops(body)
    kw = dict(temperature=1.0 if body.temperature is None else body.temperature, top_p=body.top_p or 1.0,
              top_k=body.top_k or 0, repetition_penalty=body.repetition_penalty or 1.0, stop=stop,
              logprobs=top or None, ignore_eos=bool(body.ignore_eos), grammar=grammar or _grammar(body.response_format))
    return [(ids, service.sampling(ids, max_tokens, param, seed=None if seed is None else (seed + j) % 2**63, **kw))
            for ids in prompts for j in range(n)]


def _grammar(response_format: Any) -> Grammar | None:
    """response_format -> the Grammar the output must match (None: free text)."""
    param = "response_format"
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind != "json_schema":
        raise InvalidRequest(f'{param}.type must be "text", "json_object" or "json_schema", got {kind!r}', param)
    spec = response_format.get("json_schema")
    refuse((f"{param}.json_schema", not isinstance(spec, dict), "must be an object with name and schema"))
    refuse((f"{param}.json_schema.name", not isinstance(spec.get("name"), str) or not spec["name"],
            "must be a non-empty string"),
           (f"{param}.json_schema.schema", "schema" not in spec, "is required"))
    return Service.grammar("json_schema", spec["schema"], f"{param}.json_schema.schema")


# -- responses -------------------------------------------------------------------------------
async def _respond(service: Service, body: _OpenAIBody, prompts: list[list[int]],
                   jobs: list[tuple[list[int], SamplingParams]], chat: bool, logprobs: bool,
                   echo: list[str] | None = None, tools: Tools | None = None) -> Response:
    """Runs the jobs (one per choice, prompt-major) and answers in OpenAI's shape, streamed or not."""
    reply = _Reply(service, prompts, await open_all(service, jobs, chat), chat, logprobs, echo, tools)
    if not body.stream:
        return await reply.whole()
    return EventStream(reply.events(include_usage=bool(body.stream_options and body.stream_options.include_usage)),
                       reply.streams)


class _Choice:
    """One generation's output as its events arrive. `add` returns the text to send: an echoed prompt
    goes before the first delta."""

    def __init__(self, index: int, prefix: str = ""):
        self.index, self.pending = index, prefix
        self.text = ""
        self.events: list[TokenEvent] = []
        self.offsets: list[int] = []  # where each event's text starts in self.text: completions' text_offset

    def add(self, ev: TokenEvent) -> str:
        delta, self.pending = self.pending + ev.text, ""
        self.offsets.append(len(self.text) + len(delta) - len(ev.text))
        self.events.append(ev)
        self.text += delta
        return delta

    @property
    def finish_reason(self) -> str | None:
        return self.events[-1].finish_reason if self.events else None

    @property
    def first(self) -> int | None:
        """The first generated token (None before it)."""
        return self.events[0].token if self.events else None


class _Reply:
    """One response's choices, one per open stream (prompt-major, `echo` holding each prompt's text), and
    the fields that the response, or each chunk of a stream, starts with. `tools`: a chat request's tools,
    whose calls a reply may make."""

    def __init__(self, service: Service, prompts: list[list[int]], streams: list[TokenStream], chat: bool,
                 logprobs: bool, echo: list[str] | None, tools: Tools | None = None):
        self.service, self.prompts, self.streams, self.chat, self.logprobs = service, prompts, streams, chat, logprobs
        self.tools = tools if chat else None
        per_prompt = len(streams) // len(prompts)
        self.choices = [_Choice(i, prefix=echo[i // per_prompt] if echo else "") for i in range(len(streams))]
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        self.head = {"id": rid, "object": obj, "created": created, "model": service.card.id}

    async def whole(self) -> JSONResponse:
        chat = self.chat
        try:
            for s, c in zip(self.streams, self.choices, strict=True):  # a choice per stream
                async for ev in s:
                    c.add(ev)
        finally:
            await close_all(self.streams)
        out = []
        for c in self.choices:
            calls = self.tool_calls(c)
            message = ({"role": "assistant", "content": None, "tool_calls": [k.openai() for k in calls]} if calls
                       else {"role": "assistant", "content": c.text})
            out.append({"index": c.index, **({"message": message} if chat else {"text": c.text}),
                        "logprobs": self.logprobs_of(c.events, c.offsets),
                        "finish_reason": "tool_calls" if calls else c.finish_reason})
        return JSONResponse({**self.head, "choices": out, "usage": self.usage(), "system_fingerprint": None})

    async def events(self, include_usage: bool) -> AsyncGenerator[str, None]:
        chat = self.chat
        head = {**self.head, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if include_usage else {}

        def chunk(c: _Choice, delta: dict | str, evs: list[TokenEvent] | None = None, finish: str | None = None) -> str:
            choice = {"index": c.index, ("delta" if chat else "text"): delta,
                      "logprobs": self.logprobs_of(evs, c.offsets[-len(evs):]) if evs else None,
                      "finish_reason": finish or (evs[-1].finish_reason if evs else None)}
            return sse({**head, "choices": [choice], **extra})

        try:
            for s, c in zip(self.streams, self.choices, strict=True):  # a choice per stream
                if chat:
                    yield chunk(c, {"role": "assistant", "content": ""})
                holding, held, pending = self.may_call(c), [], ""  # a reply that may be tool calls is held back
                calls = CallStream()
                async for ev in s:
                    text, evs = c.add(ev), [ev]
                    if holding:
                        held.append(ev)
                        pending += text
                        body = self.call_body(c)
                        if body is not None:  # tool calls: each call's name, then its arguments as they come
                            deltas = calls.feed(body)
                            if deltas or ev.finish_reason:
                                done = ev.finish_reason == "stop" and calls.state == "done"
                                yield chunk(c, {"tool_calls": deltas} if deltas else {}, held,
                                            "tool_calls" if done else ev.finish_reason)
                                held = []
                            continue
                        holding = self.may_call(c)
                        if holding and not ev.finish_reason:
                            continue
                        text, evs, held, pending = pending, held, [], ""  # text after all: send what was held
                    delta = {"content": text} if text or not ev.finish_reason else {}
                    yield chunk(c, delta if chat else text, evs)
            if include_usage:
                yield sse({**head, "choices": [], "usage": self.usage()})
        except Exception as e:  # the backend failed mid-stream: headers are gone, so say it in the stream
            yield sse(error_body(stream_error(e)))
        finally:
            await close_all(self.streams)
        yield "data: [DONE]\n\n"

    def may_call(self, c: _Choice) -> bool:
        """Can this choice's reply, as far as it has come, still turn out to be tool calls?"""
        return self.tools is not None and self.tools.may_call(c.first, c.text, self.service.tokenizer)

    def call_body(self, c: _Choice) -> str | None:
        """The calls' JSON so far, if this choice's reply is known to be tool calls (kernels.tools.Tools.body)."""
        return None if self.tools is None else self.tools.body(c.first, c.text, self.service.tokenizer)

    def tool_calls(self, c: _Choice) -> list[ToolCall] | None:
        """The tool calls a finished choice makes; None if its reply is text."""
        if self.tools is None or c.finish_reason != "stop":
            return None
        return self.tools.calls([ev.token for ev in c.events], self.service.tokenizer)

    def usage(self) -> dict:
        p, c = sum(map(len, self.prompts)), sum(len(ch.events) for ch in self.choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def logprobs_of(self, events: list[TokenEvent], offsets: list[int]) -> dict | None:
        if not self.logprobs:
            return None
        if self.chat:
            return {"content": [{**self._entry(ev.token, ev.logprob),
                                 "top_logprobs": [self._entry(t, lp) for t, lp in ev.top_logprobs or []]}
                                for ev in events],
                    "refusal": None}
        text = self.service.token_text
        return {"tokens": [text(ev.token) for ev in events], "token_logprobs": [ev.logprob for ev in events],
                "top_logprobs": [{text(t): lp for t, lp in [*(ev.top_logprobs or []), (ev.token, ev.logprob)]}
                                 for ev in events],
                "text_offset": offsets}

    def _entry(self, t: int, lp: float) -> dict:
        text = self.service.token_text(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
