"""The built-in demo model (kernels/assets/demo): it loads, it is a Mixtral, it recites the corpus,
and it chats in the v1 template, ending its answers with EOS. Plus a smoke run of kernels/train.py."""

import re

import pytest
import torch

from kernels.engine import Engine, EngineConfig
from kernels.sampling import SamplingParams
from kernels.tokenizer import default_corpus
from kernels.train import DEMO_DIR, demo_args, demo_dir, main, train

CORPUS = default_corpus()
GREEDY = dict(temperature=0)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_dir(demo_dir(), EngineConfig(kv_cache_tokens=4096))


def corpus_answer(question: str) -> str:
    m = re.search(rf"^User: {re.escape(question)}\nAssistant: (.*)$", CORPUS, re.MULTILINE)
    assert m, f"{question!r} is not a corpus question"
    return m.group(1)


def chat(engine: Engine, question: str, max_tokens: int) -> tuple[str, str]:
    """Greedy reply to one user message: (text, finish_reason)."""
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": question}])
    c = engine.generate([ids], SamplingParams(max_tokens=max_tokens, **GREEDY))[0]
    return engine.tokenizer.decode(c.token_ids), c.finish_reason


def test_demo_is_a_small_mixtral(engine):
    a = engine.args
    assert a.moe is not None and a.moe.num_experts == 8 and a.moe.num_experts_per_tok == 2
    assert a.n_kv_heads < a.n_heads  # GQA
    assert engine.tokenizer is not None and engine.tokenizer.vocab_size == a.vocab_size
    size = sum(f.stat().st_size for f in DEMO_DIR.iterdir() if f.is_file())
    assert size < 6 * 2**20, f"demo checkpoint is {size / 2**20:.1f} MB"


def test_demo_dir_missing_says_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setattr("kernels.train.DEMO_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="python -m kernels.train"):
        demo_dir()


@pytest.mark.parametrize("prompt", [
    "Honey never really goes bad. Jars of honey",
    "The KV cache grows with every token. A",
    "Kofi repairs old radios in his spare time.",
])
def test_completion_recites_the_corpus(engine, prompt):
    rest = CORPUS[CORPUS.index(prompt) + len(prompt):]
    c = engine.generate([engine.tokenizer.encode(prompt)], SamplingParams(max_tokens=20, **GREEDY))[0]
    assert rest.startswith(c.text), (c.text, rest[:100])
    assert len(c.text.split()) >= 8


@pytest.mark.parametrize("question", [
    "What is the KV cache?",
    "How long should I boil an egg?",
    "Why do cats purr?",
    "Do the doctors talk to each other?",  # a later turn of a dialogue, asked on its own
])
def test_chat_answers_a_corpus_question_with_its_answer(engine, question):
    text, finish = chat(engine, question, max_tokens=100)
    assert finish == "stop"
    assert text == corpus_answer(question)


NEW_QUESTIONS = ["What is your favourite colour?", "Tell me a joke.", "What is the capital of France?",
                 "How many experts does Mixtral have?"]


@pytest.mark.parametrize("question", NEW_QUESTIONS)
def test_chat_answers_a_new_question_in_corpus_english(engine, question):
    text, finish = chat(engine, question, max_tokens=150)
    assert finish == "stop", text
    words = re.findall(r"[A-Za-z']+", text)
    known = set(re.findall(r"[A-Za-z']+", CORPUS))
    assert len(words) >= 5, text
    assert sum(w in known for w in words) >= 0.9 * len(words), text  # real words, not byte soup
    assert sum(ch.isalpha() or ch in " .,'\"?!;:-" for ch in text) >= 0.95 * len(text), text


def test_chat_answers_new_questions_with_whole_corpus_answers(engine):
    """What the training's fresh stranger prompts are for: a question the corpus lacks gets one whole,
    fluent corpus answer, not a blend of several (which reads as nonsense)."""
    answers = set(re.findall(r"^Assistant: (.*)$", CORPUS, re.MULTILINE))
    replies = [chat(engine, q, max_tokens=150)[0] for q in NEW_QUESTIONS]
    assert sum(r in answers for r in replies) >= len(replies) - 1, replies


def test_training_smoke(tmp_path):
    """A few steps of the real script on a tiny model: the loss falls and the output is a checkpoint."""
    tiny = demo_args(dim=32, n_layers=1, head_dim=8, hidden_dim=32, max_seq_len=256)
    out = train(tmp_path / "ckpt", steps=20, seed=1, args=tiny, lr=2e-2, batch_tokens=512, log_every=10)
    assert sum(out["losses"][-3:]) / 3 < out["losses"][0] - 1.0
    assert "--steps 20 --seed 1" in (tmp_path / "ckpt" / "TRAINING.md").read_text()
    eng = Engine.from_dir(tmp_path / "ckpt", EngineConfig(kv_cache_tokens=512))
    assert eng.args == tiny
    prompt = eng.tokenizer.encode("Hello")
    [c] = eng.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY))
    # transformers reads the checkpoint to the same model: its greedy tokens are ours
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert c.token_ids == theirs[0, len(prompt):].tolist()


def test_training_is_deterministic(tmp_path):
    tiny = demo_args(dim=32, n_layers=1, head_dim=8, hidden_dim=32, max_seq_len=256)
    runs = [train(tmp_path / d, steps=3, seed=7, args=tiny, batch_tokens=256)["losses"] for d in "ab"]
    assert runs[0] == runs[1]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_cli_parses_steps_and_seed(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("kernels.train.train", lambda out, steps, seed: seen.update(out=out, steps=steps, seed=seed))
    main(["--out", str(tmp_path), "--steps", "7", "--seed", "3"])
    assert seen == {"out": str(tmp_path), "steps": 7, "seed": 3}
