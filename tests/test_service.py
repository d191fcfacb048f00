"""The Service layer shared by the HTTP and gRPC APIs, on a real EngineLoop with the tiny model."""

import asyncio
import traceback
from contextlib import aclosing

import pytest
from ray.exceptions import RayTaskError

from cluster.api.service import Conflict, InvalidRequest, LocalBackend, ModelCard, Overloaded, Service, Unavailable
from cluster.loop import EngineLoop
from kernels.engine import Engine, EngineConfig, RequestIdInUse
from kernels.sampling import SamplingParams


@pytest.fixture(scope="module")
def service(tiny_model):
    engine = Engine.from_dir(tiny_model, EngineConfig(max_num_seqs=2, max_queued_requests=1))
    loop = EngineLoop(engine)
    yield Service(LocalBackend(loop), engine.tokenizer, ModelCard("tiny", 2048, engine.args.vocab_size, "mixtral"))
    loop.stop()


def collect(service, ids, params):
    async def run():
        return [ev async for ev in await service.open_stream(ids, params)]
    return asyncio.run(run())


def test_stream_matches_engine_and_counts_metrics(service, tiny_model):
    ids = service.prompt_from_text("The router")
    events = collect(service, ids, SamplingParams(max_tokens=6, temperature=0))
    expected = Engine.from_dir(tiny_model).generate([ids], SamplingParams(max_tokens=6, temperature=0))[0]
    assert [e.token for e in events] == expected.token_ids
    m = service.metrics
    assert m.generation_tokens._value.get() >= 6 and m.prompt_tokens._value.get() >= len(ids)


@pytest.mark.parametrize("call, param", [
    (lambda s: s.prompt_from_text(""), "prompt"),
    (lambda s: s.prompt_from_ids([1, -3]), "prompt"),
    (lambda s: s.prompt_from_chat([{"role": "assistant", "content": "x"}]), "messages"),
    (lambda s: s.check_model("gpt-4"), "model"),
    (lambda s: s.sampling([1] * 2000, 100), "max_tokens"),
    (lambda s: s.sampling([1, 2], 5, temperature=-1), "temperature"),
    (lambda s: s.sampling([1, 2], 5, temperature=float("nan")), "temperature"),
    (lambda s: s.sampling([1, 2], 5, stop_token_ids=[2, 10**12]), "stop_token_ids"),
    (lambda s: s.sampling([1, 2], 5, stop_token_ids=[2, 512]), "stop_token_ids"),
    (lambda s: s.sampling([1, 2], 5, stop_token_ids=[-1]), "stop_token_ids"),
])
def test_invalid_requests_name_the_field(service, call, param):
    with pytest.raises(InvalidRequest) as e:
        call(service)
    assert e.value.param == param and e.value.http_status == 400


def test_overload_is_429_and_early_close_frees_the_request(service):
    async def run():
        long = SamplingParams(max_tokens=400, ignore_eos=True)
        streams = [await service.open_stream([1, 5, 6], long) for _ in range(2)]  # the two batch slots
        for s in streams:
            await s.__anext__()
        queued = asyncio.ensure_future(service.open_stream([1, 5, 6], long))  # fills the queue of one
        await asyncio.sleep(0.2)
        with pytest.raises(Overloaded):
            await service.open_stream([1, 5, 6], long)
        for s in streams:
            await s.aclose()
        third = await queued
        await third.aclose()
        for _ in range(100):
            if (await service.backend.stats())["running"] == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(run())


def test_a_stream_closed_before_iterating_aborts_at_once(service):
    """No reliance on the garbage collector: aclose() on a fresh stream reaches the backend."""
    import gc

    async def run():
        gc.disable()
        try:
            stream = await service.open_stream([1, 5, 6], SamplingParams(max_tokens=400, ignore_eos=True))
            await stream.aclose()
            for _ in range(100):
                if (await service.backend.stats())["running"] == 0:
                    return True
                await asyncio.sleep(0.02)
            return False
        finally:
            gc.enable()

    assert asyncio.run(run())


# -- errors from behind Ray: a Serve handle raises a replica's exception as a RayTaskError -------------
def ray_task_error(cause: BaseException, where: str = "Router.generate") -> Exception:
    """What a Serve handle raises for an exception in a replica, built as Ray builds it: a RayTaskError that is
    also an instance of the cause's class, whose text is the remote traceback (file paths, pid, ip)."""
    try:
        raise cause
    except BaseException:
        err = RayTaskError(where, traceback.format_exc(), cause).as_instanceof_cause()
    assert 'File "' in str(err) and "pid=" in str(err)  # what must not reach a client
    return err


class FailingBackend(LocalBackend):
    """Streams `tokens` real tokens, then raises `error`."""

    def __init__(self, loop: EngineLoop, error: BaseException, tokens: int = 0):
        super().__init__(loop)
        self.error, self.tokens = error, tokens

    async def stream(self, prompt_ids, params, request_id):
        async with aclosing(super().stream(prompt_ids, params, request_id)) as events:
            for _ in range(self.tokens):
                yield await anext(events)
        raise self.error


nested = ray_task_error(ray_task_error(RuntimeError("expert shard 3 is gone"), "ExpertShard.forward"))


@pytest.mark.parametrize("error, tokens, kind, message", [
    (ray_task_error(ValueError("request needs 900 tokens of KV cache; the cache holds 512")), 0, InvalidRequest,
     "request needs 900 tokens of KV cache; the cache holds 512"),
    (ray_task_error(RequestIdInUse("request id 'job-7' is already in use")), 0, Conflict,
     "request_id 'job-7' is in use by a generation in progress"),
    (ray_task_error(RuntimeError("expert shard 3 is gone")), 0, Unavailable,
     "generation failed: expert shard 3 is gone"),
    (nested, 0, Unavailable, "generation failed: expert shard 3 is gone"),
    (nested, 2, Unavailable, "generation failed: expert shard 3 is gone; retry the request"),  # mid-stream
], ids=["value error", "request id in use", "runtime error", "nested", "nested mid-stream"])
def test_ray_task_errors_reach_the_client_as_their_cause(service, error, tokens, kind, message):
    """The client gets the cause's message with the right status, never Ray's traceback."""
    backend = FailingBackend(service.backend.loop, error, tokens)
    s = Service(backend, service.tokenizer, service.card)

    async def run():
        stream = await s.open_stream([1, 5, 6], SamplingParams(max_tokens=10, temperature=0), "job-7")
        async with aclosing(stream):
            return [ev async for ev in stream]

    with pytest.raises(kind) as e:
        asyncio.run(run())
    assert e.value.message == message
    assert "Traceback" not in e.value.message and 'File "' not in e.value.message
