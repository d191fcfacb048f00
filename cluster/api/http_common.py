"""What the OpenAI and TGI routes (cluster/api/openai_api.py, cluster/api/tgi_api.py) share: strict request bodies read
under a size limit, refusals that name the field, opening a request's generations, and server-sent events.

Every generation is opened (its first token awaited) before a response starts, so a bad or refused
request is an HTTP status and an error body, never a broken stream.

Decisions clients can rely on, in both APIs:
- NaN and Infinity (which Python's json writes) are refused in every number field.
- Bodies over 16 MiB: 413.
- temperature below 1e-5 decodes greedily (vLLM's rule; smaller ones overflow the sampler);
  repetition_penalty must be >= 0.01 (kernels/sampling.py) and stop strings at most 512 characters
  (cluster/api/service.py).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from ray.exceptions import TaskCancelledError

from cluster.api.service import (
    MAX_REQUEST_BYTES,
    ApiError,
    InvalidRequest,
    PayloadTooLarge,
    Service,
    TokenStream,
    reason,
)
from kernels.sampling import SamplingParams


# -- request bodies ----------------------------------------------------------------------------
class Body(BaseModel):
    """JSON types as sent (no "1" for 1, no 1 for true); no NaN or Infinity (Python's json writes them, and a NaN
    fails a range check with a message about the range); unknown fields ignored, as OpenAI and TGI do."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


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


async def parse(request: Request, model: type[B]) -> B:
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
        raise invalid(e.errors()) from None


def invalid(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """One InvalidRequest for pydantic's `errors`: the first four messages, the first field as its param."""
    msgs: dict[str, str] = {}  # message -> field
    for err in errors:
        name = _field(err["loc"])
        msgs.setdefault(f"{name or 'request body'}: {err['msg']}", name)
    first = next(iter(msgs.values()), "") or "body"
    return InvalidRequest("; ".join(list(msgs)[:4]), first)


def refuse(*checks: tuple[str, bool, str]) -> None:
    """InvalidRequest for the first (field, bad, why) whose `bad` is true."""
    for name, bad, why in checks:
        if bad:
            raise InvalidRequest(f"{name}: {why}", name)


# -- generations -----------------------------------------------------------------------------
async def open_all(service: Service, jobs: list[tuple[list[int], SamplingParams]],
                   chat: bool = False) -> list[TokenStream]:
    """All of a request's generations, or none: if one fails (overload, bad ids), the others are closed."""
    streams: list[TokenStream] = []
    try:
        for ids, params in jobs:
            streams.append(await service.open_stream(ids, params, chat=chat))
    except BaseException:
        await close_all(streams)
        raise
    return streams


async def close_all(streams: list[TokenStream]) -> None:
    for s in streams:
        await s.aclose()


def stream_error(e: Exception) -> ApiError:
    """What a stream that failed after its headers were sent says in its last event: an ApiError as raised,
    anything else as the generation failing."""
    return e if isinstance(e, ApiError) else ApiError(f"generation failed: {reason(e)}")


# -- server-sent events ----------------------------------------------------------------------
def sse(data: Any, prefix: str = "data: ") -> str:
    return f"{prefix}{json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def client_left(e: BaseException) -> bool:
    """Whether `e` is Ray Serve's TaskCancelledError from receive() after the client left, alone or all of an
    exception group's (anyio's task group)."""
    if isinstance(e, TaskCancelledError):
        return True
    inner: Sequence[BaseException] = getattr(e, "exceptions", ())
    return bool(inner) and all(client_left(x) for x in inner)


class EventStream(StreamingResponse):
    """An SSE response over the generations in `streams` that closes them however it ends: they abort and
    free their KV cache. On a client disconnect Starlette cancels the sending task, which can leave the
    generator suspended at a `yield` (closing it runs its `finally`) or not started at all (then closing
    it runs nothing, so the streams are closed here too; closing twice is a no-op). Under Ray Serve the client
    leaving can also come as `receive()` raising TaskCancelledError (ray-project/ray#52477): that ends the response
    the same way, without a traceback on the console (Serve printed it as an exception never retrieved)."""

    body_iterator: AsyncGenerator[str, None]  # `events`, as given: closable

    def __init__(self, events: AsyncGenerator[str, None], streams: list[TokenStream]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except Exception as e:
            if not client_left(e):
                raise
        finally:
            await self.body_iterator.aclose()
            await close_all(self.streams)
