"""moeray.v1.GenerationService (proto/moeray.proto) and grpc.health.v1.Health over the Service layer.

The same methods run under Ray Serve's gRPC proxy (an ingress deployment that inherits them; its
`grpc_context` is a RayServegRPCContext) and on a plain grpc.aio server (`add_to_server`). Serve's
context has no `abort`, so a failed call sets its status with `set_code`/`set_details` and then:
  - a unary call returns an empty response (Serve forwards the code along with the response);
  - a stream raises StatusSet. Serve forwards a stream's code only with a message or an exception,
    so a stream that just ended would report OK; on a plain server, add_to_server's adapter turns
    StatusSet back into a normal end, and gRPC sends the status that was set.

Requests arrive as bytes and are decoded here (`rpc`), under Serve (whose proxy forwards them undecoded:
see add_GenerationService_to_serve) and on a plain server alike, so bytes that are no valid request fail
with INVALID_ARGUMENT, not the UNKNOWN a generated deserializer gives.

Before a request is looked at, the caller is admitted: with an API key (Service(api_key=...)), every
moeray.v1 call must carry the metadata `authorization: Bearer <key>` (UNAUTHENTICATED otherwise);
without one, a peer that is not on this machine gets PERMISSION_DENIED (unless the service allows it).
grpc.health.v1 Check needs no key, but is refused to other machines on the same terms.
"""

from __future__ import annotations

import functools
import inspect
import logging
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.api.service import ApiError, InvalidRequest, Service, TokenStream, reason
from cluster.rpc import moeray_pb2 as pb
from kernels.engine import TokenEvent
from kernels.sampling import SamplingParams

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]  # its RPCs are GrpcApi's method names
SERVICE_NAME = SERVICE.full_name  # "moeray.v1.GenerationService"
OPTIONAL = ("temperature", "top_p", "repetition_penalty", "seed", "logprobs")  # unset: SamplingParams' default
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
Stream = AsyncGenerator[pb.GenerateStreamResponse, None]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class StatusSet(Exception):
    """A stream failed and its status is already set on the context (see the module docstring)."""


def fail(grpc_context, error: Exception) -> StatusSet:
    """Sets the status for `error` (an ApiError's own code, INTERNAL for anything else)."""
    if isinstance(error, ApiError):
        code, details = error.grpc_code, error.message
    else:
        log.exception("gRPC request failed", exc_info=error)
        code, details = "INTERNAL", f"internal error: {reason(error)}"
    grpc_context.set_code(grpc.StatusCode[code])
    grpc_context.set_details(details)
    return StatusSet(details)


def authorization(grpc_context) -> str | None:
    """The call's `authorization` metadata (gRPC lowercases keys), as Serve's context and grpc.aio's give it."""
    for key, value in grpc_context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else None  # a binary (-bin) value is never a key
    return None


def peer_host(grpc_context) -> str | None:
    """The caller's address from gRPC's peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000",
    "unix:/path"); "localhost" for a Unix socket (only this machine can reach one)."""
    kind, _, rest = (grpc_context.peer() or "").partition(":")
    if kind in ("unix", "unix-abstract"):
        return "localhost"
    if kind == "ipv6":
        return rest.rpartition("]")[0].lstrip("[") or None
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    return None


def admit(service: Service, grpc_context, key: bool = True) -> None:
    """Refuses a caller the service does not serve: another machine's without an API key, or (when `key`)
    one without the right key."""
    service.check_peer(peer_host(grpc_context))
    if key:
        service.authorize(authorization(grpc_context))


def rpc(method):
    """A GenerationService method (named as its RPC) that takes the request as bytes (or already decoded):
    admits the caller, then decodes; either failure ends the call with its status before `method` runs."""
    spec = SERVICE.methods_by_name[method.__name__]
    request_type, response_type = getattr(pb, spec.input_type.name), getattr(pb, spec.output_type.name)

    def request_of(self, data, grpc_context):
        admit(self.service, grpc_context)
        if isinstance(data, request_type):
            return data
        try:
            return request_type.FromString(data)
        except (DecodeError, TypeError) as e:
            raise InvalidRequest(f"the request is not a valid {request_type.DESCRIPTOR.full_name}: {e}") from None

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, data, grpc_context):
            try:
                request = request_of(self, data, grpc_context)
            except ApiError as e:
                raise fail(grpc_context, e) from None
            async with aclosing(method(self, request, grpc_context)) as messages:
                async for message in messages:
                    yield message
        return stream

    @functools.wraps(method)
    async def unary(self, data, grpc_context):
        try:
            request = request_of(self, data, grpc_context)
        except ApiError as e:
            fail(grpc_context, e)
            return response_type()
        return await method(self, request, grpc_context)
    return unary


def messages_of(request) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in request.messages]


class GrpcApi:
    """One method per RPC, named as the RPC (Serve routes by name). Under Serve, the ingress deployment
    inherits these, and gRPCOptions.grpc_servicer_functions lists
    `cluster.rpc.moeray_pb2_grpc.add_GenerationServiceServicer_to_server` and
    `grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server`."""

    def __init__(self, service: Service):
        self.service = service
        self._model_answered = False  # health: SERVING once one generation came back

    # -- generation ---------------------------------------------------------------------------------
    @rpc
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        return await self._complete(grpc_context, self._generate_args, request)

    @rpc
    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context) -> Stream:
        async with aclosing(self._stream(grpc_context, self._generate_args, request)) as stream:
            async for message in stream:
                yield message

    @rpc
    async def Chat(self, request: pb.ChatRequest, grpc_context) -> pb.GenerateResponse:
        return await self._complete(grpc_context, self._chat_args, request)

    @rpc
    async def ChatStream(self, request: pb.ChatRequest, grpc_context) -> Stream:
        async with aclosing(self._stream(grpc_context, self._chat_args, request)) as stream:
            async for message in stream:
                yield message

    # -- the rest -----------------------------------------------------------------------------------
    @rpc
    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context) -> pb.TokenizeResponse:
        """The ids Generate (text) or Chat (messages) would run on: the same code builds them."""
        s = self.service
        try:
            s.check_model(request.model)
            if request.text and request.messages:
                raise InvalidRequest("set either text or messages, not both", "messages")
            if request.messages:
                ids = s.prompt_from_chat(messages_of(request))
            else:
                ids = s.prompt_from_text(request.text, "text")
        except Exception as e:
            fail(grpc_context, e)
            return pb.TokenizeResponse()
        return pb.TokenizeResponse(token_ids=ids, pieces=[s.tokenizer.id_to_piece(i) for i in ids])

    @rpc
    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context) -> pb.ModelInfoResponse:
        card, tok = self.service.card, self.service.tokenizer
        try:
            self.service.check_model(request.model)
        except Exception as e:
            fail(grpc_context, e)
            return pb.ModelInfoResponse()
        return pb.ModelInfoResponse(
            id=card.id, architecture=card.architecture, max_model_len=card.max_model_len, vocab_size=card.vocab_size,
            num_experts=card.num_experts, num_experts_per_tok=card.num_experts_per_tok,
            bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, created=card.created)

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        """grpc.health.v1: SERVING once the model has generated a token (one 1-token request, through
        the backend so it stays out of the metrics), then as long as the backend answers stats()."""
        if request.service not in ("", SERVICE_NAME):
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}; this server has {SERVICE_NAME!r}")
            return health_pb2.HealthCheckResponse()
        try:
            admit(self.service, grpc_context, key=False)
        except ApiError as e:
            fail(grpc_context, e)
            return health_pb2.HealthCheckResponse()
        backend = self.service.backend
        try:
            if self._model_answered:
                await backend.stats()
            else:
                ids, params = [self.service.tokenizer.bos_id], SamplingParams(max_tokens=1)
                async with aclosing(backend.stream(ids, params, f"health-{uuid.uuid4().hex}")) as probe:
                    await probe.__anext__()
                self._model_answered = True
        except Exception as e:
            log.warning("health check: the model does not answer: %s", e)
            return health_pb2.HealthCheckResponse(status=NOT_SERVING)
        return health_pb2.HealthCheckResponse(status=SERVING)

    # -- shared -------------------------------------------------------------------------------------
    def _generate_args(self, request: pb.GenerateRequest) -> tuple[list[int], SamplingParams]:
        s = self.service
        s.check_model(request.model)
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise InvalidRequest("prompt is missing: set text or token_ids", "prompt")
        if kind == "text":
            ids = s.prompt_from_text(request.text, "text")
        else:
            ids = s.prompt_from_ids(list(request.token_ids.ids), "token_ids")
        return ids, self._sampling(ids, request.params)

    def _chat_args(self, request: pb.ChatRequest) -> tuple[list[int], SamplingParams]:
        self.service.check_model(request.model)
        ids = self.service.prompt_from_chat(messages_of(request))
        return ids, self._sampling(ids, request.params)

    def _sampling(self, ids: list[int], p: pb.SamplingParameters) -> SamplingParams:
        """Unset optional fields keep SamplingParams' defaults; the Service checks the values."""
        optional = {name: getattr(p, name) for name in OPTIONAL if p.HasField(name)}
        kind = p.WhichOneof("grammar")  # "json_schema" | "regex" | None
        grammar = self.service.grammar(kind, getattr(p, kind), f"params.{kind}") if kind else None
        return self.service.sampling(ids, p.max_tokens if p.HasField("max_tokens") else None, "max_tokens",
                                     top_k=p.top_k, stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
                                     ignore_eos=p.ignore_eos, grammar=grammar, **optional)

    async def _open(self, grpc_context, prepare, request) -> tuple[TokenStream, SamplingParams, int]:
        ids, params = prepare(request)
        request_id = request.request_id if request.HasField("request_id") else None
        chat = isinstance(request, pb.ChatRequest)  # a reply drops the continuation's leading space, as over HTTP
        return await self.service.open_stream(ids, params, request_id, chat=chat), params, len(ids)

    def _logprobs(self, ev: TokenEvent) -> pb.Logprobs:
        text = self.service.token_text
        return pb.Logprobs(logprob=ev.logprob,
                           top=[pb.TopLogprob(token_id=t, text=text(t), logprob=lp) for t, lp in ev.top_logprobs or ()])

    @staticmethod
    def _finish(message, ev: TokenEvent, prompt_tokens: int, completion_tokens: int) -> None:
        """Sets the end-of-generation fields that GenerateResponse and the last stream message share."""
        assert ev.finish_reason is not None, "only a generation's last event ends it"
        message.finish_reason = FINISH[ev.finish_reason]
        if isinstance(ev.stop_reason, str):
            message.stop_sequence = ev.stop_reason
        elif ev.stop_reason is not None:
            message.stop_token_id = ev.stop_reason
        message.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))

    async def _complete(self, grpc_context, prepare, request) -> pb.GenerateResponse:
        out = pb.GenerateResponse()
        try:
            events, params, n_prompt = await self._open(grpc_context, prepare, request)
            async with aclosing(events):
                async for ev in events:
                    out.token_ids.append(ev.token)
                    out.text += ev.text
                    if params.logprobs is not None:
                        out.logprobs.append(self._logprobs(ev))
        except Exception as e:
            fail(grpc_context, e)
            return pb.GenerateResponse()
        out.request_id = ev.request_id
        self._finish(out, ev, n_prompt, len(out.token_ids))
        return out

    async def _stream(self, grpc_context, prepare, request) -> Stream:
        """Errors before the first token fail the call with no message; a client that goes away closes
        this generator, and `aclosing` closes the service stream, which aborts the request."""
        try:
            events, params, n_prompt = await self._open(grpc_context, prepare, request)
        except Exception as e:
            raise fail(grpc_context, e) from None
        n = 0
        async with aclosing(events):
            try:
                async for ev in events:
                    n += 1
                    message = pb.GenerateStreamResponse(token_id=ev.token, text=ev.text, request_id=ev.request_id)
                    if params.logprobs is not None:
                        message.logprobs.CopyFrom(self._logprobs(ev))
                    if ev.finish_reason:
                        self._finish(message, ev, n_prompt, n)
                    yield message
            except Exception as e:  # the backend failed mid-way: end the stream with its status
                raise fail(grpc_context, e) from None


# -- a plain grpc.aio server (tests, running without Serve) ----------------------------------------------
def _ending_on_status(method):
    """A stream that raised StatusSet ends normally here; gRPC then sends the status it set."""
    async def stream(request, context):
        try:
            async with aclosing(method(request, context)) as messages:
                async for message in messages:
                    yield message
        except StatusSet:
            pass
    return stream


class _Health(health_pb2_grpc.HealthServicer):
    """Check from the API; Watch and List stay UNIMPLEMENTED, as under Serve."""

    def __init__(self, api: GrpcApi):
        self.Check = api.Check


def _handlers(methods, serialize: bool) -> grpc.GenericRpcHandler:
    """GenerationService's handlers over `methods` (name -> callable), with no request deserializer: the
    methods get the request bytes and decode them (`rpc`)."""
    handlers = {}
    for m in SERVICE.methods:
        kind = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        serializer = getattr(pb, m.output_type.name).SerializeToString if serialize else None
        handlers[m.name] = kind(methods(m), response_serializer=serializer)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def add_GenerationService_to_serve(servicer, server) -> None:  # noqa: N802 (named as grpc's add_*_to_server)
    """For Ray Serve's `grpc_servicer_functions`: GenerationService with no request deserializer, so Serve's
    proxy forwards each request's bytes to the Ingress, which decodes them (see `rpc`). Serve replaces the
    handlers' functions with its own routing, keyed by method name."""
    server.add_generic_rpc_handlers((_handlers(lambda m: getattr(servicer, m.name), serialize=False),))


def add_to_server(api: GrpcApi, server: grpc.aio.Server) -> None:
    """Registers GenerationService and grpc.health.v1.Health on a plain grpc.aio server."""
    server.add_generic_rpc_handlers((_handlers(
        lambda m: _ending_on_status(getattr(api, m.name)) if m.server_streaming else getattr(api, m.name),
        serialize=True),))
    health_pb2_grpc.add_HealthServicer_to_server(_Health(api), server)
