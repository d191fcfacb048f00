"""Typed deployment config, loaded from YAML. Unknown keys and ill-typed values are rejected with the
key's dotted path in the message. Sections are dataclasses; kernels' EngineConfig is one of them.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster.placement import PipelineConfig
from kernels.engine import EngineConfig


class ConfigError(ValueError):
    pass


@dataclass
class IngressConfig:
    """The HTTP/gRPC front's Serve replicas; they scale on ongoing requests, independently of experts."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: int = 16  # Serve adds a replica when replicas average more than this
    upscale_delay_s: float = 10.0  # how long demand must stay above target before Serve adds a replica
    downscale_delay_s: float = 120.0  # ... below target before Serve removes one
    # Requests one replica holds at once (a stream holds its slot to the end). None: enough for every
    # router's batch and waiting queue, so the routers' bounded queue answers 429 before Serve queues.
    max_ongoing_requests: int | None = None

    def capacity(self, routers: int, engine: EngineConfig) -> int:
        """max_ongoing_requests, or the default: `routers`' slots + queues over min_replicas, plus one."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        total = routers * (engine.max_num_seqs + engine.max_queued_requests)
        return -(-total // self.min_replicas) + 1


@dataclass
class RoutersConfig:
    """The Router deployment: pipeline replicas (a router and its attention actors, all calling the one
    expert pool). Serve autoscales them on ongoing requests (running and waiting, per router); min ==
    max fixes their number."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: int = 32  # Serve adds a router when routers average more than this
    upscale_delay_s: float = 30.0  # how long demand must stay above target before Serve adds a router
    downscale_delay_s: float = 300.0  # ... below target before Serve removes one
    look_back_period_s: float = 30.0  # Serve averages the ongoing requests over this window
    drain_timeout_s: float = 600.0  # a router scaled in gets no new requests and this long to finish its own

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("serve.routers needs 1 <= min_replicas <= max_replicas")
        if self.target_ongoing_requests < 1 or self.look_back_period_s <= 0 or min(
                self.upscale_delay_s, self.downscale_delay_s, self.drain_timeout_s) < 0:
            raise ValueError("serve.routers: target_ongoing_requests must be >= 1, look_back_period_s > 0, delays "
                             "and drain_timeout_s >= 0")


@dataclass
class ServeConfig:
    model_name: str | None = None  # the name clients send as "model"; default: the checkpoint directory's name
    host: str = "127.0.0.1"  # HTTP bind address; 0.0.0.0 to let other machines connect (they need the API key)
    http_port: int = 8000
    # The public gRPC API's port; None: no gRPC proxy. Ray Serve's gRPC proxy listens on every interface whatever
    # `host` says, so it is off unless asked for, and then refuses other machines without the API key.
    grpc_port: int | None = None
    routers: RoutersConfig = field(default_factory=RoutersConfig)  # pipeline replicas, sharing one expert pool
    ingress: IngressConfig = field(default_factory=IngressConfig)
    # Clients must send `Authorization: Bearer <api_key>` (HTTP; gRPC metadata `authorization`) on every
    # API call but /health and grpc.health.v1. None here: the MOERAY_API_KEY environment variable of the
    # process that builds the app, if set and non-empty; else no key. The YAML's value wins over the variable.
    api_key: str | None = field(default=None, repr=False)
    # With no API key, a client on another machine gets 403 / PERMISSION_DENIED (HTTP and gRPC alike) unless this
    # is true: only for a network that is itself trusted (a warning says so at start).
    allow_remote_without_key: bool = False

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("serve.api_key is empty; leave it out (or null) for no key")


API_KEY_ENV = "MOERAY_API_KEY"


def api_key_of(serve: ServeConfig) -> str | None:
    """The API key `serve` asks for: serve.api_key if set, else $MOERAY_API_KEY if non-empty, else None."""
    if serve.api_key is not None:
        return serve.api_key
    return os.environ.get(API_KEY_ENV, "").strip() or None


@dataclass
class ScalingConfig:
    """Expert autoscaling: replicas of hot (layer, expert) pairs follow the routers' windowed token rates.
    A pair's replicas count its base shards (the placement's; they always stay) plus extra one-pair replicas."""

    enabled: bool = False
    min_replicas: int = 1  # per pair, base shards included (1: the base shard only)
    max_replicas: int = 4  # per pair, base shards included
    max_extra_replicas: int = 16  # extra replicas over all pairs at once; the hottest pairs get them first
    target_tokens_per_s: float = 200.0  # token rows per second one replica should serve
    upscale_delay_s: float = 10.0  # demand above the current count must last this long before adding
    downscale_delay_s: float = 60.0  # demand below it must last this long before removing
    cooldown_s: float = 30.0  # no change to a pair this long after its last change
    window_s: float = 10.0  # routers' sliding window for the tokens-per-second rate
    interval_s: float = 2.0  # how often the scaler reads the routers' stats and acts
    ready_timeout_s: float = 120.0  # a replica not serving by then is reported unplaceable, stopped and retried

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("scaling needs 1 <= min_replicas <= max_replicas")
        if self.max_extra_replicas < 0:
            raise ValueError("scaling.max_extra_replicas must be >= 0")
        if self.target_tokens_per_s <= 0 or self.window_s <= 0 or self.interval_s <= 0 or self.ready_timeout_s <= 0:
            raise ValueError("scaling: target_tokens_per_s, window_s, interval_s and ready_timeout_s must be > 0")
        if min(self.upscale_delay_s, self.downscale_delay_s, self.cooldown_s) < 0:
            raise ValueError("scaling: delays and cooldown must be >= 0")


@dataclass
class MoerayConfig:
    model: str | None = None  # checkpoint directory (HF or Mistral format); None: the built-in demo model
    engine: EngineConfig = field(default_factory=EngineConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # where the roles run (the Ray pipeline)
    serve: ServeConfig = field(default_factory=ServeConfig)  # the HTTP/gRPC front (`moeray serve`)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)  # expert replicas follow routing load


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is typing.Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls, data, where: str = ""):
    """Builds dataclass `cls` from plain data, strictly. `where` is the dotted path for messages."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key '{where + '.' if where else ''}{key}' (known: {', '.join(sorted(fields))})")
    kwargs = {k: _convert(hints[k], v, f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> MoerayConfig:
    """Reads a YAML file (or nothing: defaults), then applies `overrides` ({"engine": {...}, ...})."""
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            data[section] = {**(data.get(section) or {}), **values}
        elif values is not None:
            data[section] = values
    return from_dict(MoerayConfig, data)
