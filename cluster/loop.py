"""Drives an Engine from a thread and streams each request's tokens to asyncio callers.

The step loop is blocking torch and transport work, so it gets its own thread; requests arrive
from an event loop (a Ray async actor, a Serve replica). Each request has an asyncio.Queue that the
loop thread feeds with `call_soon_threadsafe`. A caller that stops listening (client gone, task
cancelled) aborts its request, so its sequence leaves the batch at the next step and frees its KV.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

from kernels.engine import Engine, Request, TokenEvent

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.Lock()  # the engine is not thread-safe: one holder at a time
        self._wake = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, req: Request) -> AsyncIterator[TokenEvent]:
        """Streams the request's TokenEvents; the last has a finish_reason. ValueError for bad requests."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.engine.add_request(req)  # raises ValueError before anything is queued
            self._queues[req.request_id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            self._queues.pop(req.request_id, None)
            if not finished:
                with self._lock:
                    self.engine.abort(req.request_id)

    def stats(self) -> dict:
        with self._lock:
            e = self.engine
            return {"running": e.num_running, "waiting": e.num_waiting, "kv_cache_usage": e.kv_cache_usage}

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _deliver(self, request_id: str, item) -> None:
        target = self._queues.get(request_id)
        if target:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _run(self) -> None:
        while not self._stopped:
            with self._lock:
                busy = self.engine.has_unfinished()
                if busy:
                    try:
                        events = self.engine.step()
                    except Exception as e:  # a failed step fails the requests in it, not the loop
                        log.exception("engine step failed")
                        failed = list(self.engine.seqs)
                        for rid in failed:
                            self.engine.abort(rid)
                        events = [(rid, RuntimeError(f"generation failed: {e}")) for rid in failed]
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            for ev in events:
                if isinstance(ev, tuple):
                    self._deliver(*ev)
                else:
                    self._deliver(ev.request_id, ev)
