"""What every client API (OpenAI and TGI over HTTP, moeray.v1 over gRPC) shares: the model card,
prompt building and validation, the error classes and their statuses, the token stream from the
backend, and the metrics. The API modules only translate wire formats to and from this.

A backend is anything that streams TokenEvents for (prompt ids, sampling params): the router of a
pipeline replica behind a Serve handle, or an EngineLoop in this process (LocalBackend: the API tests).
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from cluster.loop import EngineLoop
from cluster.ports import is_loopback_host
from kernels.engine import QueueFull, Request, RequestIdInUse, TokenEvent
from kernels.sampling import SamplingParams
from kernels.structured import Grammar
from kernels.tokenizer import ChatTemplateError, Tokenizer


# -- errors: one class per status, raised by the service, mapped to the wire by each API -------------
class ApiError(Exception):
    http_status = 500
    grpc_code = "INTERNAL"
    openai_type = "server_error"
    tgi_type = "generation"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class InvalidRequest(ApiError):
    http_status, grpc_code, openai_type, tgi_type = 400, "INVALID_ARGUMENT", "invalid_request_error", "validation"


class Conflict(ApiError):
    """A valid request that clashes with one in progress (its request_id is taken): the same request succeeds
    once the other has ended, so not INVALID_ARGUMENT but ALREADY_EXISTS (HTTP 409)."""

    http_status, grpc_code, openai_type, tgi_type = 409, "ALREADY_EXISTS", "invalid_request_error", "validation"


class Overloaded(ApiError):
    http_status, grpc_code, openai_type, tgi_type = 429, "RESOURCE_EXHAUSTED", "rate_limit_error", "overloaded"


class Unavailable(ApiError):
    http_status, grpc_code, openai_type, tgi_type = 503, "UNAVAILABLE", "server_error", "overloaded"


class Unauthorized(ApiError):
    """No API key, or the wrong one: OpenAI's 401 (type and code as api.openai.com answers them)."""

    http_status, grpc_code, openai_type, tgi_type = 401, "UNAUTHENTICATED", "invalid_request_error", "authentication"

    def __init__(self, message: str):
        super().__init__(message, None, "invalid_api_key")


class Forbidden(ApiError):
    """A peer on another machine, and no API key to admit it with."""

    http_status, grpc_code, openai_type, tgi_type = 403, "PERMISSION_DENIED", "invalid_request_error", "authentication"

    def __init__(self, message: str):
        super().__init__(message, None, "remote_client_without_api_key")


class PayloadTooLarge(ApiError):
    http_status, grpc_code, openai_type, tgi_type = 413, "RESOURCE_EXHAUSTED", "invalid_request_error", "validation"


# Stop strings: OpenAI's count limit (TGI's default max_stop_sequences too), and a length limit, since the
# engine's per-token look for a partial stop string at the end of the text costs O(length^2) per string:
# one 1 MB stop string stalls the whole batch for seconds per token.
MAX_STOP = 4
MAX_STOP_CHARS = 512
# A request body (HTTP) or message (gRPC) at most: far above any prompt that fits a context. HTTP refuses a larger
# body unread (413); `moeray serve` sets Ray Serve's gRPC proxy to refuse a larger message (RESOURCE_EXHAUSTED).
MAX_REQUEST_BYTES = 16 << 20


@dataclass(frozen=True)
class ModelCard:
    id: str  # the name clients send as "model"
    max_model_len: int  # prompt + generated tokens at most
    vocab_size: int
    architecture: str  # "mixtral" | "mistral"
    num_experts: int = 0  # 0: dense
    num_experts_per_tok: int = 0
    created: int = 0  # unix seconds


class Backend(Protocol):
    # a generator, not any iterator: a TokenStream closes it (aclose) to abort the request
    def stream(self, prompt_ids: list[int], params: SamplingParams,
               request_id: str) -> AsyncGenerator[TokenEvent, None]: ...

    async def stats(self) -> dict: ...


class LocalBackend:
    """An EngineLoop in this process."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop

    def stream(self, prompt_ids, params, request_id):
        return self.loop.generate(Request(request_id, prompt_ids, params))

    async def stats(self) -> dict:
        return self.loop.stats()


COUNTERS = {"num_preemptions": "Sequences preempted for KV-cache memory (recomputed when they run again)",
            "prefix_cache_queries": "Prompt tokens looked up in the prefix cache",
            "prefix_cache_hits": "Prompt tokens found in the prefix cache (not computed)"}


class Metrics:
    """Prometheus metrics of one API replica (vLLM's names, with our prefix). A registry of its own,
    so several services in one process (tests) do not collide."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("moeray:time_to_first_token_seconds", "Time to first token", registry=r, buckets=buckets)
        self.itl = Histogram("moeray:inter_token_latency_seconds", "Time between tokens", registry=r, buckets=buckets)
        self.e2e = Histogram("moeray:e2e_request_latency_seconds", "Request latency", registry=r, buckets=buckets)
        self.prompt_tokens = Counter("moeray:prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter("moeray:generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("moeray:requests", "Requests by outcome", ["finish_reason"], registry=r)
        self.running = Gauge("moeray:num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("moeray:num_requests_waiting", "Requests waiting for a batch slot", registry=r)
        self.kv = Gauge("moeray:kv_cache_usage_perc", "KV-cache blocks in use (0-1)", registry=r)
        self.expert_rate = Gauge("moeray:expert_tokens_per_second", "Token rows per second routed to each expert, "
                                 "over the router's sliding window (the expert scaler's signal)", ["layer", "expert"],
                                 registry=r)
        self.expert_replicas = Gauge("moeray:expert_replicas", "Actors serving each expert: base shards plus the "
                                     "expert scaler's ready replicas (absent while scaling is off)",
                                     ["layer", "expert"], registry=r)
        self._expert_tokens: dict[str, int] = {}
        self._counters: dict[str, int] = {}
        r.register(self)  # collect() below: counters as the engine last reported them

    def collect(self):
        family = CounterMetricFamily("moeray:expert_tokens", "Token rows routed to each expert",
                                     labels=["layer", "expert"])
        for key, n in sorted(self._expert_tokens.items()):
            family.add_metric(key.split(":"), n)
        yield family
        for name, doc in COUNTERS.items():  # vLLM's names, with moeray's prefix
            yield CounterMetricFamily(f"moeray:{name}", doc, value=self._counters.get(name, 0))

    def update(self, stats: dict) -> None:
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        self.kv.set(stats.get("kv_cache_usage", 0))
        self._expert_tokens = dict(stats.get("tokens_per_expert", {}))
        self._counters = {name: stats[name] for name in COUNTERS if name in stats}
        self.expert_rate.clear()  # pairs that left the window drop out
        for key, rate in stats.get("expert_tokens_per_s", {}).items():
            self.expert_rate.labels(*key.split(":")).set(rate)
        self.expert_replicas.clear()
        for key, n in stats.get("expert_replicas", {}).items():
            self.expert_replicas.labels(*key.split(":")).set(n)


def reason(e: BaseException) -> str:
    """What went wrong, in words a client may see. A Ray task error's own text is the remote traceback (file
    paths, pid, ip, actor id): this is its cause's (a cause may be a task error again), first line only (a
    RayActorError lists the actor's pid and ip on the next lines), without a repeated prefix."""
    for _ in range(8):  # bounded: a cause chain is short, and a cycle must not hang the request
        cause = getattr(e, "cause", None)
        if not isinstance(cause, BaseException):
            break
        e = cause
    text = str(e).strip().split("\n", 1)[0] or type(e).__name__
    return text.removeprefix("generation failed: ")


class TokenStream:
    """A started generation: iterate for its TokenEvents (the first is already here), the last with a
    finish_reason. aclose() (or leaving `async with aclosing(...)`) before the end cancels it: the
    backend aborts the request and frees its KV cache."""

    def __init__(self, metrics: Metrics, first: TokenEvent, stream, started: float, chat: bool):
        self._metrics, self._stream, self._started = metrics, stream, started
        self._pending: TokenEvent | None = first
        self._last: TokenEvent | None = None
        self._strip, self._closed = chat, False
        self._t = time.perf_counter()

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._pending is None:
            if self._closed or (self._last and self._last.finish_reason):
                raise StopAsyncIteration
            try:
                self._pending = await self._stream.__anext__()
            except (StopAsyncIteration, ApiError):
                raise
            except Exception as e:  # the backend failed mid-generation (a worker gave up, a replica died)
                raise Unavailable(f"generation failed: {reason(e)}; retry the request") from None
            now = time.perf_counter()
            self._metrics.itl.observe(now - self._t)
            self._t = now
        ev, self._pending = self._pending, None
        if self._strip and ev.text:
            ev.text, self._strip = ev.text.removeprefix(" "), False
        self._metrics.generation_tokens.inc()
        self._last = ev
        if ev.finish_reason:
            self._metrics.e2e.observe(time.perf_counter() - self._started)
            await self.aclose()
        return ev

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._metrics.requests.labels(self._last.finish_reason if self._last and self._last.finish_reason
                                          else "abort").inc()
            await self._stream.aclose()


class Service:
    def __init__(self, backend: Backend, tokenizer: Tokenizer, card: ModelCard, api_key: str | None = None,
                 allow_remote_without_key: bool = False):
        """api_key: when set, every API call must present it (`Authorization: Bearer <key>` over HTTP, the
        same as gRPC metadata); None: no key, and then only clients on this machine are served, unless
        allow_remote_without_key."""
        if api_key is not None and not api_key.strip():
            raise ValueError("api_key is empty; give None for no key")
        self.backend, self.tokenizer, self.card = backend, tokenizer, card
        self._key = None if api_key is None else api_key.strip().encode()  # a key file's newline is no part of it
        self._any_peer = self._key is not None or allow_remote_without_key
        self.metrics = Metrics()

    # -- access ------------------------------------------------------------------------------------
    def check_peer(self, host: str | None) -> None:
        """Forbidden for a client on another machine (`host`: its address; None: unknown) when there is no API
        key to check: Ray Serve's gRPC proxy listens on every interface, and an HTTP host may be opened too."""
        if not self._any_peer and not is_loopback_host(host):
            raise Forbidden(f"this server has no API key, so it serves only clients on its own machine (not {host}); "
                            "set serve.api_key or MOERAY_API_KEY to serve other machines")

    def authorize(self, authorization: str | None) -> None:
        """Checks an `Authorization` header value (or gRPC `authorization` metadata) against the API key,
        in constant time; Unauthorized if it is missing or wrong. A no-op when the service has no key."""
        if self._key is None:
            return
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if not authorization or scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(presented.strip().encode("utf-8", "surrogatepass"), self._key):
            raise Unauthorized("invalid API key")

    # -- requests ------------------------------------------------------------------------------
    def check_model(self, name: str | None, param: str = "model") -> None:
        if name not in (None, "", self.card.id):
            raise InvalidRequest(f"model {name!r} does not exist; this server serves {self.card.id!r}", param,
                                 "model_not_found")

    def prompt_from_text(self, text, param: str = "prompt") -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequest(f"{param} must be a string", param)
        if not text:
            raise InvalidRequest(f"{param} is empty", param)
        return self.tokenizer.encode(text, bos=True)

    def prompt_from_ids(self, ids, param: str = "prompt") -> list[int]:
        if not isinstance(ids, list) or not ids:
            raise InvalidRequest(f"{param} must be a non-empty list of token ids", param)
        self._check_ids(ids, param)
        return ids

    def _check_ids(self, ids: list, param: str) -> None:
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.card.vocab_size for i in ids):
            raise InvalidRequest(f"{param}: token ids must be integers in [0, {self.card.vocab_size})", param)

    def prompt_from_chat(self, messages, param: str = "messages", tools: list[dict] | None = None) -> list[int]:
        try:
            return self.tokenizer.encode_chat(messages, tools)
        except ChatTemplateError as e:
            raise InvalidRequest(f"{param}: {e}", param) from None
        except (TypeError, AttributeError) as e:
            raise InvalidRequest(f"{param} must be a list of {{role, content}} objects ({e})", param) from None

    def sampling(self, prompt_ids: list[int], max_tokens: int | None, param: str = "max_tokens",
                 **kwargs) -> SamplingParams:
        """SamplingParams for a prompt; max_tokens None means "up to the context". Errors name `param`
        (or the field SamplingParams complains about)."""
        room = self.card.max_model_len - len(prompt_ids)
        if room < 1:
            raise InvalidRequest(f"the prompt has {len(prompt_ids)} tokens; this model's context is "
                                 f"{self.card.max_model_len}", "prompt")
        if max_tokens is None:
            max_tokens = room
        if max_tokens > room:
            raise InvalidRequest(f"prompt ({len(prompt_ids)} tokens) + {param} ({max_tokens}) exceeds this model's "
                                 f"context of {self.card.max_model_len} tokens", param)
        stop = kwargs.get("stop") or []
        if len(stop) > MAX_STOP or any(isinstance(x, str) and len(x) > MAX_STOP_CHARS for x in stop):
            raise InvalidRequest(f"stop: at most {MAX_STOP} stop sequences of at most {MAX_STOP_CHARS} characters",
                                 "stop")
        self._check_ids(kwargs.get("stop_token_ids") or [], "stop_token_ids")
        try:
            return SamplingParams(max_tokens=max_tokens, **kwargs)
        except (ValueError, TypeError) as e:
            raise InvalidRequest(str(e), str(e).split(" ", 1)[0]) from None

    @staticmethod
    def grammar(kind: str, value, param: str) -> Grammar:
        """Structured output's Grammar: kind "json_schema" (value a schema, or its JSON text) or "regex";
        InvalidRequest naming `param` and the problem if llguidance cannot compile it."""
        try:
            if kind == "json_schema":
                return Grammar.json_schema(json.loads(value) if isinstance(value, str) else value)
            return Grammar.regex(value)
        except ValueError as e:  # json.JSONDecodeError too
            raise InvalidRequest(f"{param}: {e}", param) from None

    # -- generation ------------------------------------------------------------------------------
    async def open_stream(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                          chat: bool = False) -> TokenStream:
        """Starts a generation and waits for its first token, so errors surface BEFORE a response
        (or SSE headers) is sent. `chat`: the reply's text drops the one leading space the
        detokenizer gives a continuation of the prompt (a first "▁Hello" decodes as " Hello")."""
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        started = time.perf_counter()
        stream = self.backend.stream(prompt_ids, params, request_id)
        try:
            first = await stream.__anext__()
        except BaseException as e:
            await stream.aclose()
            if isinstance(e, StopAsyncIteration):
                raise ApiError("the backend ended the stream without a token") from None
            # behind Serve, an engine error arrives as a RayTaskError that is also an instance of it
            if isinstance(e, QueueFull):
                raise Overloaded(reason(e)) from None
            if isinstance(e, RequestIdInUse):
                raise Conflict(f"request_id {request_id!r} is in use by a generation in progress", "request_id",
                               "request_id_in_use") from None
            if isinstance(e, ValueError):  # the engine's own checks (context, KV cache, ids)
                raise InvalidRequest(reason(e)) from None
            if isinstance(e, Exception) and not isinstance(e, ApiError):
                raise Unavailable(f"generation failed: {reason(e)}") from None
            raise
        self.metrics.ttft.observe(time.perf_counter() - started)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        return TokenStream(self.metrics, first, stream, started, chat)

    async def refresh_metrics(self) -> None:
        self.metrics.update(await self.backend.stats())

    def token_text(self, token: int) -> str:
        """One token's own text, for per-token details (TGI `tokens[].text`, logprob entries)."""
        if not 0 <= token < self.tokenizer.vocab_size or self.tokenizer.is_special(token):
            return ""
        piece = self.tokenizer.id_to_piece(token)
        if piece.startswith("<0x") and piece.endswith(">"):  # byte-fallback piece
            b = int(piece[3:-1], 16)
            return chr(b) if b < 0x80 else ""
        return piece.replace("\u2581", " ")
