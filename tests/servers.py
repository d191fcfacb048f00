"""Servers and inputs that several test modules share (test modules do not import each other): the HTTP
API under uvicorn and moeray.v1 under grpc.aio, each over a Service and an EngineLoop in this process;
the pipeline tests' prompts."""

import asyncio
import socket
import threading
import time
from pathlib import Path

import grpc
import torch
import uvicorn
from grpc_health.v1 import health_pb2_grpc

from cluster.api.grpc_api import GrpcApi, add_to_server
from cluster.api.http_api import build_http_app
from cluster.api.service import LocalBackend, ModelCard, Service
from cluster.loop import EngineLoop
from cluster.rpc import moeray_pb2_grpc
from kernels.engine import Engine, EngineConfig

CHAT = [{"role": "user", "content": "Hello"}]
IDLE = {"running": 0, "waiting": 0, "kv_cache_usage": 0}


def load(stats: dict) -> dict:
    """An engine loop's running and waiting sequences and KV-cache use, out of its stats (IDLE when idle)."""
    return {key: stats[key] for key in IDLE}


def live_shards() -> dict[str, str]:
    """The Ray cluster's live ExpertShard actors, actor id -> name: a Serve application's pool names its shards;
    the Python API's and the expert scaler's extra replicas have none ("")."""
    from actors.common import live_actors

    return {a["id"]: a["name"] for a in live_actors("ExpertShard")}


class HttpServer:
    """uvicorn serving `app` from a background thread, on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve_http(tiny_model, api_key=None, max_model_len=None, backend=LocalBackend, **config):
    engine = Engine.from_dir(tiny_model, EngineConfig(**config))
    loop = EngineLoop(engine)
    card = ModelCard("tiny", max_model_len or engine.args.max_seq_len, engine.args.vocab_size, "mixtral")
    service = Service(backend(loop), engine.tokenizer, card, api_key=api_key)
    return service, loop, HttpServer(build_http_app(service))


class GrpcServer:
    """A Service over an EngineLoop, served by grpc.aio from an event loop in a thread of its own."""

    def __init__(self, model_dir: Path, config: EngineConfig, backend=LocalBackend, api_key: str | None = None,
                 max_model_len: int | None = None):
        engine = Engine.from_dir(model_dir, config)
        self.loop_thread = EngineLoop(engine)
        card = ModelCard("tiny-mixtral", max_model_len or engine.args.max_seq_len, engine.args.vocab_size, "mixtral",
                         created=1700000000)
        self.service = Service(backend(self.loop_thread), engine.tokenizer, card, api_key=api_key)
        self.aio = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.aio.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(self._start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = moeray_pb2_grpc.GenerationServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def _start(self) -> grpc.aio.Server:
        server = grpc.aio.server()
        add_to_server(GrpcApi(self.service), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.aio).result(timeout=30)

    def stats(self) -> dict:
        return self.run(self.service.backend.stats())

    def wait_for(self, check, timeout: float = 10) -> dict:
        """Polls the engine's stats until check(stats); returns the last stats either way."""
        deadline = time.monotonic() + timeout
        while not check(stats := self.stats()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return stats

    def close(self):
        self.channel.close()
        self.run(self.server.stop(None))
        self.aio.call_soon_threadsafe(self.aio.stop)
        self.thread.join(5)
        self.loop_thread.stop()


def prompts(seed=5, lengths=(3, 8, 15, 21, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
