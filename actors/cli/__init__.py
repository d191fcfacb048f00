"""The `moeray` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

EPILOG = """examples:
  moeray serve                                   # the built-in demo model on http://127.0.0.1:8000
  moeray chat                                    # talk to the demo model in this terminal
  moeray make-tiny /tmp/tiny
  moeray generate --model /tmp/tiny --prompt "The experts" --max-tokens 32
  moeray generate --model /tmp/tiny --prompt "Hello" --chat --json
"""


def _progress(label: str):
    """A one-line progress counter on stderr (only on a terminal), for long loads."""
    if not sys.stderr.isatty():
        return None

    def report(done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{label}: {done}/{total} ({100 * done // max(total, 1)}%)", end=end, file=sys.stderr, flush=True)

    return report


def cmd_make_tiny(a) -> int:
    from kernels.tiny import make_tiny

    path = make_tiny(a.dir, arch=a.arch, seed=a.seed, force=a.force)
    print(f"wrote a tiny random {a.arch} checkpoint (HF format) to {path}")
    return 0


def cmd_generate(a) -> int:
    from actors.app import with_defaults
    from cluster.config import load_config
    from kernels.engine import Engine, Request
    from kernels.sampling import SamplingParams

    engine_overrides = {k: v for k, v in {"dtype": a.dtype}.items() if v is not None}
    cfg = with_defaults(load_config(a.config, {"model": a.model, "engine": engine_overrides}))
    engine = Engine.from_dir(cfg.model, cfg.engine, progress=_progress("loading weights"))
    if engine.tokenizer is None:
        raise SystemExit(f"moeray generate: {cfg.model} has no tokenizer.model")
    tok = engine.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": a.prompt}]) if a.chat else tok.encode(a.prompt, bos=True)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                            seed=a.seed, stop=a.stop or [], logprobs=0 if a.json else None)
    engine.add_request(Request("cli", prompt, params))
    tokens, text, finish, t0 = [], "", None, time.perf_counter()
    while engine.has_unfinished():
        for ev in engine.step():
            tokens.append(ev.token)
            text += ev.text
            finish = ev.finish_reason
            if not a.json:
                print(ev.text, end="", flush=True)
    seconds = time.perf_counter() - t0
    if a.json:
        print(json.dumps({"prompt_ids": prompt, "token_ids": tokens, "text": text, "finish_reason": finish,
                          "seconds": round(seconds, 4)}))
    else:
        print(f"\n[{len(tokens)} tokens, {len(tokens) / seconds:.1f} tok/s, finish_reason={finish}]", file=sys.stderr)
    return 0


def _say(msg: str) -> None:
    print(f"[moeray] {msg}", file=sys.stderr, flush=True)


def _running_serve_options() -> dict | None:
    """The HTTP and gRPC options of the Serve instance already running on the connected cluster; None if none."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return None
    http, grpc_ = ray.get([controller.get_http_config.remote(), controller.get_grpc_config.remote()])
    return {"host": http.host, "http_port": http.port,
            "grpc_port": grpc_.port if grpc_.grpc_servicer_functions else None}


def _serving(url: str, timeout: float = 5.0) -> bool:
    """Whether Serve's HTTP proxy answers its own health route at `url`."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/-/healthz", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether something takes TCP connections at `address` ("host:port")."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


def _dtype(cfg) -> str:
    """engine.dtype as the model will run, e.g. "bfloat16 (auto)", "float32 (auto; bf16 weights)": what auto
    chooses on this machine's CPU."""
    import torch

    from kernels.build import model_dtype, weight_formats
    from kernels.checkpoint import Checkpoint

    e, ckpt, device = cfg.engine, Checkpoint.open(cfg.model), torch.device(cfg.engine.device)
    dtype = str(model_dtype(e.dtype, ckpt, device)).removeprefix("torch.")
    bf16 = e.dtype == "auto" and weight_formats(e, ckpt, device) != (e.expert_quant, e.weight_quant)
    return dtype + (" (auto; bf16 weights)" if bf16 else " (auto)" if e.dtype == "auto" else "")


def cmd_serve(a) -> int:
    import logging
    import signal

    import ray
    from ray import serve

    from actors.app import QUIET, exposure_warnings, moeray_app, serve_options, with_defaults
    from cluster.api.service import MAX_REQUEST_BYTES
    from cluster.config import load_config

    overrides = {"model": a.model, "serve": {k: v for k, v in {"host": a.host, "http_port": a.http_port,
                                                               "grpc_port": a.grpc_port}.items() if v is not None}}
    cfg = with_defaults(load_config(a.config, overrides))
    s, p = cfg.serve, cfg.pipeline
    # Warnings only by default: the app's, and errors only from Serve's controller and proxies, whose warnings
    # on a healthy start and a clean stop (slow readiness checks, deregistering state) alarm more than they tell.
    logging_config = None if a.verbose else QUIET
    system_logging = None if a.verbose else {**QUIET, "log_level": "ERROR"}
    if not a.verbose:  # the driver's own Serve logger: "Started Serve", "Connecting to existing Serve app", ...
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    address = a.address or os.environ.get("RAY_ADDRESS")
    t0 = time.perf_counter()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill`, `docker stop`, systemd: as Ctrl-C
    ours = address in (None, "local")  # a private Ray instance: it goes when we go
    deployed = False
    try:
        if ours:
            # Ray Serve's gRPC proxy takes messages up to 2 GiB unless told otherwise, and it reads this variable in
            # its own process: it inherits our environment only on a Ray instance started from here.
            os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(MAX_REQUEST_BYTES))
            ray.init(address="local", logging_level="ERROR", configure_logging=False,  # never someone else's
                     include_dashboard=a.dashboard_port is not None,
                     dashboard_port=a.dashboard_port, namespace="moeray")
            _say("started a local Ray instance for this server" + (f" (dashboard on 127.0.0.1:{a.dashboard_port})"
                                                                   if a.dashboard_port is not None else ""))
        else:
            ray.init(address=address, logging_level="ERROR", configure_logging=False)
            _say(f"connected to the Ray cluster at {address}")
            running = _running_serve_options()
            wanted = {"host": s.host, "http_port": s.http_port, "grpc_port": s.grpc_port}
            if running and running != wanted:
                raise ValueError(f"Ray Serve already runs on this cluster with {running}, and a running Serve "
                                 f"keeps its proxies' options: ask for the same ({wanted} here), or stop it first "
                                 "(`serve shutdown`)")
        # ray.init installs Ray's C++ failure handler for SIGTERM (it prints stacks and aborts): as Ctrl-C again
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        for warning in exposure_warnings(cfg, s.host, s.grpc_port is not None):
            _say(f"WARNING: {warning}")
        r = s.routers
        routers = f"{r.min_replicas}" if r.min_replicas == r.max_replicas else f"{r.min_replicas}-{r.max_replicas}"
        _say(f"model {cfg.model} in {_dtype(cfg)}: starting a pool of {p.experts.shards} expert shard(s) x "
             f"{p.experts.replicas} replica(s) and {routers} router(s) with {p.attention.actors} attention actor(s) "
             "each; loading weights...")
        serve.start(**serve_options(cfg), logging_config=system_logging)
        deployed = True
        serve.run(moeray_app(cfg), name="moeray", route_prefix="/", logging_config=logging_config)
        base = f"http://{s.host}:{s.http_port}"
        _say(f"ready in {time.perf_counter() - t0:.1f} s, serving {s.model_name or cfg.model}")
        grpc_line = (f"  gRPC (moeray.v1.GenerationService, grpc.health.v1): port {s.grpc_port} on every interface "
                     "(Ray Serve's proxy); other machines need the API key\n" if s.grpc_port is not None else "")
        print(f"  HTTP (OpenAI, TGI): {base}/v1/chat/completions  {base}/generate  {base}/metrics\n{grpc_line}"
              f"  try: curl {base}/v1/chat/completions -H 'Content-Type: application/json' "
              "-d '{\"messages\": [{\"role\": \"user\", \"content\": \"What is moeray?\"}]}'\n"
              "  Ctrl-C to stop.", flush=True)
        failures, gcs = 0, ray.get_runtime_context().gcs_address
        while True:  # watch the proxy: if the cluster under us dies, say so and exit rather than sit on dead ports
            time.sleep(1.0)
            failures = 0 if _serving(base) else failures + 1
            if failures >= 5:
                if not _reachable(gcs):  # Ray would spend a minute retrying it, printing errors, then abort
                    _say(f"Ray Serve stopped answering at {base} and the Ray cluster's GCS at {gcs} is gone; exiting")
                    sys.stdout.flush(), sys.stderr.flush()
                    os._exit(1)
                _say(f"Ray Serve stopped answering at {base}; exiting")
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        _say("shutting down")
        if ray.is_initialized():
            try:
                if deployed:  # drains our app; a shared cluster keeps its Serve instance, a private one goes below
                    serve.delete("moeray")
            except Exception as e:  # noqa: BLE001 (the cluster may be gone: nothing left to stop)
                _say(f"could not stop the app: {e}")
            ray.shutdown()
    return 0


def cmd_deploy(a) -> int:
    """`serve deploy`, after a strict check of the file: Ray ignores unknown keys, so a typo would be ignored."""
    import yaml
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    from actors.app import validate_serve_config, with_config_digests

    try:
        data = yaml.safe_load(open(a.file))
    except yaml.YAMLError as e:
        raise ValueError(f"{a.file}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{a.file}: expected a Serve config (a mapping with `applications:`)")
    config = with_config_digests(validate_serve_config(data).model_dump(exclude_unset=True))
    ServeSubmissionClient(a.address).deploy_applications(config)
    _say(f"{a.file}: checked and sent to {a.address}; `serve status --address {a.address}` shows its progress")
    return 0


def fit_chat(messages: list[dict], encode_chat, max_tokens: int, context: int) -> tuple[list[dict], list[int], int]:
    """The conversation cut to fit a context of `context` tokens with room for the reply: (messages, prompt ids,
    max_tokens). The oldest user/assistant pairs go first, never the system prompt nor the last (user) message;
    if that message alone leaves less room than max_tokens, max_tokens shrinks to what is left; ValueError if it
    leaves none. `messages` is not modified."""
    first = 1 if messages[0]["role"] == "system" else 0
    ids = encode_chat(messages)
    while len(ids) + max_tokens > context and len(messages) - first > 1:
        messages = messages[:first] + messages[first + 2:]
        ids = encode_chat(messages)
    if len(ids) >= context:
        raise ValueError(f"your message is {len(ids)} tokens in the chat template"
                         f"{' with the system prompt' if first else ''}: no room for a reply in the model's "
                         f"context of {context} tokens")
    return messages, ids, min(max_tokens, context - len(ids))


def cmd_chat(a) -> int:
    """An interactive conversation with the single-process engine, streaming each reply. When the conversation
    outgrows the model's context, its oldest turns are dropped (saying so); a failed turn is reported and left
    out of the conversation, which goes on."""
    import itertools

    from actors.app import with_defaults
    from cluster.config import load_config
    from kernels.engine import Engine, Request
    from kernels.sampling import SamplingParams

    cfg = with_defaults(load_config(a.config, {"model": a.model}))
    engine = Engine.from_dir(cfg.model, cfg.engine, progress=_progress("loading weights"))
    history = [{"role": "system", "content": a.system}] if a.system else []
    print(f"chatting with {cfg.model} (empty line or Ctrl-D to quit)", file=sys.stderr)
    for turn in itertools.count():
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        try:
            kept, prompt, max_tokens = fit_chat(history + [{"role": "user", "content": line}],
                                                engine.tokenizer.encode_chat, a.max_tokens, engine.args.max_seq_len)
        except ValueError as e:
            print(f"moeray chat: {e}; not sent, the conversation goes on", file=sys.stderr, flush=True)
            continue
        for _ in range((len(history) + 1 - len(kept)) // 2):
            print("[context full: dropped the oldest turn]", file=sys.stderr, flush=True)
        if max_tokens < a.max_tokens:
            print(f"[context full: this reply can be {max_tokens} tokens at most]", file=sys.stderr, flush=True)
        history = kept[:-1]
        request_id, reply = f"chat-{turn}", ""
        print("bot> ", end="", flush=True)
        try:
            engine.add_request(Request(request_id, prompt, SamplingParams(max_tokens=max_tokens,
                                                                          temperature=a.temperature, seed=a.seed)))
            while engine.has_unfinished():
                for ev in engine.step():
                    delta = ev.text.lstrip() if not reply else ev.text
                    reply += delta
                    print(delta, end="", flush=True)
        except Exception as e:  # a turn that fails (engine error, bad sampling value) must not end the conversation
            engine.abort(request_id)
            print(flush=True)
            print(f"moeray chat: error: {e}; this turn is left out, the conversation goes on",
                  file=sys.stderr, flush=True)
            continue
        print()
        history = kept + [{"role": "assistant", "content": reply or " "}]
    return 0


def cmd_bench(a) -> int:
    from actors.cli import bench

    if a.bench == "engine":
        bench.bench_engine(a.preset, a.batch, a.prompt_len, a.new_tokens, a.out, a.precision, a.vllm_python,
                           a.llama_bench, a.llama_convert, a.device, a.prefill_len, a.decode_steps)
    elif a.bench == "bursts":
        from actors.cli.burstbench import bench_bursts

        bench_bursts(a.preset, a.precision, a.rate, a.requests, a.max_tokens, a.rounds, a.decode_steps, a.out)
    elif a.bench == "structured":
        bench.bench_structured(a.model, a.batch, a.prompt_len, a.new_tokens, a.out)
    elif a.bench == "moe":
        return bench.bench_moe(a.batch, a.repeats, a.interpret, a.out)
    elif a.bench == "dataplane":
        bench.bench_dataplane(a.rows, a.rounds, a.out)
    elif a.bench == "load":
        from actors.cli import loadgen

        loadgen.bench_load(a.url, a.config, a.model, a.preset, a.concurrency, a.duration, a.max_tokens, a.prompt_len,
                           a.skew, a.out)
    elif a.bench == "autoscale":
        from actors.cli import autoscale

        autoscale.bench_autoscale(autoscale.PHASES, a.max_tokens, a.out)
    elif a.bench == "kv":
        from actors.cli import kvbench

        kvbench.bench_kv(a.preset, a.conversations, a.turns, a.system_len, a.requests, a.max_tokens, a.stop_after,
                         a.kv_tokens, a.out)
    elif a.bench == "pool":
        from actors.cli import poolbench

        poolbench.bench_pool(a.preset, a.replicas, a.concurrency, a.duration, a.max_tokens, a.prompt_len, a.shards,
                             a.out)
    elif a.bench == "scaling":
        from actors.cli import loadgen

        loadgen.bench_scaling(a.preset, a.concurrency, a.duration, a.max_tokens, a.prompt_len, a.shards, a.max_extra,
                              a.out)
    elif a.bench == "faults":
        from actors.cli.faults import bench_faults

        runs = bench_faults(a.model, a.concurrency, a.max_tokens, a.out)
        return 1 if any(r.lost for r in runs) else 0
    elif a.bench == "startup":
        from actors.cli.startup import bench_startup

        bench_startup(a.runs, a.idle, a.out)
    elif a.bench == "soak":
        from actors.cli import soak

        result = soak.bench_soak(a.model, a.config, a.concurrency, a.burst, a.duration, a.warmup, a.max_num_seqs,
                                 a.max_queued, a.grpc_disconnects, a.out)
        return 0 if result["ok"] else 1
    else:
        bench.bench_pipeline(a.preset, a.batch, a.prompt_len, a.new_tokens, a.shards, a.threads, a.out, a.transport,
                             a.micro_batches, a.nodes)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moeray", description="Serve mixture-of-experts language models on Ray.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sv = sub.add_parser("serve",
                        help="serve a model over HTTP (OpenAI, TGI) and gRPC on Ray (the demo model by default)")
    sv.add_argument("--model", help="checkpoint directory (default: the built-in demo model)")
    sv.add_argument("--config", help="moeray YAML: engine, pipeline (placement) and serve sections")
    sv.add_argument("--address", help="join this Ray cluster ('auto': the one running on this machine; default: "
                                      "$RAY_ADDRESS, else start a private local Ray instance that stops with the "
                                      "server)")
    sv.add_argument("--host", help="HTTP bind address (default: 127.0.0.1; other machines also need the API key)")
    sv.add_argument("--http-port", type=int, help="HTTP port (default: 8000)")
    sv.add_argument("--grpc-port", type=int, help="serve the gRPC API on this port (default: off; Ray Serve's gRPC "
                                                  "proxy listens on every interface, other machines need the API "
                                                  "key)")
    sv.add_argument("--dashboard-port", type=int,
                    help="the private Ray instance's dashboard port (default: no dashboard)")
    sv.add_argument("--verbose", action="store_true", help="Ray Serve's request logs (default: warnings only)")
    sv.set_defaults(func=cmd_serve)

    dp = sub.add_parser("deploy",
                        help="check a Serve config strictly (unknown keys are errors), then `serve deploy` it, with "
                             "the sha256 of the moeray YAML its args name, so that an edited YAML is redeployed")
    dp.add_argument("file", help="a Serve config, e.g. configs/serve.yaml")
    dp.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS", "http://localhost:8265"),
                    help="the cluster's dashboard address, as `serve deploy --address` (default: %(default)s)")
    dp.set_defaults(func=cmd_deploy)

    c = sub.add_parser("chat", help="chat with a model in this terminal (single process, streaming)")
    c.add_argument("--model", help="checkpoint directory (default: the built-in demo model)")
    c.add_argument("--config", help="moeray YAML (engine section)")
    c.add_argument("--system", help="a system prompt")
    c.add_argument("--max-tokens", type=int, default=256, help="reply length at most (default: %(default)s)")
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    c.add_argument("--seed", type=int, help="sampling seed")
    c.set_defaults(func=cmd_chat)

    t = sub.add_parser("make-tiny", help="write a tiny random-init checkpoint (HF format) for tests and demos")
    t.add_argument("dir", help="output directory")
    t.add_argument("--arch", choices=["mixtral", "mistral"], default="mixtral",
                   help="mixtral: 8 experts, top-2; mistral: dense FFN, sliding window (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="weight init seed (default: %(default)s)")
    t.add_argument("--force", action="store_true", help="write into DIR even if it is not empty")
    t.set_defaults(func=cmd_make_tiny)

    g = sub.add_parser("generate", help="generate text in this process (the single-process engine)")
    g.add_argument("--model", help="checkpoint directory, HF (config.json) or Mistral (params.json) format "
                                   "(default: the built-in demo model)")
    g.add_argument("--config", help="deployment config YAML (engine section: batch, KV cache, dtype)")
    g.add_argument("--prompt", required=True, help="prompt text; encoded with BOS and no template unless --chat")
    g.add_argument("--chat", action="store_true", help="apply the Mixtral instruct template to the prompt")
    g.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely; 0 = off (default)")
    g.add_argument("--seed", type=int, help="sampling seed: the same seed gives the same output")
    g.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],  # kernels.build.DTYPE_CHOICES
                   help="override the config's dtype (default auto: the checkpoint's, bf16 on CPUs with native bf16)")
    g.add_argument("--json", action="store_true", help="print one JSON object: prompt_ids, token_ids, text, ...")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks that print ratios against a baseline run beside them")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    e = bsub.add_parser("engine", help="single-process engine at each precision vs transformers (and vLLM-CPU, "
                        "llama.cpp) and the measured memory roofline: tok/s, fraction of roofline, peak memory")
    e.add_argument("--preset", choices=["small", "tiny", "wide"], default="small",
                   help="model size: small (dim 512, 4 layers), tiny (smoke tests), wide (dim 2048, FFN 7168, "
                        "2 layers: Mixtral's row lengths, 3.4 GB in fp32) (default: %(default)s)")
    e.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    e.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default: %(default)s)")
    e.add_argument("--new-tokens", type=int, default=64, help="generated tokens (default: %(default)s)")
    e.add_argument("--prefill-len", type=int, default=1024, help="moeray's and transformers' prefill too: 4 new "
                   "prompts of this many tokens, one new token each (0: decode only) (default: %(default)s)")
    e.add_argument("--decode-steps", type=int, help="moeray's engine.decode_steps: greedy decode steps one call may "
                   "take, within engine.decode_burst_ms (default: the engine's, 8; 1: a step a call)")
    e.add_argument("--out", default="bench-results/engine.json", help="JSON results (default: %(default)s)")
    precisions = ["fp32", "bf16", "int8", "int4", "int8-all", "int4-all", "fp32-int8", "fp32-int8-all", "fp32-int4",
                  "w8a8", "w8a8-all", "fp32-bf16-all"]
    e.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where moeray and transformers run "
                   "(cuda: the GPU's bandwidth as the roofline, peak GPU memory; w8a8 and the CPU peers left out) "
                   "(default: %(default)s)")
    e.add_argument("--precision", nargs="+", choices=precisions, default=None,  # actors.cli.bench.PRECISIONS
                   help="moeray's weights: fp32, bf16, int8 / int4 experts in a bf16 model (fp32-int8: in an fp32 "
                   "model), w8a8: int8 experts with int8 activations (fp32 model), fp32-bf16: bf16 weights in an fp32 "
                   "model, -all: attention and LM head too (default: all that run on --device)")
    e.add_argument("--vllm-python", metavar="PATH", help="the Python of a vLLM-CPU install: run it beside "
                   "(fp32, bf16); see shared/peers/README.md")
    e.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-batched-bench: run it beside (f32, "
                   "bf16, q8_0 GGUF made by the convert_hf_to_gguf.py of that tree)")
    e.add_argument("--llama-convert", metavar="PATH", help="convert_hf_to_gguf.py (default: the one of the "
                   "llama.cpp tree that --llama-bench is in, build/bin/..; run by the Python of the llama-venv beside "
                   "that tree if there is one, as ../shared/peers/setup.sh installs it)")
    e.set_defaults(func=cmd_bench)
    bu = bsub.add_parser("bursts", help="engine.decode_steps under open-loop load on the single-process engine's "
                                        "server loop: time to first token, token gaps, tok/s, against a step a call")
    bu.add_argument("--preset", choices=["small", "tiny", "wide"], default="small",
                    help="generated Mixtral-shaped model (default: %(default)s)")
    bu.add_argument("--precision", choices=precisions, default="w8a8-all",
                    help="as bench engine's (default: %(default)s)")
    bu.add_argument("--rate", type=float, default=8.0, help="requests arriving a second (default: %(default)s)")
    bu.add_argument("--requests", type=int, default=100, help="requests a run (default: %(default)s)")
    bu.add_argument("--max-tokens", type=int, default=64, help="tokens per request (default: %(default)s)")
    bu.add_argument("--rounds", type=int, default=2, help="ABBA rounds (default: %(default)s)")
    bu.add_argument("--decode-steps", type=int, help="engine.decode_steps against 1 (default: the engine's, 8)")
    bu.add_argument("--out", default="bench-results/bursts.json", help="JSON results (default: %(default)s)")
    bu.set_defaults(func=cmd_bench)
    so = bsub.add_parser("structured", help="decode tok/s with a JSON schema vs unconstrained, same prompts, "
                                            "single-process engine")
    so.add_argument("--model", choices=["demo", "small"], default="demo",
                    help="demo: the shipped demo model; small: the small preset with Mistral's 32000-piece tokenizer "
                         "(needs mistral-common) (default: %(default)s)")
    so.add_argument("--batch", type=int, default=8, help="sequences (default: %(default)s)")
    so.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default: %(default)s)")
    so.add_argument("--new-tokens", type=int, default=64, help="generated tokens at most (default: %(default)s)")
    so.add_argument("--out", default="bench-results/structured.json", help="JSON results (default: %(default)s)")
    so.set_defaults(func=cmd_bench)
    mo = bsub.add_parser("moe", help="fused Triton MoE experts vs the reference, one Mixtral-8x7B layer on a GPU")
    mo.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256], help="tokens (default: 1 16 64 256)")
    mo.add_argument("--repeats", type=int, default=20, help="timed calls of each, best kept (default: %(default)s)")
    mo.add_argument("--interpret", action="store_true", help="no GPU: check correctness on tiny shapes on CPU "
                                                             "through Triton's interpreter instead")
    mo.add_argument("--out", default="bench-results/moe.json", help="JSON results (default: %(default)s)")
    mo.set_defaults(func=cmd_bench)
    pl = bsub.add_parser("pipeline", help="Ray pipeline (micro_batches 1 and 2) vs single-process engine; where a "
                                          "step's time goes; a layer's expert call vs a gRPC echo")
    pl.add_argument("--preset", choices=["small", "tiny"], default="small", help="model size (default: %(default)s)")
    pl.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="batch sizes (default: 1 8 64)")
    pl.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default: %(default)s)")
    pl.add_argument("--new-tokens", type=int, default=32, help="generated tokens (default: %(default)s)")
    pl.add_argument("--shards", type=int, default=2, help="expert shards (default: %(default)s)")
    pl.add_argument("--threads", type=int, default=1, help="torch threads per actor (default: %(default)s)")
    pl.add_argument("--transport", choices=["tcp", "grpc", "gloo"],
                    help="the data plane's kind (default: the config's)")
    pl.add_argument("--micro-batches", type=int, nargs="+", choices=[1, 2], default=[1, 2],
                    help="pipeline.micro_batches settings to run side by side (default: 1 2)")
    pl.add_argument("--nodes", type=int, default=1, help="1: one local Ray node; N > 1: a ray.cluster_utils.Cluster "
                                                         "of N nodes on this machine: the head (router, attention) "
                                                         "and N - 1 expert nodes (default: %(default)s)")
    pl.add_argument("--out", default="bench-results/pipeline.json", help="JSON results (default: %(default)s)")
    pl.set_defaults(func=cmd_bench)
    dpl = bsub.add_parser("dataplane", help="one data-plane call of each transport kind vs a raw gRPC echo, no Ray")
    dpl.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64], help="rows of 512 fp32 (default: 1 8 64: "
                                                                            "2, 16, 128 KB)")
    dpl.add_argument("--rounds", type=int, default=15, help="runs of 50 calls of each (default: %(default)s)")
    dpl.add_argument("--out", default="bench-results/dataplane.json", help="JSON results (default: %(default)s)")
    dpl.set_defaults(func=cmd_bench)
    ld = bsub.add_parser("load", help="concurrent streaming requests against a pipeline or an HTTP server: "
                                      "throughput, time to first token, inter-token latency")
    ld.add_argument("--url", help="an HTTP server's base URL (OpenAI API); default: start a pipeline here")
    ld.add_argument("--config", help="moeray YAML for the pipeline started here (its scaling section included)")
    ld.add_argument("--model", help="checkpoint directory (default: a generated --preset model)")
    ld.add_argument("--preset", choices=["small", "tiny"], default="tiny",
                    help="generated model size (default: %(default)s)")
    ld.add_argument("--concurrency", type=int, default=8, help="streams in flight (default: %(default)s)")
    ld.add_argument("--duration", type=float, default=20.0, help="seconds of load (default: %(default)s)")
    ld.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default: %(default)s)")
    ld.add_argument("--prompt-len", type=int, default=8, help="prompt tokens (default: %(default)s)")
    ld.add_argument("--skew", action="store_true", help="prompts whose tokens route mostly to one expert")
    ld.add_argument("--out", help="JSON results")
    ld.set_defaults(func=cmd_bench)
    au = bsub.add_parser("autoscale", help="moeray serve's routers under a load ramp (2, 12, then 1 streams): a trace "
                                           "of replicas, requests and tokens/s, as JSON and PNG")
    au.add_argument("--max-tokens", type=int, default=48, help="tokens per request (default: %(default)s)")
    au.add_argument("--out", default="bench-results/autoscale.json", help="JSON trace; the PNG beside it "
                                                                          "(default: %(default)s)")
    au.set_defaults(func=cmd_bench)
    kv = bsub.add_parser("kv", help="KV-cache policies: prefix caching on vs off (multi-turn chat: TTFT, prompt "
                                    "tokens computed); KV on demand vs reserved (early-stopping requests: peak running "
                                    "sequences, tok/s)")
    kv.add_argument("--preset", choices=["small", "tiny"], default="small", help="model size (default: %(default)s)")
    kv.add_argument("--conversations", type=int, default=4, help="chat: conversations at once (default: %(default)s)")
    kv.add_argument("--turns", type=int, default=8, help="chat: turns per conversation (default: %(default)s)")
    kv.add_argument("--system-len", type=int, default=1024, help="chat: shared system prompt tokens "
                                                                 "(default: %(default)s)")
    kv.add_argument("--requests", type=int, default=32, help="early stop: requests (default: %(default)s)")
    kv.add_argument("--max-tokens", type=int, default=512, help="early stop: max_tokens asked (default: %(default)s)")
    kv.add_argument("--stop-after", type=int, default=32, help="early stop: tokens each client takes before it stops "
                                                               "(default: %(default)s)")
    kv.add_argument("--kv-tokens", type=int, default=4096, help="early stop: KV-cache size in tokens "
                                                                "(default: %(default)s)")
    kv.add_argument("--out", default="bench-results/kv.json", help="JSON results (default: %(default)s)")
    kv.set_defaults(func=cmd_bench)
    po = bsub.add_parser("pool", help="N pipeline replicas sharing one expert pool vs N private pipelines: expert "
                                      "bytes, memory, throughput, rows per expert matmul")
    po.add_argument("--preset", choices=["small", "tiny"], default="small", help="model size (default: %(default)s)")
    po.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3], help="replica counts (default: 1 2 3)")
    po.add_argument("--concurrency", type=int, default=4, help="streams per replica (default: %(default)s)")
    po.add_argument("--duration", type=float, default=15.0, help="seconds of load per run (default: %(default)s)")
    po.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default: %(default)s)")
    po.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (default: %(default)s)")
    po.add_argument("--shards", type=int, default=2, help="expert shards per pool (default: %(default)s)")
    po.add_argument("--out", default="bench-results/pool.json", help="JSON results (default: %(default)s)")
    po.set_defaults(func=cmd_bench)
    sc = bsub.add_parser("scaling", help="a skewed load with expert scaling off, then on, in one run")
    sc.add_argument("--preset", choices=["small", "tiny"], default="tiny",
                    help="model size (default: %(default)s; small takes several minutes on a 2-core machine)")
    sc.add_argument("--concurrency", type=int, default=8, help="streams in flight (default: %(default)s)")
    sc.add_argument("--duration", type=float, default=20.0, help="measured seconds per run (default: %(default)s)")
    sc.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default: %(default)s)")
    sc.add_argument("--prompt-len", type=int, default=8, help="prompt tokens (default: %(default)s)")
    sc.add_argument("--shards", type=int, default=2, help="base expert shards (default: %(default)s)")
    sc.add_argument("--max-extra", type=int, default=2, help="extra replicas over all experts (default: %(default)s)")
    sc.add_argument("--out", default="bench-results/scaling.json", help="JSON results (default: %(default)s)")
    sc.set_defaults(func=cmd_bench)
    su = bsub.add_parser("startup", help="moeray serve and serve run configs/serve.yaml: seconds to the first answer "
                                         "(cold, warm) and idle memory by process, against Serve with a one-line app")
    su.add_argument("--runs", type=int, default=3, help="starts of each; the first is cold (default: %(default)s)")
    su.add_argument("--idle", type=float, default=5.0, help="seconds idle before memory is read (default: %(default)s)")
    su.add_argument("--out", default="bench-results/startup.json", help="JSON results (default: %(default)s)")
    su.set_defaults(func=cmd_bench)
    sk = bsub.add_parser(
        "soak", help="soak test: many streaming clients against moeray serve's app over loopback, a burst past "
                     "the waiting queue, then idle; exit 1 if an invariant fails",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=SOAK_HELP)
    sk.add_argument("--model", help="checkpoint directory (default: the built-in demo model)")
    sk.add_argument("--config", help="moeray YAML (engine and pipeline sections; the flags below override it)")
    sk.add_argument("--concurrency", type=int, default=64, help="steady streaming clients (default: %(default)s)")
    sk.add_argument("--burst", type=int, default=64, help="extra clients in the middle third (default: %(default)s)")
    sk.add_argument("--duration", type=float, default=60.0, help="seconds of soak (default: %(default)s)")
    sk.add_argument("--warmup", type=float, default=15.0, help="seconds of warm-up, same mix (default: %(default)s)")
    sk.add_argument("--max-num-seqs", type=int, default=64, help="engine.max_num_seqs (default: %(default)s)")
    sk.add_argument("--max-queued", type=int, default=16,
                    help="engine.max_queued_requests: waiting requests past the batch; more get 429 "
                         "(default: %(default)s)")
    sk.add_argument("--grpc-disconnects", action="store_true",
                    help="gRPC clients disconnect too (off by default: Ray Serve 2.60's gRPC proxy can lose the "
                         "cancel, and the generation then runs to max_tokens; this shows it)")
    sk.add_argument("--out", default="bench-results/soak.json", help="JSON results (default: %(default)s)")
    sk.set_defaults(func=cmd_bench)
    fl = bsub.add_parser("faults", help="kill workers and replicas under load; count what requests saw",
                         description="Injects each fault under load on a local Ray instance: SIGKILL an expert shard, "
                         "SIGKILL the attention actor, SIGSTOP a shard (Pipeline API), SIGKILL the Router, ExpertPool "
                         "and Ingress Serve replicas (HTTP). Prints, per fault, requests sent, completed, failed (with "
                         "a retryable error), lost (no end: must be 0), when the last request in flight ended and "
                         "when the system served again; exits 1 if any request was lost.")
    fl.add_argument("--model", help="checkpoint directory (default: the built-in demo model)")
    fl.add_argument("--concurrency", type=int, default=5, help="streams in flight (default: %(default)s)")
    fl.add_argument("--max-tokens", type=int, default=24, help="tokens per request (default: %(default)s)")
    fl.add_argument("--out", default="bench-results/faults.json", help="JSON results (default: %(default)s)")
    fl.set_defaults(func=cmd_bench)
    return p


SOAK_HELP = """Starts the Serve application `moeray serve` runs (the demo model unless --model) on a fresh local
Ray instance, HTTP and gRPC on free 127.0.0.1 ports, one Ingress replica admitting every client (so
the router's bounded queue is the only place a request waits), a small engine.max_queued_requests:
  warm-up: --concurrency clients for --warmup s, --burst more in its middle third; wait until idle
  soak:    --concurrency clients for --duration s, --burst more in its middle third; wait until idle
Clients stream in turn over OpenAI chat and completions (SSE), TGI /generate_stream and gRPC
GenerateStream, 16-48 tokens with ignore_eos; one HTTP request in 7 asks for a long answer and
disconnects after 2 tokens; a rejected client backs off 0.05-0.2 s and sends its next request.
Prints requests sent / completed / rejected / cancelled / failed / lost, rejection latency, tok/s,
TTFT and ITL, the waiting queue's peak, KV blocks in use when idle (from /metrics), and the server
processes' RSS at start, after the warm-up and at the end.

Exit 1 unless:
  - no request lost: each completed with its final event and token count, or was rejected, failed,
    or cancelled by its client;
  - no failure: a 429 / RESOURCE_EXHAUSTED with the API's error body is a rejection, anything else
    is a failure;
  - the burst got 429s on every API, and the waiting queue never exceeded --max-queued;
  - idle within 2 s of the last client: nothing running or waiting, 0 KV blocks in use;
  - RSS at the end within 10% of RSS after the warm-up;
  - in the burst, rejections no slower than first tokens (p99).

example: moeray bench soak --concurrency 16 --burst 32 --duration 20 --warmup 5 --max-num-seqs 8 --max-queued 4
"""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: a clear message, not a traceback
        print(f"moeray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
