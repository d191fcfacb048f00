"""The Serve deployments of `moeray serve` that requests pass: Router (one per pipeline replica) and
Ingress (HTTP + gRPC); the third, ExpertPool (actors/pool.py), holds the expert shards they all call.

Router replicas own their attention actors and join the pool: each runs the engine loop in-process, so a
request costs one Serve hop (ingress -> router) and no other. Serve autoscales routers and ingress replicas
on ongoing requests, each on its own; a router scaled in finishes its running requests first.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray
from ray import serve

from actors.pool import call
from actors.router import Router, router_name
from actors.workers import start_attention
from cluster.api.grpc_api import GrpcApi
from cluster.api.http_api import build_http_app
from cluster.api.service import ModelCard, Service, Unavailable
from cluster.config import MoerayConfig
from kernels.args import ModelArgs
from kernels.engine import QueueFull
from kernels.tokenizer import Tokenizer

log = logging.getLogger(__name__)
REFUSALS = (QueueFull, ValueError)  # what the engine refuses a request with before it starts (RequestIdInUse too)


class RouterReplica(Router):
    """A pipeline replica as a Serve replica: it joins the ExpertPool deployment behind `pool`, and its
    attention actors are created by this process, so they live and die with it."""

    def __init__(self, pool):
        name = router_name()
        info = call(pool, "join", name)
        workers = start_attention(info.config, info.placement, info.experts, info.addresses, shared=True)
        super().__init__(workers, pool, (info.version, info.table), name)

    def __del__(self):  # Serve's graceful shutdown (scale-in), after the running requests finished
        if hasattr(self, "_stop"):
            self.stop()  # the pool stops counting this router once it stops reporting

    async def generate(self, request_id, prompt_ids, params):
        """Router.generate, with a refusal sent back as a value rather than raised: Serve logs every exception
        a replica raises, with its traceback (~10 KB a 429), and a full queue (429) or a client's bad request
        (a request_id in use: 409; the engine's own checks: 400) is routine, not a server error."""
        try:
            async for event in super().generate(request_id, prompt_ids, params):
                yield event
        except REFUSALS as e:
            yield e


class HandleBackend:
    """The service's backend: a Router deployment behind a Serve handle. A request whose router replica
    dies before its first token is sent again (nothing was streamed, so that is safe; Serve picks a live
    replica or waits for the restarted one); after its first token it fails as Unavailable (503 /
    UNAVAILABLE: the client may retry)."""

    def __init__(self, handle):
        self.handle = handle

    async def stream(self, prompt_ids, params, request_id):
        for attempt in range(2):
            response = self.handle.options(stream=True).generate.remote(request_id, prompt_ids, params)
            started = False
            try:
                async for event in response:
                    if isinstance(event, REFUSALS):  # RouterReplica.generate's refusal
                        raise event
                    started = True
                    yield event
                return
            except ray.exceptions.RayActorError as e:
                if started or attempt:
                    raise Unavailable(f"the pipeline replica running this request was lost ({type(e).__name__}); "
                                      "retry the request") from None
                log.warning("router replica lost before request %s started; sending it again", request_id)
            finally:
                response.cancel()  # no-op once finished; otherwise the router aborts and frees the KV cache

    async def stats(self) -> dict:
        return await self.handle.stats.remote()


def model_card(config: MoerayConfig) -> ModelCard:
    args = ModelArgs.from_dir(config.model)
    return ModelCard(id=config.serve.model_name or Path(config.model).name, max_model_len=args.max_seq_len,
                     vocab_size=args.vocab_size, architecture="mixtral" if args.moe else "mistral",
                     num_experts=args.num_experts, num_experts_per_tok=args.moe.num_experts_per_tok if args.moe else 0)


@serve.ingress()
class Ingress(GrpcApi):
    """HTTP (OpenAI, TGI, /health, /metrics) from build_http_app; gRPC (moeray.v1 + health) as methods
    named after the RPCs, inherited from GrpcApi."""

    def __init__(self, router, config: MoerayConfig):
        self.service = Service(HandleBackend(router), Tokenizer.from_dir(config.model), model_card(config),
                               api_key=config.serve.api_key,
                               allow_remote_without_key=config.serve.allow_remote_without_key)
        super().__init__(self.service)

    def __serve_build_asgi_app__(self):
        return build_http_app(self.service)
