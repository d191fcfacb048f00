"""EngineLoop on the tiny model: only its thread touches the engine, so the event loop never waits for a step."""

import asyncio
import threading
import time

import pytest
from servers import IDLE, load

from cluster.loop import EngineLoop
from kernels.engine import Engine, EngineConfig, QueueFull, Request
from kernels.sampling import SamplingParams
from kernels.structured import Grammar

LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=5, temperature=0)
PROMPT = [1, 5, 6]


class HeldEngine(Engine):
    """An Engine whose steps, while `hold` is set, wait inside step() for `release`: a step provably in
    progress. `held_step_done` is set when such a step returns."""

    def hold_steps(self) -> None:
        self.hold, self.entered, self.release, self.held_step_done = (threading.Event() for _ in range(4))
        self.hold.set()

    def step(self):
        if getattr(self, "hold", None) is None or not self.hold.is_set():
            return super().step()
        self.entered.set()
        self.release.wait(timeout=60)  # only so that a loop that blocks its event loop fails instead of hanging
        events = super().step()
        self.held_step_done.set()
        return events


@pytest.fixture
def held(tiny_model):
    engine = HeldEngine.from_dir(tiny_model, EngineConfig(max_num_seqs=2, max_queued_requests=1))
    loop = EngineLoop(engine)
    yield engine, loop
    loop.stop()


def test_add_and_abort_do_not_wait_for_the_step_in_progress(held, tiny_model):
    engine, loop = held

    async def run():
        a = loop.generate(Request("a", PROMPT, LONG))
        await anext(a)
        engine.hold_steps()
        await asyncio.to_thread(engine.entered.wait)  # a's next step is now inside Engine.step, held there
        b = loop.generate(Request("b", PROMPT, SHORT))
        b_first = asyncio.ensure_future(anext(b))  # b's add goes out ...
        await a.aclose()  # ... and a's abort
        await asyncio.sleep(0)  # b's task ran up to waiting for its first token
        during_the_step = not engine.held_step_done.is_set()
        engine.hold.clear()
        engine.release.set()
        tokens = [(await b_first).token] + [ev.token async for ev in b]
        return during_the_step, tokens

    during_the_step, tokens = asyncio.run(run())
    assert during_the_step, "the event loop waited for the engine step to finish"
    assert tokens == Engine.from_dir(tiny_model).generate([PROMPT], SHORT)[0].token_ids
    assert load(loop.stats()) == IDLE  # a's abort reached the engine


def test_refused_requests_raise_before_any_token_and_leave_the_others_alone(held, tiny_model):
    engine, loop = held

    async def run():
        running = [loop.generate(Request(rid, PROMPT, LONG)) for rid in ("a", "b")]  # the two batch slots
        for s in running:
            await anext(s)
        queued = loop.generate(Request("c", PROMPT, SHORT))  # the queue of one
        queued_first = asyncio.ensure_future(anext(queued))
        await asyncio.sleep(0)  # c's add goes out first
        with pytest.raises(ValueError, match="already in use"):
            await anext(loop.generate(Request("a", PROMPT, SHORT)))
        with pytest.raises(QueueFull):
            await anext(loop.generate(Request("d", PROMPT, SHORT)))
        # the commands run in order, so whatever the refused duplicate did to "a" is done by now
        in_engine = sorted(engine.seqs)
        for s in running:
            await s.aclose()
        tokens = [(await queued_first).token] + [ev.token async for ev in queued]
        return in_engine, tokens

    in_engine, tokens = asyncio.run(run())
    assert in_engine == ["a", "b", "c"]
    assert tokens == Engine.from_dir(tiny_model).generate([PROMPT], SHORT)[0].token_ids


class SlowGrammarEngine(Engine):
    """An Engine whose grammars take 0.5 s to build (a large vocabulary's first one takes ~0.1 s), noting
    the thread that built them."""

    def grammar_state(self, grammar):
        self.built_on = threading.current_thread().name
        time.sleep(0.5)
        return super().grammar_state(grammar)


def test_a_grammar_is_built_off_the_step_thread(tiny_model):
    """While a structured-output request's grammar is built, the running sequences keep stepping."""
    engine = SlowGrammarEngine.from_dir(tiny_model)
    loop = EngineLoop(engine)

    async def run():
        # long enough to run through the 0.5 s build (400 tokens took 0.36 s on a 2-core AVX2 CPU)
        a = loop.generate(Request("a", PROMPT, SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)))
        await anext(a)
        b = loop.generate(Request("b", PROMPT, SamplingParams(max_tokens=8, temperature=0,
                                                              grammar=Grammar.regex("(yes|no)!"))))
        b_events = asyncio.ensure_future(_collect(b))
        await asyncio.sleep(0.05)  # b's grammar is being built
        t0, during = time.perf_counter(), 0
        async for _ in a:  # a's tokens in the next 0.3 s (all of them, on a machine fast enough to end it sooner)
            during += 1
            if time.perf_counter() - t0 >= 0.3:
                break
        await a.aclose()
        return during, await b_events

    try:
        during, b_events = asyncio.run(run())
    finally:
        loop.stop()
    assert engine.built_on != "engine-loop"
    assert during > 5, during  # a step thread building the grammar would have given `a` no token in 0.3 s
    assert "".join(ev.text for ev in b_events) in ("yes!", "no!")


async def _collect(stream):
    return [ev async for ev in stream]
