"""Soak: many concurrent streaming clients against a real server over loopback for a bounded time, a
burst past the router's waiting queue, then idle, then checks (`moeray bench soak`, tests/test_soak.py).

The server is what `moeray serve` runs: a fresh local Ray instance and the Serve app of actors.app (an
Ingress for HTTP and gRPC; a Router with its attention actor and expert shard), on free 127.0.0.1 ports.
The clients (actors.cli.loadgen.run_load) take turns at OpenAI chat and completions over SSE, TGI
/generate_stream and gRPC GenerateStream. One HTTP request in seven asks for a long answer and closes
its stream after two tokens (a user who stops reading); gRPC clients do that only with
`grpc_disconnects` (see `jobs`: Ray Serve's gRPC proxy can lose the cancel). A rejected client backs
off briefly and sends its next request, as a real one would.

    warm-up (C clients, C_burst more in its middle third) -> idle -> soak (the same for D s) -> idle -> checks

Checks (the exit code of `moeray bench soak` is 1 if one fails):
  - no request lost: sent = completed + rejected + failed + cancelled, and every completed stream ended
    with its final event and the token count it asked for (ignore_eos: exactly max_tokens);
  - nothing failed, and every rejection was a 429 / RESOURCE_EXHAUSTED with the API's error body;
  - backpressure: the burst was rejected in part, every API saw rejections, and the waiting queue never
    exceeded engine.max_queued_requests (sampled from /metrics);
  - idle afterwards, within 2 s of the last client's end (a correct server needs one step; 0.02 s
    here): no sequence running or waiting, 0 KV blocks in use. A disconnected sequence that was not
    aborted would still be decoding its long answer (hundreds of steps, seconds); one that was aborted
    but not freed would hold its blocks for ever;
  - memory stable: the server's RSS at idle after the soak within RSS_TOLERANCE of its RSS at idle after
    the warm-up (see RSS_TOLERANCE);
  - in the burst, rejections no slower than first tokens (p99): a 429 that takes longer than being
    served saves the client nothing. A timing, so the bench checks it and the test does not.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from contextlib import aclosing
from dataclasses import dataclass

from actors.cli.bench import write_report
from actors.cli.loadgen import Cancelled, Incomplete, Rejected, Report, _percentile, run_load
from cluster.ports import free_port

# Weights and the KV cache are allocated up front, and the warm-up runs the same mix (burst, rejections,
# disconnects) so allocator pools and caches reach their high-water mark before the baseline. What is
# left is allocator noise and high-water marks of step scratch: +0.7% to +4.5% (of ~2.1 GB, 6
# processes) in runs of 10 to 300 s here, and a 300 s run's RSS under load levelled off (sampled every
# 10 s) rather than climbing. 10% is twice the most seen; over the default run's ~1,250 requests it
# catches a leak of ~170 KB per request, over a 300 s run's ~5,000, ~45 KB.
RSS_TOLERANCE = 0.10
APIS = ("chat", "completions", "tgi", "grpc")
PROMPTS = ["What is an expert?", "How does the router batch requests?", "What is moeray?",
           "Tell me about the KV cache.", "Why split attention and experts?"]


@dataclass(frozen=True)
class Job:
    api: str  # one of APIS
    prompt: str
    max_tokens: int
    disconnect_after: int | None  # close the stream after this many tokens; None: read to the end


def jobs(long_tokens: int, grpc_disconnects: bool = False) -> list[Job]:
    """84 requests: every (api, length, disconnect) combination (4 x 3 x 7 is the period). A client that
    disconnects asked for `long_tokens`: had its sequence not been aborted, it would still be running
    (and holding its KV blocks) when the server should be idle.

    gRPC clients disconnect only with `grpc_disconnects`: Ray Serve's gRPC proxy (2.60) loses a client's
    cancel when it arrives while the proxy is writing a message rather than awaiting the next one
    (proxy.py send_request_to_replica is closed at `yield result`; only a CancelledError inside
    ProxyResponseGenerator.__anext__ cancels the replica call), so the generation runs to max_tokens.
    Nothing on our side sees that cancel; the option reproduces it."""
    def disconnects(i: int) -> bool:
        return i % 7 == 6 and (grpc_disconnects or APIS[i % 4] != "grpc")

    return [Job(APIS[i % 4], PROMPTS[i % len(PROMPTS)], long_tokens, 2) if disconnects(i) else
            Job(APIS[i % 4], PROMPTS[i % len(PROMPTS)], (16, 32, 48)[i % 3], None) for i in range(84)]


# -- clients ------------------------------------------------------------------------------------------
class Clients:
    """One streaming client per API. Each yields once per token, returns only after the stream's final
    event with the expected token count, and raises loadgen's Rejected (a 429 / RESOURCE_EXHAUSTED with
    the API's error body), Cancelled (its own disconnect), Incomplete (no final event), or anything else
    for a failure (another status, a 429 with a wrong body, an error event)."""

    def __init__(self, http_url: str, grpc_target: str, model: str):
        import grpc
        import httpx

        from cluster.rpc import moeray_pb2_grpc as rpc

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # default 100 would queue here
        self.http = httpx.AsyncClient(base_url=http_url, timeout=httpx.Timeout(60.0, connect=10.0), limits=limits)
        self.channel = grpc.aio.insecure_channel(grpc_target)
        self.stub = rpc.GenerationServiceStub(self.channel)
        self.model = model
        self.outcomes: dict[str, dict[str, int]] = {api: {} for api in APIS}  # api -> outcome -> requests

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.channel.close()

    async def stream(self, job: Job, _params=None):
        outcome = "completed"
        try:
            async with aclosing(getattr(self, job.api)(job)) as tokens:
                async for n in tokens:
                    yield n
        except BaseException as e:
            outcome = {Rejected: "rejected", Cancelled: "cancelled", Incomplete: "lost"}.get(type(e), "failed")
            if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
                outcome = "lost"  # the request timeout cancelled it
            raise
        finally:
            tally = self.outcomes[job.api]
            tally[outcome] = tally.get(outcome, 0) + 1

    @staticmethod
    def _rejected(status: int, body: bytes, api: str) -> Exception:
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if api == "tgi":
            ok = isinstance(payload, dict) and payload.get("error_type") == "overloaded" and payload.get("error")
        else:
            err = payload.get("error") if isinstance(payload, dict) else None
            ok = isinstance(err, dict) and err.get("type") == "rate_limit_error" and err.get("message")
        if status == 429 and ok:
            return Rejected(body.decode()[:200])
        return RuntimeError(f"{api}: HTTP {status}: {body.decode(errors='replace')[:200]}")

    async def _sse(self, path: str, body: dict, job: Job):
        """The `data:` payloads of a 200 answer, parsed ("[DONE]" as is); another status raises."""
        async with self.http.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                raise self._rejected(r.status_code, await r.aread(), job.api)
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    data = line[5:].strip()
                    yield data if data == "[DONE]" else json.loads(data)

    async def _openai(self, path: str, body: dict, job: Job):
        body = {**body, "model": self.model, "max_tokens": job.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        tokens, finish, usage, done = 0, None, None, False
        async with aclosing(self._sse(path, body, job)) as events:  # closing it closes the connection
            async for data in events:
                if data == "[DONE]":
                    done = True
                    break
                if "error" in data:
                    raise RuntimeError(f"{job.api}: error event: {data['error']}")
                if data.get("usage"):
                    usage = data["usage"]["completion_tokens"]
                for choice in data.get("choices") or []:
                    if "role" in (choice.get("delta") or {}):
                        continue  # chat's first chunk: the role, no token
                    tokens += 1
                    finish = choice.get("finish_reason") or finish
                    yield tokens
                    if tokens == job.disconnect_after:
                        raise Cancelled()
        if not (done and finish == "length" and usage == tokens == job.max_tokens):
            raise Incomplete(f"{job.api}: done={done} finish={finish} usage={usage} tokens={tokens}/{job.max_tokens}")

    def chat(self, job: Job):
        return self._openai("/v1/chat/completions", {"messages": [{"role": "user", "content": job.prompt}]}, job)

    def completions(self, job: Job):
        return self._openai("/v1/completions", {"prompt": job.prompt}, job)

    async def tgi(self, job: Job):
        # TGI has no ignore_eos: a generation may end early at EOS, so the check is its own token count
        body = {"inputs": job.prompt, "parameters": {"max_new_tokens": job.max_tokens, "details": True}}
        tokens, details = 0, None
        async with aclosing(self._sse("/generate_stream", body, job)) as events:
            async for data in events:
                if "error" in data:
                    raise RuntimeError(f"tgi: error event: {data}")
                tokens += 1
                details = data.get("details")
                yield tokens
                if tokens == job.disconnect_after:
                    raise Cancelled()
        finish = details and details["finish_reason"]
        if not (details and details["generated_tokens"] == tokens
                and (finish == "eos_token" or (finish == "length" and tokens == job.max_tokens))):
            raise Incomplete(f"tgi: details={details} tokens={tokens}/{job.max_tokens}")

    async def grpc(self, job: Job):
        import grpc

        from cluster.rpc import moeray_pb2 as pb

        call = self.stub.GenerateStream(pb.GenerateRequest(
            model=self.model, text=job.prompt,
            params=pb.SamplingParameters(max_tokens=job.max_tokens, temperature=0, ignore_eos=True)))
        tokens, last = 0, None
        try:
            async for message in call:
                tokens += 1
                last = message
                yield tokens
                if tokens == job.disconnect_after:
                    call.cancel()
                    raise Cancelled()
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and tokens == 0 and e.details():
                raise Rejected(e.details()) from None
            raise RuntimeError(f"grpc: {e.code().name}: {e.details()}") from None
        if not (last and last.finish_reason == pb.FINISH_REASON_LENGTH
                and last.usage.completion_tokens == tokens == job.max_tokens):
            raise Incomplete(f"grpc: tokens={tokens}/{job.max_tokens} last={last}")


# -- the server --------------------------------------------------------------------------------------
class Server:
    """`moeray serve`'s application on a fresh local Ray instance, on free loopback ports."""

    def __init__(self, config):
        self.config = config

    def start(self) -> None:
        import ray
        from ray import serve

        from actors.app import moeray_app, serve_options

        if ray.is_initialized():
            raise RuntimeError("the soak starts its own Ray instance: call it from a process not connected to Ray")
        # the workers' logs stay in Ray's session directory: under load, Serve logs every rejection with its
        # traceback, and printing those here would take CPU from the clients
        ray.init(address="local", logging_level="ERROR", configure_logging=False, include_dashboard=False,
                 log_to_driver=False)
        self.logs = ray._private.worker._global_node.get_logs_dir_path()
        quiet = {"log_level": "WARNING"}
        serve.start(**serve_options(self.config), logging_config=quiet)
        serve.run(moeray_app(self.config), name="moeray", route_prefix="/", logging_config=quiet)

    def stop(self) -> None:
        import ray

        ray.shutdown()  # this process started the instance: that stops every process of it, Serve's included

    @staticmethod
    def rss_mb() -> dict[str, float]:
        """Resident memory (MB) of this Ray instance's serving processes, by process title (ray::Role),
        summed over processes of the same role. Ray's own agents and idle workers are left out."""
        import psutil
        import ray

        raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
        out: dict[str, float] = {}
        for p in psutil.Process(raylet).children(recursive=True):
            try:
                title = (p.cmdline() or [""])[0]
                rss = p.memory_info().rss
            except psutil.Error:
                continue  # exited meanwhile
            if title.startswith("ray::") and not title.startswith(("ray::IDLE", "ray::DashboardAgent",
                                                                     "ray::RuntimeEnvAgent")):
                # "ray::Class" or "ray::Class.method" while a method runs
                role = title.removeprefix("ray::").removeprefix("ServeReplica:moeray:").split(".")[0]
                out[role] = out.get(role, 0.0) + rss / 2**20
        return out


async def read_metrics(http, names=("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")) -> dict:
    text = (await http.get("/metrics")).text
    out = {}
    for name in names:
        m = re.search(rf"^moeray:{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


# -- the run -------------------------------------------------------------------------------------------
def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def _load(clients: Clients, http, work: list[Job], concurrency: int, burst: int, seconds: float,
                timeout_s: float, peaks: dict, rss: list | None = None) -> tuple[Report, Report]:
    """`concurrency` clients for `seconds`, `burst` more in the middle third; /metrics sampled meanwhile,
    and the server's RSS every 10 s into `rss` as (seconds, MB): a leak climbs, a high-water mark levels."""
    stop, t0 = asyncio.Event(), time.perf_counter()

    async def burst_run() -> Report:
        await asyncio.sleep(seconds / 3)
        return await run_load(clients.stream, work, None, burst, duration_s=seconds / 3, request_timeout_s=timeout_s,
                              backoff_s=0.05)

    async def monitor() -> None:
        while not stop.is_set():
            try:
                m = await read_metrics(http)
            except Exception:  # noqa: BLE001 - a slow scrape under load is not the server's failure
                m = {}
            for k, v in m.items():
                peaks[k] = max(peaks.get(k, 0.0), v)
            now = time.perf_counter() - t0
            if rss is not None and now >= 10 * len(rss):
                rss.append((round(now), round(sum(Server.rss_mb().values()), 1)))
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(monitor())
    try:
        steady, bursty = await asyncio.gather(
            run_load(clients.stream, work, None, concurrency, duration_s=seconds, request_timeout_s=timeout_s,
                     backoff_s=0.2), burst_run())
    finally:
        stop.set()
        await watcher
    return steady, bursty


async def _wait_idle(http, timeout_s: float) -> tuple[dict, float]:
    """Polls /metrics until nothing runs, waits or holds KV blocks; the last reading and how long it took."""
    t0 = time.perf_counter()
    while True:
        m = await read_metrics(http)
        if (m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0 and m["kv_cache_usage_perc"] == 0) \
                or time.perf_counter() - t0 > timeout_s:
            return m, time.perf_counter() - t0
        await asyncio.sleep(0.2)


def soak(model: str | None = None, concurrency: int = 64, burst: int = 64, duration: float = 60.0,
         warmup: float = 15.0, max_num_seqs: int = 64, max_queued: int = 16, idle_within: float = 2.0,
         request_timeout: float = 120.0, config_path: str | None = None, grpc_disconnects: bool = False) -> dict:
    """Runs the soak (see the module docstring) and returns its figures and checks."""
    import httpx

    from actors.app import with_defaults
    from cluster.config import load_config
    from kernels.args import ModelArgs

    cfg = with_defaults(load_config(config_path, {"model": model}))
    e, s = cfg.engine, cfg.serve
    e.max_num_seqs, e.max_queued_requests = max_num_seqs, max_queued
    e.max_num_batched_tokens = max(e.max_num_batched_tokens, max_num_seqs)
    s.host, s.http_port, s.grpc_port = "127.0.0.1", free_port(), free_port()
    # one Ingress replica, admitting every client: the router's bounded queue is then the only place a
    # request can wait, and the process set is the same from warm-up to end (the RSS comparison)
    s.ingress.min_replicas = s.ingress.max_replicas = 1
    s.ingress.max_ongoing_requests = 4 * (concurrency + burst)
    model_name = s.model_name or cfg.model.rstrip("/").rsplit("/", 1)[-1]
    work = jobs(min(1000, ModelArgs.from_dir(cfg.model).max_seq_len - 64), grpc_disconnects)  # room for prompts
    http_url, grpc_target = f"http://127.0.0.1:{s.http_port}", f"127.0.0.1:{s.grpc_port}"

    say(f"starting the Serve app ({cfg.model}) on a local Ray instance")
    t0 = time.perf_counter()
    server = Server(cfg)
    server.start()
    startup_s = time.perf_counter() - t0
    result: dict = {"server": "Ray Serve app (moeray serve's), local Ray instance, loopback", "logs": server.logs,
                    "model": model_name, "concurrency": concurrency, "burst": burst, "duration_s": duration,
                    "warmup_s": warmup, "max_num_seqs": max_num_seqs, "max_queued_requests": max_queued,
                    "grpc_disconnects": grpc_disconnects,
                    "kv_blocks": e.num_blocks, "startup_s": round(startup_s, 1)}
    try:
        rss = {"start": server.rss_mb()}

        async def run() -> None:
            clients = Clients(http_url, grpc_target, model_name)
            http = httpx.AsyncClient(base_url=http_url, timeout=30.0)
            try:
                say(f"warm-up: {concurrency} clients for {warmup:.0f}s, {burst} more in its middle third")
                await _load(clients, http, work, concurrency, burst, warmup, request_timeout, {})
                _, result["warmup_drain_s"] = await _wait_idle(http, idle_within)
                await asyncio.sleep(1.0)
                rss["after_warmup"] = server.rss_mb()
                clients.outcomes = {api: {} for api in APIS}
                say(f"soak: {concurrency} clients for {duration:.0f}s, {burst} more in its middle third")
                peaks: dict = {}
                timeline: list = []
                steady, bursty = await _load(clients, http, work, concurrency, burst, duration, request_timeout, peaks,
                                             timeline)
                result["rss_timeline_mb"] = timeline
                say("idle: waiting for the server to drain")
                idle, drain_s = await _wait_idle(http, idle_within)
                if drain_s > idle_within:  # for the report: does it ever drain (slow abort) or not (a leak)?
                    _, late = await _wait_idle(http, 60.0)
                    result["idle_late_s"] = round(drain_s + late, 2)
                await asyncio.sleep(1.0)
                rss["end"] = server.rss_mb()
                result.update(steady=steady, bursty=bursty, peaks=peaks, idle=idle, drain_s=drain_s,
                              by_api=clients.outcomes)
            finally:
                await clients.aclose()
                await http.aclose()

        asyncio.run(run())
    finally:
        say("stopping the server")
        server.stop()
    return _figures(result, rss)


def _figures(result: dict, rss: dict) -> dict:
    steady, bursty, peaks, idle = (result.pop(k) for k in ("steady", "bursty", "peaks", "idle"))
    total = Report()
    total.add(steady)
    total.add(bursty)
    ms = lambda xs, q: round(_percentile(xs, q) * 1e3, 1)  # noqa: E731
    kv_idle = round(idle["kv_cache_usage_perc"] * result["kv_blocks"])
    warm, end = sum(rss["after_warmup"].values()), sum(rss["end"].values())
    result.update({
        "sent": total.sent, "completed": total.requests, "rejected": total.rejected, "failed": total.failed,
        "cancelled": total.cancelled, "lost": total.lost, "burst_rejected": bursty.rejected,
        "burst_sent": bursty.sent, "tokens": total.tokens, "tokens_per_s": round(total.tokens / steady.seconds, 1),
        "ttft_p50_ms": ms(total.ttft, 50), "ttft_p99_ms": ms(total.ttft, 99),
        "itl_p50_ms": ms(total.itl, 50), "itl_p99_ms": ms(total.itl, 99),
        "rejection_p50_ms": ms(total.rejection_s, 50), "rejection_p99_ms": ms(total.rejection_s, 99),
        # the burst alone: rejections and first tokens under the same load
        "burst_ttft_p50_ms": ms(bursty.ttft, 50), "burst_ttft_p99_ms": ms(bursty.ttft, 99),
        "burst_rejection_p50_ms": ms(bursty.rejection_s, 50), "burst_rejection_p99_ms": ms(bursty.rejection_s, 99),
        "waiting_max": int(peaks.get("num_requests_waiting", 0)),
        "running_max": int(peaks.get("num_requests_running", 0)),
        "kv_usage_max": round(peaks.get("kv_cache_usage_perc", 0.0), 3),
        "idle": {"running": int(idle["num_requests_running"]), "waiting": int(idle["num_requests_waiting"]),
                 "kv_blocks_in_use": kv_idle}, "drain_s": round(result.pop("drain_s"), 2),
        "warmup_drain_s": round(result["warmup_drain_s"], 2),
        "rss_mb": {k: {role: round(v, 1) for role, v in sorted(d.items())} for k, d in rss.items()},
        "rss_total_mb": {k: round(sum(d.values()), 1) for k, d in rss.items()},
        "rss_growth": round(end / warm - 1, 4), "errors": total.errors[:10],
    })
    by_api = result["by_api"]
    result["checks"] = {
        "no request lost": total.lost == 0,
        "no failure but 429 / RESOURCE_EXHAUSTED": total.failed == 0,
        "burst got 429s": bursty.rejected > 0,
        "every API (chat, completions, tgi, grpc) completed and was rejected": all(
            o.get("completed") and o.get("rejected") for o in by_api.values()),
        "burst: rejections no slower than first tokens (p99)":
            result["burst_rejection_p99_ms"] <= result["burst_ttft_p99_ms"],
        "waiting queue <= max_queued_requests": result["waiting_max"] <= result["max_queued_requests"],
        "idle: nothing running or waiting": idle["num_requests_running"] == 0 and idle["num_requests_waiting"] == 0,
        "idle: 0 KV blocks in use": kv_idle == 0,
        f"RSS after soak within {RSS_TOLERANCE:.0%} of after warm-up": end <= warm * (1 + RSS_TOLERANCE),
    }
    result["ok"] = all(result["checks"].values())
    return result


def print_report(r: dict) -> None:
    print(f"server: {r['server']}; model {r['model']}; ready in {r['startup_s']} s; its logs: {r['logs']}")
    print(f"engine: max_num_seqs {r['max_num_seqs']}, max_queued_requests {r['max_queued_requests']}, "
          f"{r['kv_blocks']} KV blocks; clients: {r['concurrency']} for {r['duration_s']:.0f} s + {r['burst']} "
          f"in the middle third (OpenAI chat/completions SSE, TGI stream, gRPC; 1 in 7 disconnects after 2 tokens"
          f"{', gRPC ones included' if r['grpc_disconnects'] else ', HTTP only'})")
    print(f"requests: sent {r['sent']}, completed {r['completed']}, rejected {r['rejected']} (burst: "
          f"{r['burst_rejected']} of {r['burst_sent']}), cancelled by the client {r['cancelled']}, "
          f"failed {r['failed']}, lost {r['lost']}")
    print(f"rejections (429 / RESOURCE_EXHAUSTED with the API's error body): p50 {r['rejection_p50_ms']} ms, "
          f"p99 {r['rejection_p99_ms']} ms; in the burst: p50 {r['burst_rejection_p50_ms']} ms, "
          f"p99 {r['burst_rejection_p99_ms']} ms, against its first tokens' p50 {r['burst_ttft_p50_ms']} ms, "
          f"p99 {r['burst_ttft_p99_ms']} ms")
    print(f"throughput {r['tokens_per_s']} tok/s; TTFT p50 {r['ttft_p50_ms']} ms, p99 {r['ttft_p99_ms']} ms; "
          f"ITL p50 {r['itl_p50_ms']} ms, p99 {r['itl_p99_ms']} ms")
    print(f"peaks (/metrics every 0.25 s): waiting {r['waiting_max']} (bound {r['max_queued_requests']}), "
          f"running {r['running_max']}, KV {100 * r['kv_usage_max']:.1f}%")
    print("by API (completed / rejected / cancelled / failed / lost): " + "; ".join(
        f"{api} {'/'.join(str(o.get(k, 0)) for k in ('completed', 'rejected', 'cancelled', 'failed', 'lost'))}"
        for api, o in r["by_api"].items()))
    i = r["idle"]
    print(f"idle after {r['drain_s']} s: running {i['running']}, waiting {i['waiting']}, "
          f"KV blocks in use {i['kv_blocks_in_use']} of {r['kv_blocks']}"
          + (f" (all idle {r['idle_late_s']} s after the last client)" if "idle_late_s" in r else ""))
    t = r["rss_total_mb"]
    print(f"server RSS (MB, all serving processes): start {t['start']}, after warm-up {t['after_warmup']}, "
          f"end {t['end']} ({100 * r['rss_growth']:+.1f}% since warm-up)")
    print("  by process (after warm-up -> end): " + ", ".join(
        f"{k} {r['rss_mb']['after_warmup'].get(k, 0)} -> {v}" for k, v in r["rss_mb"]["end"].items()))
    print("  under load, every 10 s (s: MB): " + " ".join(f"{t}: {mb:.0f}" for t, mb in r["rss_timeline_mb"]))
    if r["errors"]:
        print("first errors:", *r["errors"][:5], sep="\n  ")
    for name, ok in r["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")


def bench_soak(model: str | None, config: str | None, concurrency: int, burst: int, duration: float, warmup: float,
               max_num_seqs: int, max_queued: int, grpc_disconnects: bool, out: str | None) -> dict:
    r = soak(model, concurrency, burst, duration, warmup, max_num_seqs, max_queued, config_path=config,
             grpc_disconnects=grpc_disconnects)
    print_report(r)
    write_report(out, r)
    return r
