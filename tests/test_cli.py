"""The `moeray` console script, run as a user runs it."""

import io
import json
import subprocess

import pytest
import torch

from actors import cli
from kernels.engine import Engine, load_tokenizer
from kernels.sampling import SamplingParams
from kernels.train import demo_dir


def moeray(*args, check=True, input=None):
    return subprocess.run(["moeray", *args], capture_output=True, text=True, timeout=300, check=check, input=input)


def replies(stdout: str) -> list[str]:
    """What `moeray chat` answered (or began to), turn by turn: its stdout is `you> bot> {reply}\\n` per turn."""
    return [turn[len("bot> "):-1] for turn in stdout.split("you> ") if turn.startswith("bot> ")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny"
    out = moeray("make-tiny", str(path))
    assert "wrote" in out.stdout
    assert {p.name for p in path.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model"}
    return path


@pytest.mark.parametrize("chat", [False, True])
def test_generate_json_equals_engine(tiny_dir, chat):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "Experts and routers", "--max-tokens", "12", "--json"]
    got = json.loads(moeray(*args, *(["--chat"] if chat else [])).stdout)
    engine = Engine.from_dir(tiny_dir)
    tok = engine.tokenizer
    text = "Experts and routers"
    prompt = tok.encode_chat([{"role": "user", "content": text}]) if chat else tok.encode(text)
    assert got["prompt_ids"] == prompt
    if chat:  # [BOS] [INST] ... [/INST], each segment on its own
        assert prompt[:1] == [tok.bos_id] and prompt[1:] == tok.encode("[INST] Experts and routers [/INST]", bos=False)
    expected = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    assert got["token_ids"] == expected.token_ids and got["text"] == expected.text


def test_generate_streams_text(tiny_dir):
    out = moeray("generate", "--model", str(tiny_dir), "--prompt", "Hello", "--max-tokens", "5")
    assert "tok/s" in out.stderr and "finish_reason=length" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "/no/such/dir"),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--top-p", "2"], "top_p"),
    (["generate", "--model", "{tiny}", "--prompt", "x", "--max-tokens", "5000"], "context"),
])
def test_errors_are_one_clear_line(tiny_dir, args, message):
    out = moeray(*[a.replace("{tiny}", str(tiny_dir)) for a in args], check=False)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr


def test_help_explains_itself():
    assert "make-tiny" in moeray("--help").stdout
    assert "--max-tokens" in moeray("generate", "--help").stdout


def test_generate_dtype_choices_are_the_engines():
    """`--dtype` lists its choices without importing torch (a fast --help): they must be engine.dtype's."""
    from actors.cli import build_parser
    from kernels.build import DTYPE_CHOICES

    generate = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    assert next(a for a in generate._actions if a.dest == "dtype").choices == list(DTYPE_CHOICES)


def test_make_tiny_refuses_a_non_empty_dir_unless_forced(tmp_path):
    mine = tmp_path / "model.safetensors"
    mine.write_bytes(b"someone's real checkpoint")
    out = moeray("make-tiny", str(tmp_path), check=False)
    assert out.returncode == 2 and "--force" in out.stderr and "Traceback" not in out.stderr
    assert mine.read_bytes() == b"someone's real checkpoint"
    moeray("make-tiny", str(tmp_path), "--force")
    assert Engine.from_dir(tmp_path).args.vocab_size == 512


# -- moeray chat: the demo model's context is 512 tokens ------------------------------------------------------
DEMO_CONTEXT = 512
SYSTEM = {"role": "system", "content": "Answer briefly."}
TURNS = [{"role": "user", "content": "What is the KV cache?"}, {"role": "assistant", "content": "Memory."},
         {"role": "user", "content": "Why do cats purr?"}, {"role": "assistant", "content": "They are happy."},
         {"role": "user", "content": "What is Ray?"}]


@pytest.fixture(scope="module")
def encode_chat():
    return load_tokenizer(demo_dir()).encode_chat


@pytest.mark.parametrize("system", [False, True])
def test_fit_chat_drops_the_oldest_pairs_then_shrinks_the_reply(encode_chat, system):
    head = [SYSTEM] if system else []
    msgs = head + TURNS
    whole, last_pair, newest = (len(encode_chat(head + m)) for m in (TURNS, TURNS[2:], TURNS[4:]))
    assert cli.fit_chat(msgs, encode_chat, 10, whole + 10) == (msgs, encode_chat(msgs), 10)
    # one token short: the oldest pair goes (the system prompt then joins the new first user turn)
    assert cli.fit_chat(msgs, encode_chat, 10, whole + 9) == (head + TURNS[2:], encode_chat(head + TURNS[2:]), 10)
    assert cli.fit_chat(msgs, encode_chat, 10, last_pair + 9)[0] == head + TURNS[4:]
    # the newest message alone leaves 3 tokens: the reply shrinks to them
    assert cli.fit_chat(msgs, encode_chat, 10, newest + 3) == (head + TURNS[4:], encode_chat(head + TURNS[4:]), 3)
    with pytest.raises(ValueError, match=f"{newest} tokens.*context of {newest}"):
        cli.fit_chat(msgs, encode_chat, 10, newest)
    assert msgs == head + TURNS  # the caller's list is left alone


def test_chat_outlives_its_context(encode_chat):
    """Eight turns of up to 200 tokens overflow 512 tokens: the oldest turns go, the conversation stays."""
    questions = ["What is the KV cache?", "Why do cats purr?", "What is Ray?", "What is an actor?",
                 "What is batching?", "What is attention?", "What is a token?", "What is a cluster?"]
    out = moeray("chat", "--max-tokens", "200", input="\n".join(questions) + "\n")
    assert out.returncode == 0 and "error" not in out.stderr
    answers = replies(out.stdout)
    assert len(answers) == len(questions) and all(answers)
    # replayed: the CLI dropped as many turns as fit_chat says, once each, and kept the newest ones
    history, drops = [], 0
    for question, answer in zip(questions, answers, strict=True):
        kept, prompt, max_tokens = cli.fit_chat(history + [{"role": "user", "content": question}], encode_chat,
                                                200, DEMO_CONTEXT)
        drops += (len(history) + 1 - len(kept)) // 2
        history = kept + [{"role": "assistant", "content": answer}]
    assert out.stderr.count("[context full: dropped the oldest turn]") == drops > 0
    last = Engine.from_dir(demo_dir()).generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0))[0]
    assert answers[-1] == last.text.lstrip()


def test_chat_too_long_message_is_refused_and_a_long_one_gets_a_shorter_reply(encode_chat):
    too_long, long = "cache " * 600, "cache " * 400
    room = DEMO_CONTEXT - len(encode_chat([{"role": "user", "content": long.strip()}]))
    assert 0 < room < 200
    out = moeray("chat", "--max-tokens", "200", input=f"{too_long}\nWhat is the KV cache?\n{long}\n")
    assert out.returncode == 0
    assert "no room for a reply in the model's context of 512 tokens" in out.stderr
    answers = replies(out.stdout)
    assert len(answers) == 2
    # the refused message left no trace: the first answer is the one to that question alone
    engine = Engine.from_dir(demo_dir())
    alone = encode_chat([{"role": "user", "content": "What is the KV cache?"}])
    assert answers[0] == engine.generate([alone], SamplingParams(max_tokens=200, temperature=0))[0].text.lstrip()
    assert f"[context full: this reply can be {room} tokens at most]" in out.stderr
    assert out.stderr.count("[context full: dropped the oldest turn]") == 1


def test_chat_turn_that_fails_is_reported_and_the_conversation_goes_on(monkeypatch, capsys, encode_chat):
    """An engine error in the middle of a reply: the turn is left out, its request aborted, the session lives."""
    added, failed = [], []
    real_add, real_step = Engine.add_request, Engine.step

    def add_request(self, req):
        added.append(req)
        return real_add(self, req)

    def step(self):
        events = real_step(self)
        if len(added) == 2 and not failed:  # the second reply has begun
            failed.append(events)
            raise ValueError("the engine broke")
        return events

    monkeypatch.setattr(Engine, "add_request", add_request)
    monkeypatch.setattr(Engine, "step", step)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the KV cache?\nWhy do cats purr?\nWhat is Ray?\n"))
    assert cli.main(["chat", "--max-tokens", "60"]) == 0
    out = capsys.readouterr()
    assert "moeray chat: error: the engine broke" in out.err and failed
    first, _, third = replies(out.out)
    # the failed turn is not in the history, and its aborted request did not leak into the next reply
    history = [{"role": "user", "content": "What is the KV cache?"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "What is Ray?"}]
    assert added[-1].prompt_ids == encode_chat(history)
    monkeypatch.undo()
    [expected] = Engine.from_dir(demo_dir()).generate([encode_chat(history)],
                                                      SamplingParams(max_tokens=60, temperature=0))
    assert third == expected.text.lstrip()


def test_bench_engine_on_cuda(tmp_path):
    """`moeray bench engine --device cuda`: moeray and transformers on the GPU against the GPU's own bandwidth,
    peak GPU memory, fp32 greedy tokens equal; without a GPU, a clear exit before any model is built."""
    argv = ["bench", "engine", "--device", "cuda", "--preset", "tiny", "--batch", "1", "4", "--prompt-len", "4",
            "--new-tokens", "4", "--precision", "fp32", "int8", "--out", str(tmp_path / "engine.json")]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda, but this process sees no CUDA device"):
            cli.main(argv)
        return
    with pytest.raises(SystemExit, match="w8a8 run on CPU only"):
        cli.main([*argv, "--precision", "w8a8"])
    assert cli.main(argv) in (0, None)
    report = json.loads((tmp_path / "engine.json").read_text())
    assert report["roofline"]["read_gb_s"] > 200  # a GPU's HBM, not a CPU's DRAM
    res = report["results"]
    assert set(res) == {"transformers", "moeray:fp32", "moeray:int8"}
    assert all(r["peak_gpu_mb"] > 0 for r in res.values())
    assert res["moeray:fp32"]["4"]["first_tokens"] == res["transformers"]["4"]["first_tokens"]


def test_bench_engine_reports_every_system_against_the_roofline(tmp_path):
    """`moeray bench engine` on the tiny preset: each system's tok/s, its fraction of the memory bandwidth
    measured in the same run, its prefill rate, its peak memory, and fp32 greedy tokens equal to transformers'; the
    weight bytes per step are the model's own (fp32 4 bytes a parameter; bf16 + int8 experts: 2 a dense one, 1 an
    expert weight plus a bf16 scale a row; fp32 + int8 experts: 4 a dense one)."""
    from kernels.tiny import tiny_args

    out = tmp_path / "engine.json"
    no_peer = tmp_path / "llama.cpp" / "build" / "bin" / "llama-batched-bench"  # a peer that cannot run: a row
    assert cli.main(["bench", "engine", "--preset", "tiny", "--batch", "1", "3", "--prompt-len", "4",
                     "--new-tokens", "4", "--precision", "fp32", "int8", "fp32-int8", "--out", str(out),
                     "--llama-bench", str(no_peer), "--prefill-len", "40", "--decode-steps", "4"]) in (0, None)
    report = json.loads(out.read_text())
    assert report["decode_steps"] == 4  # moeray's greedy steps up to 4 a call: the same tokens (below)
    roof = report["roofline"]
    assert 0.5 < roof["read_gb_s"] < 5000 and 0.5 < roof["gemv_gb_s"] < 5000
    res = report["results"]
    peers = {f"llama.cpp:{t}": res.pop(f"llama.cpp:{t}") for t in ("f32", "bf16", "q8_0")}
    assert all("convert_hf_to_gguf.py" in p["error"] for p in peers.values()), peers
    assert set(res) == {"transformers", "moeray:fp32", "moeray:int8", "moeray:fp32-int8"}
    for name, r in res.items():
        assert 50 < r["peak_rss_mb"] < 8000, name
        for b in ("1", "3"):
            assert r[b]["tokens_per_s"] > 0 and 0 < r[b]["roofline_fraction"] < 1.5, (name, b)
        assert r["3"]["weight_bytes_per_step"] > r["1"]["weight_bytes_per_step"]  # more experts picked
        assert r["prefill"]["prompts"] * r["prefill"]["prompt_len"] == 160 and r["prefill"]["tokens_per_s"] > 0
    assert res["moeray:fp32"]["1"]["first_tokens"] == res["transformers"]["1"]["first_tokens"]
    assert res["moeray:fp32"]["3"]["first_tokens"] == res["transformers"]["3"]["first_tokens"]
    a = tiny_args("mixtral")
    D, F, E, L = a.dim, a.hidden_dim, a.moe.num_experts, a.n_layers
    attn = D * a.n_heads * a.head_dim * 2 + D * a.n_kv_heads * a.head_dim * 2
    dense = L * (attn + D * E + 2 * D) + D + a.vocab_size * D  # attention, gate, norms; final norm, LM head
    fp32, int8 = res["moeray:fp32"]["weight_bytes"], res["moeray:int8"]["weight_bytes"]
    assert (fp32["dense"], fp32["experts"], fp32["embedding_row"]) == (4 * dense, 4 * L * E * 3 * D * F, 4 * D)
    assert (int8["dense"], int8["experts"]) == (2 * dense, L * E * (3 * D * F + 2 * (2 * F + D)))
    fp32_int8 = res["moeray:fp32-int8"]["weight_bytes"]  # int8 experts in an fp32 model (the C kernel)
    assert (fp32_int8["dense"], fp32_int8["experts"]) == (4 * dense, int8["experts"])
    # batch 1 reads exactly k of E experts a layer
    k = a.moe.num_experts_per_tok
    assert res["moeray:fp32"]["1"]["weight_bytes_per_step"] == 4 * (dense + D + L * k * 3 * D * F)


def test_bench_bursts_reports_decode_steps_against_a_step_a_call(tmp_path):
    """`moeray bench bursts` on the tiny preset: open-loop arrivals through the engine's server loop with
    decode_steps 1 and 8; each way's time to first token, token gaps, tok/s and busy share; the same tokens."""
    out = tmp_path / "bursts.json"
    assert cli.main(["bench", "bursts", "--preset", "tiny", "--precision", "fp32", "--requests", "10", "--rate", "50",
                     "--max-tokens", "8", "--rounds", "1", "--out", str(out)]) in (0, None)
    report = json.loads(out.read_text())
    assert report["same_tokens"] and report["decode_burst_ms"] == 20
    res = report["results"]
    assert [r["decode_steps"] for r in res.values()] == [1, 8]
    for r in res.values():
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 <= r["gap_p50_ms"] <= r["gap_max_ms"]
        assert r["tokens_per_s"] > 0 and 0 < r["busy"] <= 1


def test_bench_kv_reports_both_policies_against_their_baselines(tmp_path):
    """`moeray bench kv` on the tiny preset: prefix caching computes fewer prompt tokens than no caching, KV on
    demand runs more sequences at once than reserving the worst case, and neither changes a token."""
    out = tmp_path / "kv.json"
    assert cli.main(["bench", "kv", "--preset", "tiny", "--conversations", "2", "--turns", "2", "--system-len", "40",
                     "--requests", "6", "--max-tokens", "96", "--stop-after", "4", "--kv-tokens", "256",
                     "--out", str(out)]) in (0, None)
    report = json.loads(out.read_text())
    chat, early = report["chat"], report["early_stop"]
    assert report["chat_same_tokens"] and report["early_stop_same_tokens"]
    assert chat["off"]["prompt_tokens_computed"] == chat["off"]["prompt_tokens"] == chat["on"]["prompt_tokens"]
    assert chat["on"]["prompt_tokens_computed"] < chat["off"]["prompt_tokens_computed"]
    assert early["reserve"]["peak_running"] == 2 and early["on_demand"]["peak_running"] == 6
