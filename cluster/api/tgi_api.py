"""Hugging Face TGI's routes over one Service: /generate, /generate_stream, and / (where huggingface_hub's
InferenceClient.text_generation posts).

Decisions clients can rely on:
- generated_text keeps the stop sequence that ended it, as TGI does; when sampling without a
  seed, one is drawn here so `details.seed` can report it; `truncate` keeps the last N prompt tokens;
  stream events count `index` from 1; best_of > 1, decoder_input_details, watermark, typical_p and adapters
  are refused.
- grammar: {"type": "json", "value": schema (an object, or its JSON text)} and {"type": "regex", "value": str},
  as TGI's; an invalid one is a 400 (error_type "validation") that names the problem.
"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from cluster.api.http_common import Body, EventStream, open_all, parse, refuse, sse, stream_error
from cluster.api.service import MAX_STOP, ApiError, Service, TokenStream
from kernels.engine import TokenEvent
from kernels.structured import Grammar

TGI_PATHS = ("/", "/generate", "/generate_stream")


class TgiParameters(Body):
    max_new_tokens: Annotated[int, Field(ge=1)] | None = 20  # TGI's default; null means "up to the context"
    temperature: Annotated[float, Field(gt=0)] | None = None
    top_p: Annotated[float, Field(le=1, gt=0)] | None = None
    top_k: Annotated[int, Field(gt=0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    do_sample: bool | None = False
    seed: Annotated[int, Field(ge=0, le=2**64 - 1)] | None = None  # TGI's u64
    stop: Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    details: bool | None = False
    decoder_input_details: bool | None = False
    return_full_text: bool | None = False
    truncate: Annotated[int, Field(ge=1)] | None = None
    top_n_tokens: Annotated[int, Field(ge=0, le=5)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    frequency_penalty: float | None = None
    typical_p: float | None = None
    watermark: bool | None = False
    grammar: Any = None
    adapter_id: str | None = None


class TgiBody(Body):
    inputs: str
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    stream: bool | None = False


def error_body(e: ApiError) -> dict:
    """`e` in TGI's shape: an error response's body, or the last event of a stream that failed."""
    return {"error": e.message, "error_type": e.tgi_type}


def routes(service: Service) -> APIRouter:
    """/generate, /generate_stream and /, serving `service`."""
    router = APIRouter()

    @router.post("/generate")
    async def generate(request: Request) -> Response:
        return await _generate(service, request, stream=False)

    @router.post("/generate_stream")
    async def generate_stream(request: Request) -> Response:
        return await _generate(service, request, stream=True)

    @router.post("/")
    async def compat_generate(request: Request) -> Response:
        """TGI's root route, which huggingface_hub.InferenceClient.text_generation posts to."""
        return await _generate(service, request, stream=None)

    return router


async def _generate(service: Service, request: Request, stream: bool | None) -> Response:
    """One generation, streamed if `stream` (None: if the body's `stream` says so)."""
    body = await parse(request, TgiBody)
    p, stream = body.parameters, body.stream if stream is None else stream
    refuse(("parameters.best_of", (p.best_of or 1) > 1, "best_of > 1 is not supported"),
           ("parameters.decoder_input_details", bool(p.decoder_input_details), "prompt logprobs: not supported"),
           ("parameters.watermark", bool(p.watermark), "watermarking is not supported"),
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
                              stop=p.stop or [], logprobs=p.top_n_tokens or None, grammar=_grammar(p.grammar))
    (s,) = await open_all(service, [(ids, params)])
    prefix = body.inputs if p.return_full_text else ""
    if not stream:
        out = await _whole(service, s, p, prefix, seed)
        return JSONResponse([out] if request.scope["route"].path == "/" else out)  # TGI's `/` answers a list
    return EventStream(_events(service, s, p, prefix, seed, len(ids)), [s])


def _grammar(grammar: Any) -> Grammar | None:
    param = "parameters.grammar"
    if grammar is None:
        return None
    kind = grammar.get("type") if isinstance(grammar, dict) else None
    refuse((f"{param}.type", kind not in ("json", "regex"), f'must be "json" or "regex", got {kind!r}'),
           (f"{param}.value", not isinstance(grammar, dict) or "value" not in grammar, "is required"))
    return Service.grammar("json_schema" if kind == "json" else "regex", grammar["value"], f"{param}.value")


async def _whole(service: Service, s: TokenStream, p: TgiParameters, prefix: str, seed: int | None) -> dict:
    try:
        events = [ev async for ev in s]
    finally:
        await s.aclose()
    out: dict = {"generated_text": _text(prefix, events)}
    if p.details:
        out["details"] = {"finish_reason": _finish(events[-1]), "generated_tokens": len(events),
                          "seed": seed, "prefill": [],
                          "tokens": [_token(service, ev.token, ev.logprob) for ev in events]}
        if p.top_n_tokens:
            out["details"]["top_tokens"] = [_top_tokens(service, p, ev)["top_tokens"] for ev in events]
    return out


async def _events(service: Service, s: TokenStream, p: TgiParameters, prefix: str, seed: int | None,
                  input_length: int) -> AsyncGenerator[str, None]:
    events: list[TokenEvent] = []
    try:
        async for ev in s:
            events.append(ev)
            done = ev.finish_reason is not None
            details = {"finish_reason": _finish(ev), "generated_tokens": len(events), "seed": seed,
                       "input_length": input_length} if done and p.details else None
            yield sse({"index": len(events), "token": _token(service, ev.token, ev.logprob),
                       **_top_tokens(service, p, ev), "generated_text": _text(prefix, events) if done else None,
                       "details": details}, "data:")
    except Exception as e:  # the backend failed mid-stream: headers are gone, so say it in the stream
        yield sse(error_body(stream_error(e)), "data:")
    finally:
        await s.aclose()


def _text(prefix: str, events: list[TokenEvent]) -> str:
    stop = events[-1].stop_reason
    return prefix + "".join(ev.text for ev in events) + (stop if isinstance(stop, str) else "")


def _token(service: Service, t: int, lp: float) -> dict:
    tok = service.tokenizer
    return {"id": t, "text": service.token_text(t), "logprob": lp,
            "special": not 0 <= t < tok.vocab_size or tok.is_special(t)}


def _top_tokens(service: Service, p: TgiParameters, ev: TokenEvent) -> dict:
    return {"top_tokens": [_token(service, t, lp) for t, lp in ev.top_logprobs or []]} if p.top_n_tokens else {}


def _finish(ev: TokenEvent) -> str:
    if ev.finish_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(ev.stop_reason, str) else "eos_token"
