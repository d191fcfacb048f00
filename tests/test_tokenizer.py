"""Tokenizer tests: golden ids of the real Mistral v1 tokenizer, token-for-token parity of the chat
template with mistral-common, streaming detokenization, and the tiny trained tokenizer."""

import random
import shutil
from pathlib import Path

import mistral_common
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from kernels.tokenizer import (
    ChatTemplateError,
    IncrementalDetokenizer,
    Tokenizer,
    default_corpus,
    train_tokenizer,
)

V1_FILE = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
HELLO = [1, 733, 16289, 28793, 22557, 733, 28748, 16289, 28793]  # REFERENCE.md §3
HELLO_3 = HELLO + [15359, 736, 2, 733, 16289, 28793, 1602, 460, 368, 28804, 733, 28748, 16289, 28793]
TEXTS = [
    "Hello world! How are you today?",
    "  two leading spaces, and   runs   of spaces\n\nand newlines\t tabs ",
    "Emoji 😀🎉 and a family 👨‍👩‍👧 in the middle.",
    "中文字符和日本語のテキスト, mixed with English.",
    "Accents: é à ü ß ñ ø — and a dash; math: ∑ ≤ ∞.",
    "🙂",
    "Rare ones go through byte pieces even in v1: 🦔🪐 龘 𝄞",
]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


@pytest.fixture(scope="module")
def v1():
    return Tokenizer(V1_FILE)


@pytest.fixture(scope="module")
def mistral():
    return MistralTokenizer.v1()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tokenizer(train_tokenizer(default_corpus(), tmp_path_factory.mktemp("tiny") / "tokenizer.model"))


# --- the real v1 tokenizer --------------------------------------------------------------------


def test_v1_model_facts(v1):
    assert (v1.vocab_size, v1.unk_id, v1.bos_id, v1.eos_id) == (32000, 0, 1, 2)
    assert [v1.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert [v1.is_special(i) for i in (0, 1, 2, 3, 733, 22557)] == [True, True, True, False, False, False]


def test_golden_vectors(v1):
    assert v1.encode("[INST] Hello [/INST]") == HELLO
    assert v1.encode("Hello", bos=False, eos=True) == [22557, 2]
    assert v1.encode_chat([user("Hello")]) == HELLO
    assert v1.encode_chat([user("Hello"), assistant("Hi there"), user("How are you?")]) == HELLO_3
    assert v1.decode(HELLO_3) == "[INST] Hello [/INST] Hi there [INST] How are you? [/INST]"


CONVERSATIONS = {
    "single": [user("Hello")],
    "three": [user("Hello"), assistant("Hi there"), user("How are you?")],
    "five": [user("Name a fruit."), assistant("Apple."), user("Another?"), assistant("Pear."), user("Thanks!")],
    "system": [system("Answer briefly."), user("What is Ray?")],
    "system_five": [system("Be kind."), user("a"), assistant("b"), user("c"), assistant("d"), user("e")],
    "unicode": [user("Traduis 😀 en 中文, s'il te plaît"), assistant("笑脸 🙂 — voilà"), user("Merci ✨")],
    "whitespace": [user("  spaced  out\n\nlines "), assistant(" ok "), user("\ttab")],
    "parts": [user([{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}])],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_encode_chat_matches_mistral_common(v1, mistral, name):
    messages = CONVERSATIONS[name]
    expected = mistral.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    assert v1.encode_chat(messages) == expected


def test_system_prompt_goes_into_first_user_turn(v1):
    # mistral-common 1.13 InstructTokenizerV1: `if is_first and system_prompt` (not the last user turn).
    ids = v1.encode_chat(CONVERSATIONS["system_five"])
    head = [1] + v1.encode("[INST] Be kind.\n\na [/INST]", bos=False)
    assert ids[: len(head)] == head
    assert v1.decode(ids) == "[INST] Be kind.\n\na [/INST] b [INST] c [/INST] d [INST] e [/INST]"


@pytest.mark.parametrize("name", ["system", "system_five"])
def test_developer_role_is_a_system_message(v1, name):
    """OpenAI's newer name for the system role gives the tokens of the same conversation with "system"."""
    messages = CONVERSATIONS[name]
    assert v1.encode_chat([{**messages[0], "role": "developer"}, *messages[1:]]) == v1.encode_chat(messages)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "messages: expected a non-empty list"),
        ([{"role": "bot", "content": "x"}], "messages[0].role: expected one of"),
        ([user("a"), {"content": "b"}], "messages[1].role: expected one of"),
        ([user(42)], "messages[0].content: expected str or list of text parts, got int"),
        ([user([{"type": "image_url", "image_url": "x"}])], "messages[0].content[0]: expected"),
        ([assistant("a"), user("b")], "messages[0].role: expected role 'user', got 'assistant'"),
        ([system("s"), assistant("a")], "messages[1].role: expected role 'user', got 'assistant'"),
        ([user("a"), user("b")], "messages[1].role: expected role 'assistant', got 'user'"),
        ([user("a"), assistant("b"), assistant("c")], "messages[2].role: expected role 'user', got 'assistant'"),
        ([user("a"), assistant("b")], "messages[1].role: conversation must end with role 'user'"),
        ([system("s")], "messages[0].role: conversation must end with role 'user'"),
        ([user("a"), system("s"), user("b")], "messages[1].role: a system message is only allowed at position 0"),
        ([user("a"), {"role": "developer", "content": "s"}, user("b")],
         "messages[1].role: a developer message is only allowed at position 0"),
        ([user("a"), assistant(""), user("b")], "messages[1].content: assistant message is empty"),
    ],
)
def test_bad_conversations(v1, messages, message):
    with pytest.raises(ChatTemplateError) as e:
        v1.encode_chat(messages)
    assert str(e.value).startswith(message)


def test_from_dir(tmp_path):
    shutil.copy(V1_FILE, tmp_path / "tokenizer.model.v1")  # Mistral's native checkpoint name
    assert Tokenizer.from_dir(tmp_path).encode_chat([user("Hello")]) == HELLO
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path / "missing")


# --- streaming detokenization -----------------------------------------------------------------


def stream(tok, ids, prompt_ids=()):
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.push(i) for i in ids]
    assert detok.text == "".join(deltas)
    return deltas, detok


@pytest.mark.parametrize("which", ["v1", "tiny"])
@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_deltas_join_to_decode(request, which, text):
    tok = request.getfixturevalue(which)
    ids = tok.encode(text, bos=False)
    deltas, detok = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert detok.flush() == ""


@pytest.mark.parametrize("which", ["v1", "tiny"])
def test_detokenizer_holds_back_partial_characters(request, which):
    tok = request.getfixturevalue(which)
    ids = tok.encode("a🦔b", bos=False)
    emoji = [b + 3 for b in "🦔".encode()]  # neither vocab has the hedgehog whole: 4 byte pieces
    start = ids.index(emoji[0])
    assert ids[start : start + 4] == emoji
    deltas, _ = stream(tok, ids)
    assert deltas[start : start + 4] == ["", "", "", "🦔"]


@pytest.mark.parametrize("which", ["v1", "tiny"])
def test_detokenizer_matches_decode_on_random_ids(request, which):
    """Any id stream, even invalid UTF-8 and stray <s>/</s>/<unk>, joins (with flush) to decode."""
    tok = request.getfixturevalue(which)
    rng = random.Random(0)
    pool = [lambda: rng.randrange(tok.vocab_size), lambda: rng.randrange(3, 259), lambda: rng.randrange(3),
            lambda: rng.choice([0xF0 + 3, 0xE4 + 3, 0x9F + 3, 0x80 + 3])]  # lead and continuation bytes
    for _ in range(500):
        ids = [rng.choice(pool)() for _ in range(rng.randrange(1, 12))]
        deltas, detok = stream(tok, ids)
        assert "".join(deltas) + detok.flush() == tok.decode(ids), ids


def test_detokenizer_leading_space_rules(v1):
    ids = v1.encode(" world", bos=False)  # ['▁', '▁world']: decode drops only the first piece's space
    assert "".join(stream(v1, ids)[0]) == v1.decode(ids) == " world"
    assert "".join(stream(v1, [1, 22557, 2, 22557])[0]) == "Hello Hello"
    world = v1.encode("world", bos=False)
    assert "".join(stream(v1, world)[0]) == "world"  # a chat reply starts without a space
    assert "".join(stream(v1, world, prompt_ids=v1.encode("Hello,"))[0]) == " world"  # a completion keeps it


# --- training ---------------------------------------------------------------------------------


def test_trained_tokenizer_layout(tiny):
    assert (tiny.vocab_size, tiny.unk_id, tiny.bos_id, tiny.eos_id) == (512, 0, 1, 2)
    assert [tiny.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [tiny.id_to_piece(i) for i in range(3, 259)] == [f"<0x{b:02X}>" for b in range(256)]
    assert [tiny.is_special(i) for i in (0, 1, 2, 3, 300)] == [True, True, True, False, False]
    assert tiny.encode("", eos=True) == [1, 2]
    # dummy prefix, as in Mistral's: a first word encodes like any other word
    assert [tiny.id_to_piece(i) for i in tiny.encode("the", bos=False)] == ["▁the"]


@pytest.mark.parametrize("text", TEXTS + ["x", "", " ", "line one\nline two\n", "tab\tand\u00a0nbsp", "\x00\x7f"])
def test_trained_tokenizer_round_trips(tiny, text):
    assert tiny.decode(tiny.encode(text)) == text


def test_trained_tokenizer_byte_fallback(tiny):
    ids = tiny.encode("中", bos=False)
    assert ids[-3:] == [b + 3 for b in "中".encode()]
    assert tiny.unk_id not in tiny.encode("".join(map(chr, range(0x2600, 0x2700))))


def test_training_is_deterministic_and_quiet(tmp_path, capfd):
    text = default_corpus()
    a = train_tokenizer(text, tmp_path / "a" / "tokenizer.model").read_bytes()
    b = train_tokenizer(text, tmp_path / "b" / "tokenizer.model").read_bytes()
    assert a == b
    assert capfd.readouterr().err == ""
    c = train_tokenizer(text[: len(text) // 2], tmp_path / "c" / "tokenizer.model", vocab_size=400).read_bytes()
    assert c != a and Tokenizer(tmp_path / "c" / "tokenizer.model").vocab_size == 400


def test_default_corpus():
    text = default_corpus()
    assert 40_000 <= len(text.encode()) <= 80_000
    assert text.count("\nUser: ") >= 50 and text.count("\nAssistant: ") >= 50


def test_ids_beyond_the_tokenizer_have_no_text(tmp_path):
    """A model's vocabulary may be padded past its tokenizer's: such ids must not break streaming."""
    tok = Tokenizer(train_tokenizer(default_corpus(), tmp_path / "t.model", vocab_size=512))
    ids = tok.encode("the experts", bos=False)
    mixed = ids[:1] + [512, 4000] + ids[1:]
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("Hi") + [9999])
    assert "".join(detok.push(i) for i in mixed) + detok.flush() == " " + tok.decode(mixed) == " " + tok.decode(ids)
