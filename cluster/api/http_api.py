"""The HTTP API over one Service: OpenAI's /v1 routes (cluster/api/openai_api.py), Hugging Face TGI's routes
(cluster/api/tgi_api.py), /health and /metrics, in one FastAPI app that decides for every route who may connect,
whether the API key is needed, and what shape an error has.

Only wire formats live in the HTTP modules; prompts, limits, errors and the token stream come from
cluster/api/service.py.

Decisions clients can rely on:
- With an API key (Service(api_key=...)), every route but /health needs `Authorization: Bearer <key>`,
  checked before the body is read; 401 otherwise, in the route's error shape.
- Errors have OpenAI's shape, and TGI's on TGI's paths (where a bad request is 422, not 400).
"""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from cluster.api import openai_api, tgi_api
from cluster.api.http_common import invalid
from cluster.api.service import ApiError, InvalidRequest, Service, Unauthorized, Unavailable, reason
from kernels.sampling import SamplingParams

# Routes that answer without the API key. /health: load balancers and Serve probe it with no credentials,
# and it returns no data. /metrics is NOT open: its per-expert token counts and request rates describe the
# traffic, and Prometheus sends the key natively (scrape_config `authorization: {credentials: <key>}`).
# FastAPI's own /docs, /redoc and /openapi.json stay open too: they describe the public API and run nothing.
OPEN_PATHS = ("/health",)


# -- errors: OpenAI's shape, TGI's on TGI's paths -------------------------------------------
def _error_response(request: Request, e: ApiError) -> JSONResponse:
    """`e` as the response of the route `request` was for: in TGI's shape on TGI's paths, else in OpenAI's."""
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(e, Unauthorized) else None
    route = getattr(request.scope.get("route"), "path", None)  # the route, whatever the mount prefix
    if (route or request.url.path.removeprefix(request.scope.get("root_path", ""))) in tgi_api.TGI_PATHS:
        return JSONResponse(tgi_api.error_body(e), 422 if e.http_status == 400 else e.http_status, headers)
    return JSONResponse(openai_api.error_body(e), e.http_status, headers)


async def _on_api_error(request: Request, e: ApiError) -> JSONResponse:
    return _error_response(request, e)


async def _on_validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    return _error_response(request, invalid([{**err, "loc": err["loc"][1:]} for err in e.errors()]))


async def _on_http_error(request: Request, e: HTTPException) -> JSONResponse:
    err = InvalidRequest(str(e.detail)) if e.status_code < 500 else ApiError(str(e.detail))
    err.http_status = e.status_code
    return _error_response(request, err)


async def _on_crash(request: Request, e: Exception) -> JSONResponse:
    return _error_response(request, ApiError(f"internal error: {type(e).__name__}: {reason(e)}"))


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
                  dependencies=[Depends(api_key)])  # FastAPI gives them to the included routers' routes too
    tok, card = service.tokenizer, service.card
    healthy = False

    app.add_middleware(PeerCheck, service=service, refuse=_error_response)
    for exc, handler in ((ApiError, _on_api_error), (RequestValidationError, _on_validation_error),
                         (HTTPException, _on_http_error), (Exception, _on_crash)):
        # Starlette types every handler as taking any Exception, not the class it is registered for
        # (Kludex/starlette#2417)
        app.add_exception_handler(exc, handler)  # type: ignore[arg-type]
    app.include_router(openai_api.routes(service))
    app.include_router(tgi_api.routes(service))

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
            return JSONResponse(openai_api.error_body(ApiError(f"not ready: {err.message}", code="unavailable")), 503)
        return JSONResponse({"status": "ok", "model": card.id})

    @app.get("/metrics")
    async def metrics() -> Response:
        await service.refresh_metrics()
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
