"""`moeray serve`, the README's main command, as a user runs it: the demo model on a fresh local Ray
instance, one request over HTTP, Ctrl-C, a clean exit."""

import json
import os
import signal
import subprocess
import time
import urllib.request

from cluster.bench import free_port


def test_moeray_serve_answers_then_stops_on_ctrl_c():
    http, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(["moeray", "serve", "--address", "local", "--http-port", str(http),
                             "--grpc-port", str(grpc_port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    try:
        deadline = time.monotonic() + 240
        for line in proc.stdout:  # the banner comes once the application is ready
            if "Ctrl-C to stop" in line:
                break
            assert time.monotonic() < deadline
        body = json.dumps({"messages": [{"role": "user", "content": "What is moeray?"}], "max_tokens": 40,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{http}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
        reply = json.load(urllib.request.urlopen(request, timeout=120))
        assert reply["model"] == "moeray-demo"
        assert reply["choices"][0]["message"]["content"].startswith("Moeray is a server for mixture of experts")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        assert "shutting down" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
