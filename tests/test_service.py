"""The Service layer shared by the HTTP and gRPC APIs, on a real EngineLoop with the tiny model."""

import asyncio

import pytest

from cluster.loop import EngineLoop
from cluster.service import InvalidRequest, LocalBackend, ModelCard, Overloaded, Service
from kernels.engine import Engine, EngineConfig
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
