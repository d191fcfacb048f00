"""The Ray Serve paths a platform team takes, as they take them: `serve run` of the shipped
configs/serve.yaml (ports overridden, gRPC turned on, an API key) in a subprocess, and `serve deploy`
/ `moeray deploy` of it onto a running Ray cluster (ray.cluster_utils.Cluster, with its dashboard),
answered by the real openai client and a generated gRPC stub, from loopback and this machine's other
address."""

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import openai
import pytest
import yaml
from servers import live_shards

from actors.app import GRPC_SERVICERS
from cluster.ports import free_port
from cluster.rpc import moeray_pb2 as pb
from cluster.rpc import moeray_pb2_grpc as rpc

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-deploy-test"
ANSWER = "Moeray is a server for mixture of experts"
ENV = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MOERAY_API_KEY")}
ENV["RAY_AUTH_MODE"] = "disabled"


def shipped_config(tmp_path: Path, http_port: int, grpc_port: int | None = None, host: str = "127.0.0.1",
                   **args) -> Path:
    """configs/serve.yaml as shipped, with its ports (and optionally host, gRPC, app args) changed."""
    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    config["http_options"].update(host=host, port=http_port)
    if grpc_port:
        config["grpc_options"] = {"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICERS}
    config["applications"][0]["args"].update(args)
    path = tmp_path / f"serve-{http_port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def chat(base_url: str, api_key: str = "none", model: str = "moeray-demo") -> str:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=model, max_tokens=30, temperature=0,
                                           messages=[{"role": "user", "content": "What is moeray?"}])
    return reply.choices[0].message.content


def wait_until(check, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 (not up yet)
            last = e
        else:
            last = None
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not in {seconds} s (last error: {last})")
        time.sleep(1)


def test_serve_run_of_the_shipped_config_with_a_key(tmp_path, remote_address):
    """`serve run configs/serve.yaml` (HTTP on every interface, gRPC on, MOERAY_API_KEY where the app is built):
    loopback and this machine's other address both need the key, over HTTP and gRPC."""
    http, grpc_port, remote = free_port(), free_port(), remote_address
    path = shipped_config(tmp_path, http, grpc_port, host="0.0.0.0")
    proc = subprocess.Popen(["serve", "run", str(path)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**ENV, "RAY_ADDRESS": "local", "MOERAY_API_KEY": KEY})
    try:
        assert wait_until(lambda: chat(f"http://127.0.0.1:{http}", KEY), 240, "serve run answering").startswith(ANSWER)
        assert chat(f"http://{remote}:{http}", KEY).startswith(ANSWER)
        with pytest.raises(openai.AuthenticationError):
            chat(f"http://{remote}:{http}")
        hello = pb.GenerateRequest(text="Hello", params=pb.SamplingParameters(max_tokens=4))
        with grpc.insecure_channel(f"{remote}:{grpc_port}") as channel:
            stub = rpc.GenerationServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(hello, timeout=60)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert len(stub.Generate(hello, timeout=60, metadata=[("authorization", f"Bearer {KEY}")]).token_ids) == 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            print(proc.stdout.read())


@pytest.fixture(scope="module")
def cluster_with_dashboard():
    """A running Ray cluster with its dashboard (what `serve deploy` talks to). Yields the dashboard URL."""
    import ray
    from ray.cluster_utils import Cluster

    dashboard = free_port()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": True,
                                                      "dashboard_port": dashboard})
    ray.init(address=c.address, logging_level="ERROR")
    try:
        yield c, f"http://127.0.0.1:{dashboard}"
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def app_status(url: str) -> dict:
    out = subprocess.run(["serve", "status", "--address", url], capture_output=True, text=True, env=ENV, timeout=60)
    return (yaml.safe_load(out.stdout) or {}).get("applications", {}).get("moeray", {})


def test_serve_deploy_then_typos_are_refused_with_the_key_named(tmp_path, cluster_with_dashboard):
    c, url = cluster_with_dashboard
    http = free_port()
    moeray_yaml = tmp_path / "moeray.yaml"  # configs/pipeline-local.yaml, as a file this test may edit
    moeray_yaml.write_text((ROOT / "configs" / "pipeline-local.yaml").read_text())
    good = shipped_config(tmp_path, http, config=str(moeray_yaml))
    subprocess.run(["serve", "deploy", str(good), "--address", url], check=True, env=ENV, timeout=120)
    wait_until(lambda: app_status(url).get("status") == "RUNNING", 300, "serve deploy reaching RUNNING")
    assert chat(f"http://127.0.0.1:{http}").startswith(ANSWER)
    shards = live_shards()
    assert len(shards) == 2, shards

    # the moeray YAML edited in place, the Serve config unchanged: Serve redeploys only on changed args, and
    # `moeray deploy` adds the YAML's sha256 to them; Serve replaces every replica (a new code version), the new
    # pool adopts the running shards
    moeray_config = yaml.safe_load(moeray_yaml.read_text())
    moeray_config["serve"]["model_name"] = "renamed"
    moeray_yaml.write_text(yaml.safe_dump(moeray_config))
    subprocess.run(["moeray", "deploy", str(good), "--address", url], check=True, env=ENV, timeout=120)
    wait_until(lambda: chat(f"http://127.0.0.1:{http}", model="renamed"), 300, "the updated app serving")
    wait_until(lambda: app_status(url).get("status") == "RUNNING", 300, "the update reaching RUNNING")
    assert live_shards() == shards

    # moeray deploy checks the file first: Ray's own schema would ignore this typo
    typo = yaml.safe_load(good.read_text())
    typo["applications"][0]["deployments"] = [{"name": "Ingress", "max_replica": 3}]
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    out = subprocess.run(["moeray", "deploy", str(tmp_path / "typo.yaml"), "--address", url], capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert out.returncode == 2 and "applications[0].deployments[0].max_replica" in out.stderr

    # a typo in the app's args reaches the builder even through plain `serve deploy`: the app fails, naming it
    subprocess.run(["serve", "deploy", str(shipped_config(tmp_path, http, confg="x.yaml")), "--address", url],
                   check=True, env=ENV, timeout=120)
    failed = wait_until(lambda: (s := app_status(url)).get("status") == "DEPLOY_FAILED" and s, 300, "DEPLOY_FAILED")
    assert "args.confg" in failed["message"]

    # `moeray serve` onto this cluster, where Serve already runs with other ports: refused, naming what runs
    out = subprocess.run(["moeray", "serve", "--address", c.address, "--http-port", str(free_port())],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 2 and "already runs" in out.stderr and str(http) in out.stderr

    # deleting the application stops the pool's detached shards
    subprocess.run(["serve", "shutdown", "-y", "--address", url], check=True, env=ENV, timeout=300)
    wait_until(lambda: not live_shards(), 60, "the shards stopped")
