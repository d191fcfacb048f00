"""Drives an Engine from a thread and streams each request's tokens to asyncio callers.

The step loop is blocking torch and transport work, so it gets its own thread, and only that thread
touches the engine: requests arrive from an event loop (a Ray async actor, a Serve replica) as
commands (add, abort) on a queue that the thread drains between steps, so the event loop never
waits for a step. Each request has an asyncio.Queue that the thread feeds with
`call_soon_threadsafe`; when add_request refuses a request, its exception is the queue's first and
only item, so the caller of `generate` gets it before any token. A caller that stops listening
(client gone, task cancelled) aborts its request, so its sequence leaves the batch before the next
step and frees its KV. stats() reads a snapshot the thread publishes after each step, before it
hands out the step's tokens.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable

from kernels.engine import Engine, Request, TokenEvent
from kernels.structured import GrammarState

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()  # run by the step thread
        # request id -> (the caller's event loop, its queue); the step thread's alone
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._publish()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, req: Request) -> AsyncGenerator[TokenEvent, None]:
        """Streams the request's TokenEvents; the last has a finish_reason. Before any event: ValueError
        for a bad request, the engine's QueueFull when its waiting queue is full."""
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        # a grammar is compiled here, on a worker thread, not on the step thread, where it would stall every
        # running sequence for its milliseconds (a refusal raises here, before any event, as add_request's)
        grammar = (await asyncio.to_thread(self.engine.grammar_state, req.params.grammar)
                   if req.params.grammar else None)
        self._commands.put(lambda: self._add(req, loop, events, grammar))
        done = False
        try:
            while not done:
                item = await events.get()
                if isinstance(item, BaseException):
                    done = True  # refused, or failed and aborted: the engine holds nothing of it
                    raise item
                done = item.finish_reason is not None
                yield item
        finally:
            if not done:
                self._commands.put(lambda: self._abort(req.request_id))

    def stats(self) -> dict:
        """Running and waiting requests and KV-cache use, as the step thread last published them (after
        each step, or after commands while idle): never waits for a step."""
        return dict(self._stats)

    def stop(self) -> None:
        self._commands.put(self._halt)
        self._thread.join(timeout=5)

    # -- the step thread ------------------------------------------------------------------------
    def _add(self, req: Request, loop: asyncio.AbstractEventLoop, events: asyncio.Queue,
             grammar: GrammarState | None) -> None:
        try:
            self.engine.add_request(req, grammar)
        except Exception as e:  # not registered: a duplicate id must not take over the running one's queue
            _send(loop, events, e)
            return
        self._queues[req.request_id] = (loop, events)

    def _abort(self, request_id: str) -> None:
        if self._queues.pop(request_id, None):  # not already finished, failed, or refused
            self.engine.abort(request_id)

    def _halt(self) -> None:
        self._stopped = True

    def _publish(self) -> None:
        e = self.engine
        self._stats = {"running": e.num_running, "waiting": e.num_waiting, "kv_cache_usage": e.kv_cache_usage,
                       **e.counters}

    def _deliver(self, request_id: str, item, last: bool) -> None:
        target = self._queues.pop(request_id, None) if last else self._queues.get(request_id)
        if target:
            _send(*target, item)

    def _step(self) -> None:
        events: list[tuple[str, TokenEvent | Exception, bool]]  # (request_id, item, last)
        try:
            events = [(ev.request_id, ev, ev.finish_reason is not None) for ev in self.engine.step()]
        except Exception as e:  # a failed step fails the requests in it, not the loop
            log.exception("engine step failed")
            failed = list(self.engine.seqs)
            for rid in failed:
                self.engine.abort(rid)
            events = [(rid, RuntimeError(f"generation failed: {e}"), True) for rid in failed]
        self._publish()  # before the tokens: a caller that got its last token sees the request gone
        for ev in events:
            self._deliver(*ev)

    def _run(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self._commands.get()()  # idle: sleep until a command comes
            while True:  # then every command that is waiting (those that came during the last step)
                try:
                    self._commands.get_nowait()()
                except queue.Empty:
                    break
            if self._stopped:
                return
            if self.engine.has_unfinished():
                self._step()
            else:
                self._publish()


def _send(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, item) -> None:
    try:
        loop.call_soon_threadsafe(events.put_nowait, item)
    except RuntimeError:  # the caller's event loop is closed: nobody listens (its abort may still be queued)
        pass
