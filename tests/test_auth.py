"""Where the API key comes from and how it reaches the servers: `serve.api_key` in the YAML, else
$MOERAY_API_KEY; actors.app.with_defaults (which `moeray serve` and the Serve builder both call) puts it in
the config that the Ingress replicas receive. The checks themselves are in test_http_api.py and
test_grpc_api.py, through real servers and clients."""

import asyncio

import httpx
import pytest

from actors.app import with_defaults
from cluster.config import API_KEY_ENV, ConfigError, MoerayConfig, load_config

KEY = "sk-from-config"


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    return monkeypatch


def keyed_config(tmp_path, yaml_key: str | None, model: str = "/m") -> MoerayConfig:
    path = tmp_path / "moeray.yaml"
    path.write_text(f"model: {model}\nserve:\n  http_port: 8001\n" + (f"  api_key: {yaml_key}\n" if yaml_key else ""))
    return load_config(path)


def test_yaml_key_wins_over_the_environment(tmp_path, env):
    assert with_defaults(keyed_config(tmp_path, None)).serve.api_key is None  # neither: no key
    env.setenv(API_KEY_ENV, "sk-from-env\n")  # as `export MOERAY_API_KEY=$(cat keyfile)` might leave it
    assert with_defaults(keyed_config(tmp_path, None)).serve.api_key == "sk-from-env"
    assert with_defaults(keyed_config(tmp_path, KEY)).serve.api_key == KEY
    env.setenv(API_KEY_ENV, "  ")
    assert with_defaults(keyed_config(tmp_path, None)).serve.api_key is None


@pytest.mark.parametrize("value, message", [("''", "serve.api_key is empty"), ("12345", "expected str")])
def test_bad_yaml_keys_are_refused(tmp_path, env, value, message):
    with pytest.raises(ConfigError, match=message):
        keyed_config(tmp_path, value)


def test_the_key_stays_out_of_the_config_repr(tmp_path, env):
    config = keyed_config(tmp_path, KEY)
    config.pipeline.transport.token = "sk-dataplane"
    assert "sk-" not in repr(config) and "8001" in repr(config)


@pytest.mark.filterwarnings("ignore:coroutine .*__del__. was never awaited:RuntimeWarning")  # Serve's wrapper, unused
def test_the_ingress_enforces_the_configured_key(tiny_model, env):
    """The Ingress deployment, constructed as Serve constructs it (with no router behind it: the key is
    checked before anything is asked of the backend)."""
    from actors.ingress import Ingress

    env.setenv(API_KEY_ENV, KEY)
    config = with_defaults(MoerayConfig(model=str(tiny_model)))

    async def get(headers):
        ingress = object.__new__(Ingress)
        await Ingress.__init__(ingress, None, config)  # Serve's ingress wrapper makes __init__ async
        app = ingress.__serve_build_asgi_app__()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return (await c.get("/v1/models", headers=headers)).status_code

    assert asyncio.run(get({})) == 401
    assert asyncio.run(get({"authorization": f"Bearer {KEY}"})) == 200
