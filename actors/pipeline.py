"""Start one pipeline replica on a Ray cluster, submit requests, stream their tokens.

    pipeline = Pipeline.start(load_config("configs/pipeline-local.yaml"))
    [done] = pipeline.generate([prompt_ids], SamplingParams(max_tokens=32))
    async for event in pipeline.stream(prompt_ids, params): ...
    other = Pipeline.start(config, pool=pipeline.pool)   # a second replica calling the same expert shards
    pipeline.shutdown()

A pipeline started without a pool starts one of its own (an ExpertPool actor holding the expert shards,
and the expert scaler when scaling is enabled), which its shutdown stops; one started with another's
pool joins it and leaves it serving.

Ray places and starts the actors (the control plane); the per-layer traffic between them goes over
the transport (frames over plain TCP, or gRPC; with kind gloo or nccl the tensors over a process group
that the router forms with its workers), never through Ray.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator, Iterable

import ray

from actors.pool import ExpertPool, call
from actors.router import Router, router_name
from actors.workers import RAY, start_attention
from cluster.config import MoerayConfig
from cluster.placement import Placement, ray_options
from kernels.engine import Completion, TokenEvent, params_per_prompt
from kernels.sampling import SamplingParams


class Pipeline:
    def __init__(self, config: MoerayConfig, placement: Placement, router, attention: list, experts: list, pool,
                 owns_pool: bool):
        self.config, self.placement = config, placement
        self.router, self.attention, self.experts = router, attention, experts
        self.pool, self.owns_pool = pool, owns_pool
        self._ids = itertools.count()

    @classmethod
    def start(cls, config: MoerayConfig, address: str | None = None, pool=None) -> Pipeline:
        """Starts the actors on the Ray cluster at `address` (default: the one this process is connected
        to, else a new local one) and waits until every data-plane server answers. `pool`: another
        pipeline's ExpertPool to join (its config's expert placement and data plane apply), else a new one."""
        if not ray.is_initialized():
            ray.init(address=address, logging_level="ERROR", configure_logging=False)
        owns_pool = pool is None
        if owns_pool:
            pool = ray.remote(ExpertPool).options(num_cpus=0).remote(config)
        name = router_name()
        info = call(pool, "join", name)
        w = start_attention(info.config, info.placement, info.experts, info.addresses, shared=not owns_pool)
        router = RAY.start(Router, ray_options(config.pipeline.router, "router", config.engine.device), w, pool,
                           (info.version, info.table), name)
        ray.get(router.info.remote())
        return cls(w.config, w.placement, router, w.attention, w.experts, pool, owns_pool)

    def _submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None):
        rid = request_id or f"req-{uuid.uuid4().hex[:12]}-{next(self._ids)}"
        return self.router.generate.options(num_returns="streaming").remote(rid, list(prompt_ids), params)

    async def stream(self, prompt_ids: list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[TokenEvent]:
        """TokenEvents as the router samples them. Stopping early (break, cancel) aborts the request."""
        gen = self._submit(prompt_ids, params, request_id)
        try:
            async for ref in gen:
                yield await ref
        finally:
            ray.cancel(gen)  # no-op when finished; otherwise the router aborts and frees the KV cache

    def generate(self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Runs prompts to completion, all in flight at once; results in prompt order."""
        prompts = list(prompts)
        streams = [self._submit(p, sp, None)
                   for p, sp in zip(prompts, params_per_prompt(params, len(prompts)), strict=True)]
        results = []
        for gen in streams:
            done = Completion("")
            for ref in gen:
                ev = ray.get(ref)
                done.request_id = ev.request_id
                done.add(ev)
            results.append(done)
        return results

    def stats(self) -> dict:
        return ray.get(self.router.stats.remote())

    def info(self) -> dict:
        """Where each role runs and what it holds (node ids, layers, expert pairs, parameter bytes)."""
        return {"router": ray.get(self.router.info.remote()),
                "attention": ray.get([a.info.remote() for a in self.attention]),
                "experts": ray.get([e.info.remote() for e in self.experts])}

    def scaler_status(self) -> dict | None:
        """The pool's expert scaler's view: replicas and targets per pair, pending ones, events. None when off."""
        return call(self.pool, "status")["scaler"]

    def shutdown(self) -> None:
        """Stops this replica's router and attention actors, and its pool if it started it (the shards and
        extra replicas die with the pool)."""
        ray.get(self.router.stop.remote())
        ray.get(self.pool.leave.remote(ray.get(self.router.info.remote())["name"]))
        for actor in [self.router, *self.attention]:
            ray.kill(actor)
        if self.owns_pool:
            ray.get(self.pool.shutdown.remote())
            ray.kill(self.pool)
