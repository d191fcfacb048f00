"""Faults injected under load, and what every request in flight saw: the fault tests and
`moeray bench faults` run these same scenarios.

    pipeline level (Pipeline API; a load of concurrent streams keeps running through the fault)
        expert-shard-killed       SIGKILL a base expert shard's process: Ray restarts it, the router
                                  finds it again and re-sends the rows; every request completes
        attention-actor-killed    SIGKILL the attention actor: its KV cache is gone; the router waits
                                  for the restart and the running sequences recompute their caches
        expert-shard-stuck        SIGSTOP a shard (alive, silent): calls hit their deadline, the router
                                  gives up after restart_timeout_s and fails the step's requests
    serve level (HTTP through Ray Serve; streaming and non-streaming requests in flight)
        router-replica-killed     SIGKILL the Router replica (it owns the pipeline's workers)
        ingress-replica-killed    SIGKILL the Ingress replica (Serve's proxy talks to it)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from actors.cli.bench import write_report
from actors.cli.loadgen import Report, run_load
from cluster.ports import free_port
from kernels.sampling import SamplingParams


@dataclass
class Outcome:
    """How one HTTP request in flight at the fault ended, and how long after the fault."""

    kind: str  # "done" | "stream-error" (an error event, after tokens) | "status" (non-200) | "cut" (connection) | "ok"
    seconds: float
    status: int = 200
    detail: str = ""


@dataclass
class FaultRun:
    fault: str
    sent: int = 0
    completed: int = 0
    failed: int = 0  # ended with an error the client can see and retry
    lost: int = 0  # no end at all (must be 0)
    recovered_s: float = 0.0  # from the fault until the system served a request again
    worst_end_s: float | None = None  # the slowest request in flight to end after the fault (where measured)
    errors: list[str] = field(default_factory=list)

    def row(self) -> str:
        end = "-" if self.worst_end_s is None else f"{self.worst_end_s:.1f}s"
        return (f"{self.fault:<24} {self.sent:>5} {self.completed:>9} {self.failed:>6} {self.lost:>4} "
                f"{end:>9} {self.recovered_s:>8.1f}s")


HEADER = f"{'fault':<24} {'sent':>5} {'completed':>9} {'failed':>6} {'lost':>4} {'last end':>9} {'serving':>9}"


def from_report(fault: str, report: Report, recovered_s: float) -> FaultRun:
    return FaultRun(fault, report.sent, report.requests, report.failed + report.rejected, report.lost,
                    recovered_s, None, report.errors)


# -- pipeline level ---------------------------------------------------------------------------------
def under_load(pipe, prompts: list[list[int]], params: SamplingParams, fault: Callable[[], None],
               concurrency: int = 5, warmup_s: float = 0.5) -> Report:
    """Runs `fault()` (blocking, in a thread) while `concurrency` streams stay in flight; the load stops
    when it returns, and the streams in flight are waited for."""
    async def scenario():
        stop = False

        async def inject():
            nonlocal stop
            await asyncio.sleep(warmup_s)  # streams are mid-generation by now
            try:
                await asyncio.to_thread(fault)
            finally:
                stop = True

        return (await asyncio.gather(run_load(pipe, prompts, params, concurrency=concurrency, stop=lambda: stop,
                                              request_timeout_s=120), inject()))[0]

    return asyncio.run(scenario())


def _wait(check: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - t0


def worker_killed(pipe, role: str, prompts, params, concurrency: int = 5,
                  settle_s: float = 0.5) -> tuple[FaultRun, Report, dict]:
    """SIGKILLs the first attention actor (role "attention") or the last base expert shard ("expert")
    under load; returns the run, the load's report, and the worker's info before and after."""
    import ray

    victim = pipe.attention[0] if role == "attention" else pipe.experts[-1]
    old = ray.get(victim.info.remote())
    before = pipe.stats()["worker_recoveries"]
    took = []

    def fault():
        t0 = time.monotonic()
        os.kill(old["pid"], signal.SIGKILL)
        _wait(lambda: pipe.stats()["worker_recoveries"] > before, 120, f"the router to find the restarted {role}")
        took.append(time.monotonic() - t0)
        time.sleep(settle_s)  # some steps on the restarted worker

    report = under_load(pipe, prompts, params, fault, concurrency)
    name = "attention-actor-killed" if role == "attention" else "expert-shard-killed"
    return from_report(name, report, took[0]), report, {"old": old, "new": ray.get(victim.info.remote())}


def shard_stuck(pipe, prompts, params) -> tuple[FaultRun, Report]:
    """SIGSTOPs a base expert shard while `len(prompts)` requests run, SIGCONTs it once they have all
    ended, then times how long until the pipeline serves again."""
    import ray

    pid = ray.get(pipe.experts[0].info.remote())["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        report = asyncio.run(run_load(pipe, prompts, params, concurrency=len(prompts), requests=len(prompts),
                                      request_timeout_s=120))
        worst = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    t1 = time.monotonic()
    pipe.generate(prompts[:1], params)
    run = from_report("expert-shard-stuck", report, time.monotonic() - t1)
    run.worst_end_s = worst
    return run, report


# -- serve level ------------------------------------------------------------------------------------
def in_flight(url: str, n_stream: int, n_unary: int, kill: Callable[[], None], model: str | None = None,
              max_tokens: int = 400) -> list[Outcome]:
    """Starts streaming and non-streaming completions at `url`, calls kill() once every stream has a
    token, and returns how each request ended."""
    body = {"model": model, "prompt": "Tell me about experts", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    first = [concurrent.futures.Future() for _ in range(n_stream)]
    killed_at: concurrent.futures.Future = concurrent.futures.Future()

    def since() -> float:
        return time.monotonic() - killed_at.result()

    def stream(i: int) -> Outcome:
        import httpx

        try:
            with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=180) as r:
                if r.status_code != 200:
                    return Outcome("status", since(), r.status_code, r.read().decode()[:300])
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return Outcome("stream-error", since(), 200, chunk["error"]["message"])
                    first[i].done() or first[i].set_result(True)
            return Outcome("done", since())
        except httpx.HTTPError as e:
            return Outcome("cut", since(), 0, type(e).__name__)
        finally:
            first[i].done() or first[i].set_result(False)

    def unary(_) -> Outcome:
        import httpx

        r = httpx.post(url + "/v1/completions", json=body, timeout=180)
        return Outcome("done" if r.status_code == 200 else "status", since(), r.status_code, r.text[:300])

    with concurrent.futures.ThreadPoolExecutor(n_stream + n_unary) as pool:
        futures = [pool.submit(stream, i) for i in range(n_stream)] + [pool.submit(unary, i) for i in range(n_unary)]
        if not all(f.result(timeout=120) for f in first):
            raise RuntimeError("a stream never started")
        time.sleep(0.2)
        kill()
        killed_at.set_result(time.monotonic())
        return [f.result(timeout=300) for f in futures]


def serves_again(url: str, model: str | None = None, timeout: float = 180) -> float:
    """Seconds until a completion at `url` succeeds; every attempt must be answered (no hang)."""
    import httpx

    t0 = time.monotonic()
    while True:
        r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 3}, timeout=timeout)
        if r.status_code == 200:
            return time.monotonic() - t0
        if r.status_code not in (500, 502, 503) or time.monotonic() - t0 > timeout:
            raise RuntimeError(f"not serving again: HTTP {r.status_code}: {r.text[:200]}")
        time.sleep(0.5)


def serve_fault(name: str, url: str, kill: Callable[[], None], model: str | None = None, n_stream: int = 3,
                n_unary: int = 2) -> tuple[FaultRun, list[Outcome]]:
    outcomes = in_flight(url, n_stream, n_unary, kill, model)
    run = FaultRun(name, sent=len(outcomes), completed=sum(o.kind == "done" for o in outcomes))
    run.failed = len(outcomes) - run.completed
    run.worst_end_s = max(o.seconds for o in outcomes)
    run.errors = [f"{o.kind} {o.status}: {o.detail[:120]}" for o in outcomes if o.kind != "done"]
    run.recovered_s = run.worst_end_s + serves_again(url, model)
    return run, outcomes


def serve_pid(class_name: str) -> int:
    """The pid of the live Serve replica actor of `class_name` ("ServeReplica:moeray:Router")."""
    from actors.common import live_actors

    [actor] = live_actors(class_name)
    return actor["pid"]


# -- `moeray bench faults` -------------------------------------------------------------------------
def bench_faults(model: str | None, concurrency: int, max_tokens: int, out: str | None) -> list[FaultRun]:
    """Every scenario above on a local Ray instance (the built-in demo model by default), printed as a
    table; outputs of the pipeline-level runs are compared with the single-process engine."""
    import ray
    from ray import serve

    from actors.app import moeray_app, serve_options, with_defaults
    from actors.pipeline import Pipeline
    from cluster.config import MoerayConfig
    from kernels.engine import Engine

    config = with_defaults(MoerayConfig(model=model))
    config.pipeline.experts.shards = 2
    config.pipeline.restart_timeout_s = 60
    engine = Engine.from_dir(config.model)
    prompts = [engine.tokenizer.encode(q) for q in ("What is moeray?", "What does the router do?",
                                                     "How are experts placed?", "What is a KV cache?", "Hello")]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    reference = [c.token_ids for c in engine.generate(prompts, params)]
    ray.init(logging_level="ERROR", configure_logging=False)
    runs = []
    print(HEADER)

    def record(run: FaultRun, same: bool | None = None) -> None:
        runs.append(run)
        print(run.row() + ("" if same is None else f"  same tokens: {'yes' if same else 'NO'}"), flush=True)

    try:
        pipe = Pipeline.start(config)
        try:
            for role in ("expert", "attention"):
                run, report, _ = worker_killed(pipe, role, prompts, params, concurrency)
                record(run, all(t == reference[i] for i, t in report.outputs))
        finally:
            pipe.shutdown()
        stuck = with_defaults(MoerayConfig(model=model))
        stuck.pipeline.experts.shards, stuck.pipeline.transport.timeout_s = 2, 2.0
        stuck.pipeline.restart_timeout_s = 3.0
        pipe = Pipeline.start(stuck)
        try:
            record(shard_stuck(pipe, prompts, params)[0])
        finally:
            pipe.shutdown()

        config.serve.http_port, config.serve.grpc_port = free_port(), free_port()
        serve.start(**serve_options(config))
        serve.run(moeray_app(config), name="moeray", route_prefix="/")
        url, name = f"http://127.0.0.1:{config.serve.http_port}", config.serve.model_name
        for fault, cls in (("router-replica-killed", "Router"), ("pool-replica-killed", "ExpertPool"),
                           ("ingress-replica-killed", "Ingress")):
            pid = serve_pid(f"ServeReplica:moeray:{cls}")
            record(serve_fault(fault, url, partial(os.kill, pid, signal.SIGKILL), name)[0])
        serve.shutdown()
    finally:
        ray.shutdown()
    for run in runs:
        for e in sorted(set(run.errors))[:3]:
            print(f"  {run.fault}: {e}")
    write_report(out, [run.__dict__ for run in runs])
    return runs
