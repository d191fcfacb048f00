"""`moeray bench startup`: how long `moeray serve` and `serve run configs/serve.yaml` take from the command to
the first answered chat request, cold (the OS page cache dropped first, where this process may do that)
and warm (the runs after), and the resident memory of their processes once idle, by role. The
baseline, measured in the same run: Ray Serve itself, `serve run` of a one-line application.

Linux only: processes and their memory are read from /proc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import yaml

from actors.cli.bench import write_report
from cluster.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
HELLO = """from ray import serve
from starlette.responses import JSONResponse

@serve.deployment
class Hello:
    async def __call__(self, request):
        return JSONResponse({"choices": [{"message": {"content": "hello"}}]})

app = Hello.bind()
"""


def _children(pid: int) -> list[int]:
    """`pid` and every process below it."""
    parents: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents[ppid].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


def _role(pid: int) -> str:
    """What a process is, from its title: Ray names its workers `ray::<actor class>` (the Serve replicas
    `ray::ServeReplica:<app>:<deployment>`)."""
    try:
        cmd = (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")).strip()
    except OSError:
        return "gone"
    if cmd.startswith("ray::"):
        return cmd.split()[0].removeprefix("ray::").split(".")[0]
    for name in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env", "moeray serve",
                 "serve run"):
        if name in cmd:
            return name
    return Path(cmd.split()[0]).name if cmd else "?"


def _rss_mb(pids: list[int]) -> dict[str, float]:
    by_role: dict[str, float] = defaultdict(float)
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    by_role[_role(pid)] += int(line.split()[1]) / 1024
        except OSError:
            pass
    return dict(sorted(by_role.items(), key=lambda kv: -kv[1]))


def _answer(url: str) -> bool:
    body = json.dumps({"messages": [{"role": "user", "content": "What is moeray?"}], "max_tokens": 8}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status == 200 and bool(json.load(r)["choices"][0]["message"]["content"])
    except (OSError, ValueError, KeyError, IndexError):
        return False


def _drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _run(command: list[str], port: int, cwd: str, idle_s: float) -> dict:
    """Starts `command`, times the first answered request on `port`, waits `idle_s`, reads memory, stops it."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MOERAY_API_KEY")}
    env.update(RAY_AUTH_MODE="disabled", RAY_ADDRESS="local",  # a Ray instance of its own, for `serve run` too
               PYTHONPATH=os.pathsep.join(filter(None, [cwd, env.get("PYTHONPATH")])))  # the baseline's module
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not _answer(f"http://127.0.0.1:{port}"):
            if proc.poll() is not None or time.perf_counter() - t0 > 600:
                raise RuntimeError(f"{' '.join(command)} did not answer (exit code {proc.poll()})")
            time.sleep(0.2)
        first = time.perf_counter() - t0
        time.sleep(idle_s)
        memory = _rss_mb(_children(proc.pid))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"first_answer_s": round(first, 2), "idle_rss_mb": round(sum(memory.values())),
            "rss_by_role_mb": {k: round(v) for k, v in memory.items()}}


def _serve_config(directory: str, port: int, import_path: str | None = None) -> str:
    config = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    config["http_options"]["port"] = port
    if import_path:
        config["applications"] = [{"name": "hello", "route_prefix": "/", "import_path": import_path}]
    path = Path(directory) / f"serve-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def bench_startup(runs: int, idle_s: float, out: str | None) -> dict:
    cold = _drop_page_cache()
    systems = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "hello_app.py").write_text(HELLO)
        commands = {
            "moeray serve": lambda port: ["moeray", "serve", "--http-port", str(port)],
            "serve run configs/serve.yaml": lambda port: ["serve", "run", _serve_config(tmp, port)],
            "baseline: serve run of a one-line app":
                lambda port: ["serve", "run", _serve_config(tmp, port, "hello_app:app")],
        }
        for i in range(runs):
            for name, command in commands.items():
                if i == 0 and cold:
                    _drop_page_cache()
                port = free_port()
                result = _run(command(port), port, tmp, idle_s)
                systems.setdefault(name, []).append(result)
                print(f"{name:40s} run {i + 1}: first answer {result['first_answer_s']:6.1f} s, "
                      f"idle RSS {result['idle_rss_mb']} MB", flush=True)
    base = systems["baseline: serve run of a one-line app"]
    report = {"cold_means": "page cache dropped before run 1" if cold else "first run (could not drop the page cache)",
              "runs": systems, "summary": {}}
    print(f"\nrun 1 is {report['cold_means']}; warm = best of the runs after it")
    print(f"{'':40s} {'cold s':>8s} {'warm s':>8s} {'idle RSS MB':>12s} {'vs baseline (warm s, RSS)':>28s}")
    for name, rs in systems.items():
        warm = min(r["first_answer_s"] for r in rs[1:]) if len(rs) > 1 else rs[0]["first_answer_s"]
        base_warm = min(r["first_answer_s"] for r in base[1:]) if len(base) > 1 else base[0]["first_answer_s"]
        rss = rs[-1]["idle_rss_mb"]
        row = {"cold_s": rs[0]["first_answer_s"], "warm_s": warm, "idle_rss_mb": rss,
               "warm_vs_baseline": round(warm / base_warm, 2),
               "rss_vs_baseline": round(rss / base[-1]["idle_rss_mb"], 2)}
        report["summary"][name] = row
        print(f"{name:40s} {row['cold_s']:8.1f} {warm:8.1f} {rss:12d} {row['warm_vs_baseline']:13.2f}x "
              f"{row['rss_vs_baseline']:6.2f}x")
    print("\nidle RSS by process (last run of moeray serve):")
    for role, mb in systems["moeray serve"][-1]["rss_by_role_mb"].items():
        print(f"  {role:50s} {mb:6d} MB")
    write_report(out, report)
    return report


if __name__ == "__main__":
    bench_startup(int(sys.argv[1]) if len(sys.argv) > 1 else 3, 5.0, None)
