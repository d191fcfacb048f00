"""The `moeray` console script, run as a user runs it."""

import json
import subprocess

import pytest

from kernels.engine import Engine
from kernels.sampling import SamplingParams


def moeray(*args, check=True):
    return subprocess.run(["moeray", *args], capture_output=True, text=True, timeout=120, check=check)


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
    prompt = tok.encode_chat([{"role": "user", "content": "Experts and routers"}]) if chat else tok.encode("Experts and routers")
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
