"""The HTTP API over one Service: OpenAI's /v1 routes, Hugging Face TGI's routes, /health and /metrics.

Only wire formats live here; prompts, limits, errors and the token stream come from cluster/service.py.
Every generation is opened (its first token awaited) before a response starts, so a bad or refused
request is an HTTP status and an error body, never a broken stream.

Decisions clients can rely on:
- usage.completion_tokens counts every sampled token, the EOS included (it took a decode step; vLLM
  counts it too), so it equals the number of logprob entries. prompt_tokens counts each prompt once,
  whatever n.
- presence/frequency_penalty: only 0. They are additive OpenAI penalties; our sampler has transformers'
  multiplicative `repetition_penalty`, accepted as an extra field (with `top_k`), as vLLM does.
- n > 1 runs n generations; with a seed, choice j samples with seed + j (distinct, and reproducible).
- max_tokens / max_completion_tokens absent: up to the context (also on /v1/completions, where OpenAI
  would stop at 16). Note the engine reserves KV cache for prompt + max_tokens when it admits a request.
- echo (completions) prepends the prompt text; echo with logprobs is refused (no prompt logprobs).
- Extra OpenAI fields, as vLLM's: top_k, repetition_penalty, ignore_eos.
- response_format: only absent, null or {"type": "text"}; JSON modes are refused (400), not ignored.
- model: absent, this server's model name, or huggingface_hub's placeholder ("dummy", "tgi"); others are 400.
- NaN and Infinity (which Python's json writes) are refused in every number field.
- temperature below 1e-5 decodes greedily (vLLM's rule; smaller ones overflow the sampler);
  repetition_penalty must be >= 0.01 (kernels/sampling.py) and stop strings at most 512 characters (cluster/service.py).
- With an API key (Service(api_key=...)), every route but /health needs `Authorization: Bearer <key>`,
  checked before the body is read; 401 otherwise, in the route's error shape. Bodies over 16 MiB: 413.
- TGI: generated_text keeps the stop sequence that ended it, as TGI does; when sampling without a
  seed, one is drawn here so `details.seed` can report it; `truncate` keeps the last N prompt tokens;
  stream events count `index` from 1; best_of > 1, decoder_input_details, watermark, grammar, typical_p
  and adapters are refused.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from cluster.service import (MAX_REQUEST_BYTES, MAX_STOP, ApiError, InvalidRequest, PayloadTooLarge, Service,
                             TokenStream, Unauthorized, Unavailable, reason)
from kernels.engine import TokenEvent
from kernels.sampling import SamplingParams

TGI_PATHS = ("/", "/generate", "/generate_stream")
# Routes that answer without the API key. /health: load balancers and Serve probe it with no credentials,
# and it returns no data. /metrics is NOT open: its per-expert token counts and request rates describe the
# traffic, and Prometheus sends the key natively (scrape_config `authorization: {credentials: <key>}`).
# FastAPI's own /docs, /redoc and /openapi.json stay open too: they describe the public API and run nothing.
OPEN_PATHS = ("/health",)
# The "model" that huggingface_hub's InferenceClient(base_url).chat_completion sends when it knows no model name
# ("dummy"; "tgi" in older versions): TGI ignores the field on its OpenAI routes, so these name no model here.
HF_PLACEHOLDER_MODELS = ("dummy", "tgi")


# -- request bodies ----------------------------------------------------------------------------
def _opt(kind: type = float, **limits: float) -> Any:
    """An optional JSON number within `limits` (ge, le, gt)."""
    return Annotated[kind, Field(**limits)] | None


class _Body(BaseModel):
    """JSON types as sent (no "1" for 1, no 1 for true); no NaN or Infinity (Python's json writes them, and a NaN
    fails a range check with a message about the range); unknown fields ignored, as OpenAI and TGI do."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = False


class _OpenAIBody(_Body):
    model: str | None = None  # optional, as in vLLM: this server has one model
    max_tokens: _opt(int, ge=1) = None
    temperature: _opt(ge=0, le=2) = None
    top_p: _opt(le=1, gt=0) = None
    n: _opt(int, ge=1, le=8) = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: _opt(ge=-2, le=2) = None
    frequency_penalty: _opt(ge=-2, le=2) = None
    user: str | None = None
    top_k: _opt(int, ge=0) = None  # extensions, as in vLLM
    repetition_penalty: _opt(le=10, gt=0) = None
    ignore_eos: bool | None = False
    logit_bias: dict[str, Any] | None = None
    suffix: str | None = None
    best_of: int | None = None
    response_format: Any = None


class ChatBody(_OpenAIBody):
    messages: list[Any]
    max_completion_tokens: _opt(int, ge=1) = None
    logprobs: bool | None = False
    top_logprobs: _opt(int, ge=0, le=20) = None
    tools: list[Any] | None = None


class CompletionBody(_OpenAIBody):
    prompt: Any  # str | list[str] | list[int] | list[list[int]]: checked in _prompts, with clearer messages
    logprobs: _opt(int, ge=0, le=5) = None
    echo: bool | None = False


class TgiParameters(_Body):
    max_new_tokens: _opt(int, ge=1) = 20  # TGI's default; null means "up to the context"
    temperature: _opt(gt=0) = None
    top_p: _opt(le=1, gt=0) = None
    top_k: _opt(int, gt=0) = None
    repetition_penalty: _opt(gt=0) = None
    do_sample: bool | None = False
    seed: _opt(int, ge=0, le=2**64 - 1) = None  # TGI's u64
    stop: Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    details: bool | None = False
    decoder_input_details: bool | None = False
    return_full_text: bool | None = False
    truncate: _opt(int, ge=1) = None
    top_n_tokens: _opt(int, ge=0, le=5) = None
    best_of: _opt(int, ge=1) = None
    frequency_penalty: float | None = None
    typical_p: float | None = None
    watermark: bool | None = False
    grammar: Any = None
    adapter_id: str | None = None


class TgiBody(_Body):
    inputs: str
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    stream: bool | None = False


B = TypeVar("B", bound=BaseModel)
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}  # pydantic names union members in error locations


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if isinstance(p, int) or (p.isidentifier() and p not in _UNION_TAGS))


async def _body(request: Request, limit: int = MAX_REQUEST_BYTES) -> bytes:
    """The request body, refused as soon as it is known to exceed `limit` bytes (by its Content-Length, or
    while it arrives), so a hostile client cannot make this process hold an arbitrarily large one."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body has {declared} bytes, over the limit of {limit}", "body")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes", "body")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, model: type[B]) -> B:
    """The body as `model`, or InvalidRequest naming the field (or the body, for bad bytes / JSON)."""
    raw = await _body(request)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"the request body is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})",
                             "body") from None
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise _invalid(e.errors()) from None


def _invalid(errors: list[dict]) -> InvalidRequest:
    msgs = {}
    for err in errors:
        name = _field(err["loc"])
        msgs.setdefault(f"{name or 'request body'}: {err['msg']}", name)
    first = next(iter(msgs.values()), "") or "body"
    return InvalidRequest("; ".join(list(msgs)[:4]), first)


def _refuse(*checks: tuple[str, bool, str]) -> None:
    for name, bad, why in checks:
        if bad:
            raise InvalidRequest(f"{name}: {why}", name)


# -- generations -----------------------------------------------------------------------------
async def _open_all(service: Service, jobs: list[tuple[list[int], SamplingParams]],
                    chat: bool = False) -> list[TokenStream]:
    """All of a request's generations, or none: if one fails (overload, bad ids), the others are closed."""
    streams: list[TokenStream] = []
    try:
        for ids, params in jobs:
            streams.append(await service.open_stream(ids, params, chat=chat))
    except BaseException:
        await _close(streams)
        raise
    return streams


async def _close(streams: list[TokenStream]) -> None:
    for s in streams:
        await s.aclose()


class _Choice:
    """One generation's output as its events arrive. `add` returns the text to send: an echoed prompt
    goes before the first delta."""

    def __init__(self, index: int, prefix: str = ""):
        self.index, self.pending = index, prefix
        self.text, self.events = "", []
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


def _sse(data: Any, prefix: str = "data: ") -> str:
    return f"{prefix}{json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _EventStream(StreamingResponse):
    """An SSE response that closes its generator however it ends. On a client disconnect Starlette
    cancels the sending task, which can leave the generator suspended at a `yield`; closing it runs its
    `finally`, which closes the service streams, which abort their generations and free the KV cache."""

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class PeerCheck:
    """ASGI middleware: with no API key, a client on another machine is refused on every path (/health, /docs
    and unknown ones too), before routing, so nothing else answers it (Service.check_peer)."""

    def __init__(self, app, service: Service, refuse):
        self.app, self.service, self.refuse = app, service, refuse

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            client = scope.get("client")
            try:
                self.service.check_peer(client[0] if client else None)
            except ApiError as e:
                await self.refuse(Request(scope), e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- the app -------------------------------------------------------------------------------
def build_http_app(service: Service) -> FastAPI:
    """The FastAPI app serving `service` (a Serve ingress wraps it; tests run it under uvicorn)."""

    async def api_key(request: Request) -> None:
        """Every route's first dependency: runs after routing (so a refusal has the route's error shape)
        and before the handler reads the body."""
        if request.scope["route"].path not in OPEN_PATHS:
            service.authorize(request.headers.get("authorization"))

    app = FastAPI(title="moeray", description="OpenAI and TGI APIs over a Mixtral MoE model",
                  dependencies=[Depends(api_key)])
    tok, card = service.tokenizer, service.card
    healthy = False

    def error_response(request: Request, e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(e, Unauthorized) else None
        route = getattr(request.scope.get("route"), "path", None)  # the route, whatever the mount prefix
        if (route or request.url.path.removeprefix(request.scope.get("root_path", ""))) in TGI_PATHS:
            return JSONResponse({"error": e.message, "error_type": e.tgi_type},
                                422 if e.http_status == 400 else e.http_status, headers)
        return JSONResponse({"error": {"message": e.message, "type": e.openai_type, "param": e.param, "code": e.code}},
                            e.http_status, headers)

    app.add_middleware(PeerCheck, service=service, refuse=error_response)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(request, e)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(request, _invalid([{**err, "loc": err["loc"][1:]} for err in e.errors()]))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, e: HTTPException) -> JSONResponse:
        err = InvalidRequest(str(e.detail)) if e.status_code < 500 else ApiError(str(e.detail))
        err.http_status = e.status_code
        return error_response(request, err)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, e: Exception) -> JSONResponse:
        return error_response(request, ApiError(f"internal error: {type(e).__name__}: {reason(e)}"))

    def token_entry(t: int, lp: float) -> dict:
        text = service.token_text(t)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    # -- OpenAI ------------------------------------------------------------------------------
    def stops(body: _OpenAIBody) -> list[str]:
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        _refuse(("stop", len(stop) > MAX_STOP, f"at most {MAX_STOP} stop sequences, got {len(stop)}"),
                ("stop", not all(stop), "stop sequences must be non-empty"))
        return stop

    def openai_jobs(body: _OpenAIBody, prompts: list[list[int]], max_tokens: int | None, param: str,
                    top: int | None) -> list[tuple[list[int], SamplingParams]]:
        service.check_model(None if body.model in HF_PLACEHOLDER_MODELS else body.model)
        _refuse(("presence_penalty", bool(body.presence_penalty), "only 0 is supported; use repetition_penalty"),
                ("frequency_penalty", bool(body.frequency_penalty), "only 0 is supported; use repetition_penalty"),
                ("logit_bias", bool(body.logit_bias), "not supported"), ("suffix", bool(body.suffix), "not supported"),
                ("best_of", (body.best_of or 1) > 1, "not supported; use n"),
                ("response_format", body.response_format not in (None, {"type": "text"}),
                 'structured output is not supported; only {"type": "text"}'))
        n, seed, stop = body.n or 1, body.seed, stops(body)
        kw = dict(temperature=1.0 if body.temperature is None else body.temperature, top_p=body.top_p or 1.0,
                  top_k=body.top_k or 0, repetition_penalty=body.repetition_penalty or 1.0, stop=stop,
                  logprobs=top or None, ignore_eos=bool(body.ignore_eos))
        return [(ids, service.sampling(ids, max_tokens, param, seed=None if seed is None else (seed + j) % 2**63, **kw))
                for ids in prompts for j in range(n)]

    def usage(prompts: list[list[int]], choices: list[_Choice]) -> dict:
        p, c = sum(map(len, prompts)), sum(len(ch.events) for ch in choices)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def chat_logprobs(events: list[TokenEvent]) -> dict:
        return {"content": [{**token_entry(ev.token, ev.logprob),
                             "top_logprobs": [token_entry(t, lp) for t, lp in ev.top_logprobs or []]} for ev in events],
                "refusal": None}

    def text_logprobs(events: list[TokenEvent], offsets: list[int]) -> dict:
        return {"tokens": [service.token_text(ev.token) for ev in events],
                "token_logprobs": [ev.logprob for ev in events],
                "top_logprobs": [{service.token_text(t): lp for t, lp in [*(ev.top_logprobs or []),
                                                                          (ev.token, ev.logprob)]} for ev in events],
                "text_offset": offsets}

    async def openai_response(body: _OpenAIBody, prompts: list[list[int]], jobs, chat: bool,
                              logprobs: bool, echo: list[str] | None = None) -> Response:
        """Runs the jobs (one per choice, prompt-major) and answers in OpenAI's shape, streamed or not."""
        streams = await _open_all(service, jobs, chat)
        per_prompt = len(jobs) // len(prompts)
        choices = [_Choice(i, prefix=echo[i // per_prompt] if echo else "") for i in range(len(jobs))]
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        head = {"id": rid, "object": obj, "created": created, "model": card.id}

        def logprobs_of(events: list[TokenEvent], offsets: list[int]) -> dict | None:
            if not logprobs:
                return None
            return chat_logprobs(events) if chat else text_logprobs(events, offsets)

        if not body.stream:
            try:
                for s, c in zip(streams, choices):
                    async for ev in s:
                        c.add(ev)
            finally:
                await _close(streams)
            out = [{"index": c.index, **({"message": {"role": "assistant", "content": c.text}} if chat
                                         else {"text": c.text}),
                    "logprobs": logprobs_of(c.events, c.offsets), "finish_reason": c.finish_reason} for c in choices]
            return JSONResponse({**head, "choices": out, "usage": usage(prompts, choices), "system_fingerprint": None})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        extra = {"usage": None} if include_usage else {}

        def chunk(c: _Choice, delta: dict | str, ev: TokenEvent | None = None) -> str:
            choice = {"index": c.index, ("delta" if chat else "text"): delta,
                      "logprobs": logprobs_of([ev], c.offsets[-1:]) if ev else None,
                      "finish_reason": ev.finish_reason if ev else None}
            return _sse({**head, "choices": [choice], **extra})

        async def events() -> AsyncIterator[str]:
            try:
                for s, c in zip(streams, choices):
                    if chat:
                        yield chunk(c, {"role": "assistant", "content": ""})
                    async for ev in s:
                        text = c.add(ev)
                        delta = {"content": text} if text or not ev.finish_reason else {}
                        yield chunk(c, delta if chat else text, ev)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(prompts, choices)})
            except ApiError as e:
                yield _sse({"error": {"message": e.message, "type": e.openai_type, "param": e.param, "code": e.code}})
            except Exception as e:  # the backend failed mid-stream: headers are gone, so say it in the stream
                yield _sse({"error": {"message": f"generation failed: {reason(e)}", "type": "server_error",
                                      "param": None, "code": None}})
            finally:
                await _close(streams)
            yield "data: [DONE]\n\n"

        return _EventStream(events())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parse(request, ChatBody)
        _refuse(("tools", bool(body.tools), "tool calls are not supported"),
                ("top_logprobs", bool(body.top_logprobs) and not body.logprobs, "requires logprobs: true"))
        prompt = service.prompt_from_chat(body.messages)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = body.top_logprobs if body.logprobs else None
        try:
            jobs = openai_jobs(body, [prompt], max_tokens, param, top)
        except InvalidRequest as e:  # the service calls a too-long prompt "prompt"; here it is the messages
            if e.param != "prompt":
                raise
            raise InvalidRequest(f"messages: {e.message}", "messages") from None
        return await openai_response(body, [prompt], jobs, chat=True, logprobs=bool(body.logprobs))

    def prompts_of(prompt: Any) -> tuple[list[list[int]], list[str]]:
        """(prompt ids, prompt texts) for each prompt of str | list[str] | list[int] | list[list[int]]."""
        if isinstance(prompt, str):
            return [service.prompt_from_text(prompt)], [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [service.prompt_from_text(p, f"prompt.{i}") for i, p in enumerate(prompt)], prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            ids = [service.prompt_from_ids(p, f"prompt.{i}") for i, p in enumerate(prompt)]
            return ids, [tok.decode(p) for p in ids]
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [service.prompt_from_ids(prompt)], [tok.decode(prompt)]
        raise InvalidRequest("prompt must be a non-empty string, list of strings, list of token ids, or list of "
                             "lists of token ids", "prompt")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse(request, CompletionBody)
        _refuse(("echo", bool(body.echo and body.logprobs is not None), "echo with logprobs is not supported"))
        prompts, texts = prompts_of(body.prompt)
        jobs = openai_jobs(body, prompts, body.max_tokens, "max_tokens", body.logprobs)
        return await openai_response(body, prompts, jobs, chat=False, logprobs=body.logprobs is not None,
                                     echo=texts if body.echo else None)

    def model_card() -> dict:
        return {"id": card.id, "object": "model", "created": card.created, "owned_by": "moeray",
                "max_model_len": card.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != card.id:
            raise HTTPException(404, f"model {model_id!r} does not exist; this server serves {card.id!r}")
        return model_card()

    # -- TGI ---------------------------------------------------------------------------------
    def tgi_token(t: int, lp: float) -> dict:
        return {"id": t, "text": service.token_text(t), "logprob": lp,
                "special": not 0 <= t < tok.vocab_size or tok.is_special(t)}

    def tgi_finish(ev: TokenEvent) -> str:
        if ev.finish_reason == "length":
            return "length"
        return "stop_sequence" if isinstance(ev.stop_reason, str) else "eos_token"

    async def tgi(request: Request, stream: bool | None) -> Response:
        body = await _parse(request, TgiBody)
        p, stream = body.parameters, body.stream if stream is None else stream
        _refuse(("parameters.best_of", (p.best_of or 1) > 1, "best_of > 1 is not supported"),
                ("parameters.decoder_input_details", bool(p.decoder_input_details), "prompt logprobs: not supported"),
                ("parameters.watermark", bool(p.watermark), "watermarking is not supported"),
                ("parameters.grammar", p.grammar is not None, "grammars are not supported"),
                ("parameters.typical_p", p.typical_p not in (None, 1.0), "typical_p is not supported"),
                ("parameters.frequency_penalty", bool(p.frequency_penalty), "only 0; use repetition_penalty"),
                ("parameters.adapter_id", bool(p.adapter_id), "adapters are not supported"))
        ids = service.prompt_from_text(body.inputs, "inputs")
        ids = ids[-p.truncate:] if p.truncate else ids
        # TGI: temperature / top_p / top_k other than their neutral values imply sampling
        sample = p.do_sample or p.temperature not in (None, 1.0) or p.top_p not in (None, 1.0) or p.top_k is not None
        seed = p.seed if p.seed is not None or not sample else random.getrandbits(63)
        params = service.sampling(ids, p.max_new_tokens, "parameters.max_new_tokens",
                                  temperature=(p.temperature or 1.0) if sample else 0.0, top_p=p.top_p or 1.0,
                                  top_k=p.top_k or 0, repetition_penalty=p.repetition_penalty or 1.0, seed=seed,
                                  stop=p.stop or [], logprobs=p.top_n_tokens or None)
        (s,) = await _open_all(service, [(ids, params)])
        prefix = body.inputs if p.return_full_text else ""

        def top_tokens(ev: TokenEvent) -> dict:
            return {"top_tokens": [tgi_token(t, lp) for t, lp in ev.top_logprobs or []]} if p.top_n_tokens else {}

        def final_text(events: list[TokenEvent]) -> str:
            stop = events[-1].stop_reason
            return prefix + "".join(ev.text for ev in events) + (stop if isinstance(stop, str) else "")

        if not stream:
            try:
                events = [ev async for ev in s]
            finally:
                await s.aclose()
            out: dict = {"generated_text": final_text(events)}
            if p.details:
                out["details"] = {"finish_reason": tgi_finish(events[-1]), "generated_tokens": len(events),
                                  "seed": seed, "prefill": [],
                                  "tokens": [tgi_token(ev.token, ev.logprob) for ev in events]}
                if p.top_n_tokens:
                    out["details"]["top_tokens"] = [top_tokens(ev)["top_tokens"] for ev in events]
            return JSONResponse([out] if request.scope["route"].path == "/" else out)  # TGI's `/` answers a list

        async def events_() -> AsyncIterator[str]:
            events: list[TokenEvent] = []
            try:
                async for ev in s:
                    events.append(ev)
                    done = ev.finish_reason is not None
                    details = {"finish_reason": tgi_finish(ev), "generated_tokens": len(events), "seed": seed,
                               "input_length": len(ids)} if done and p.details else None
                    yield _sse({"index": len(events), "token": tgi_token(ev.token, ev.logprob), **top_tokens(ev),
                                "generated_text": final_text(events) if done else None, "details": details}, "data:")
            except ApiError as e:
                yield _sse({"error": e.message, "error_type": e.tgi_type}, "data:")
            except Exception as e:
                yield _sse({"error": f"generation failed: {reason(e)}", "error_type": "generation"}, "data:")
            finally:
                await s.aclose()

        return _EventStream(events_())

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        return await tgi(request, stream=False)

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Response:
        return await tgi(request, stream=True)

    @app.post("/")
    async def compat_generate(request: Request) -> Response:
        """TGI's root route, which huggingface_hub.InferenceClient.text_generation posts to."""
        return await tgi(request, stream=None)

    # -- operations --------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        """200 once the model has answered: one 1-token generation, then (cheaply) the backend's stats."""
        nonlocal healthy
        try:
            if not healthy:
                ids = [tok.bos_id] if tok.bos_id >= 0 else [0]
                async for _ in await service.open_stream(ids, SamplingParams(max_tokens=1, temperature=0)):
                    pass
                healthy = True
            await service.backend.stats()
        except Exception as e:
            err = e if isinstance(e, ApiError) else Unavailable(f"backend unavailable: {reason(e)}")
            return JSONResponse({"error": {"message": f"not ready: {err.message}", "type": "server_error",
                                           "param": None, "code": "unavailable"}}, 503)
        return JSONResponse({"status": "ok", "model": card.id})

    @app.get("/metrics")
    async def metrics() -> Response:
        await service.refresh_metrics()
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
