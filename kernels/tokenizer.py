"""SentencePiece tokenizer, Mistral's v1 and v3 chat templates (tools included), streaming detokenization,
tiny-tokenizer training.

One file because the four share one fact: ids are SentencePiece pieces with byte fallback (ids 3..258 are the
bytes 0x00..0xFF in v1; v3 puts its control tokens before them), and the first non-control piece loses its
leading space on decode (the "dummy prefix" that encode added).
"""

from __future__ import annotations

import codecs
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

_MODEL_NAMES = ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v1")  # HF, then Mistral native
_ROLES = ("system", "developer", "user", "assistant", "tool")
# control tokens of v3 SentencePiece tokenizers (mistral-common's SpecialTokens); a v1 tokenizer has none of them
_CONTROLS = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
             "[/TOOL_RESULTS]")
_SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system message
_CORPUS = Path(__file__).parent / "assets" / "corpus.txt"


class ChatTemplateError(ValueError):
    """A conversation the template cannot encode; the message names the offending index and field."""


class Tokenizer:
    """Thin wrapper over a SentencePiece model, with Mistral's v1 and v3 instruct templates."""

    def __init__(self, model_file: str | Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        ids = {name: self.sp.piece_to_id(name) for name in _CONTROLS}
        # {name: id} of the v3 control tokens, or {} for a v1 tokenizer (there [INST] is text)
        self.controls: dict[str, int] = ids if all(self.sp.is_control(i) for i in ids.values()) else {}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a checkpoint dir (HF names it tokenizer.model, Mistral tokenizer.model.v1/v3)."""
        path = Path(path)
        if path.is_file():
            return cls(path)
        for name in _MODEL_NAMES:
            if (path / name).is_file():
                return cls(path / name)
        raise FileNotFoundError(f"no SentencePiece tokenizer in {path}: looked for {', '.join(_MODEL_NAMES)}")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: Sequence[int]) -> str:
        """Ids the tokenizer does not have (a model may pad its vocabulary beyond it) decode to nothing."""
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def is_special(self, i: int) -> bool:
        return self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i)

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A conversation as a prompt, token for token what mistral-common's instruct tokenizer of this
        tokenizer's version gives. `tools`: the function tools to offer, as Mistral renders them
        ({"type": "function", "function": {"name", "description", "parameters"}}; kernels/tools.py).

        v1 (Mixtral-8x7B-Instruct-v0.1), where [INST] is text (`MistralTokenizer.v1()`):

            <s>[INST] {system}\\n\\n{user 1} [/INST] {answer 1}</s>[INST] {user 2} [/INST]

        Each segment is encoded on its own (so each gets SentencePiece's dummy-prefix space), which is
        why this is not `encode(one_big_string)`. The system prompt (role "system" or OpenAI's "developer")
        goes into the FIRST user turn, as in mistral-common's InstructTokenizerV1.

        v3 (Mistral-7B-Instruct-v0.3, Mixtral-8x22B-Instruct): [INST], [/INST] and the tool markers are
        control tokens, the system prompt goes into the LAST user turn, before which the tools are listed:

            <s>[INST]{user 1}[/INST]{answer 1}</s>[AVAILABLE_TOOLS]{tools}[/AVAILABLE_TOOLS][INST]{system}\\n\\n
            {user 2}[/INST][TOOL_CALLS]{calls}</s>[TOOL_RESULTS]{result}[/TOOL_RESULTS]

        mistral-common has no tools for v1; here a v1 conversation with tools is that same layout written
        out as text (our own convention, the README's): "[AVAILABLE_TOOLS] {tools}[/AVAILABLE_TOOLS]" before
        the last "[INST]", "[TOOL_CALLS] {calls}" as the answer, "[TOOL_RESULTS] {result}[/TOOL_RESULTS]".
        """
        system, turns = _validate(messages)
        last_user = max(i for i, t in enumerate(turns) if t.role == "user")
        return (self._encode_v3 if self.controls else self._encode_v1)(system, turns, tools or [], last_user)

    @property
    def tool_calls_id(self) -> int | None:
        """The [TOOL_CALLS] control token that starts a reply calling tools (None: a v1 tokenizer has none)."""
        return self.controls.get("[TOOL_CALLS]")

    def _encode_v1(self, system: str, turns: list[_Turn], tools: list[dict], last_user: int) -> list[int]:
        ids = [self.bos_id]
        for i, t in enumerate(turns):
            if t.role == "user":
                text = f"{system}\n\n{t.text}" if system and i == 0 else t.text
                head = f"[AVAILABLE_TOOLS] {_json(tools)}[/AVAILABLE_TOOLS]" if tools and i == last_user else ""
                ids += self.sp.encode(f"{head}[INST] {text} [/INST]")
            elif t.role == "assistant":
                ids += self.sp.encode(t.text if t.calls is None else f"[TOOL_CALLS] {_json(t.calls)}") + [self.eos_id]
            else:
                ids += self.sp.encode(f"[TOOL_RESULTS] {_json(t.result)}[/TOOL_RESULTS]")
        return ids

    def _encode_v3(self, system: str, turns: list[_Turn], tools: list[dict], last_user: int) -> list[int]:
        c, enc = self.controls, self.sp.encode
        ids = [self.bos_id]
        for i, t in enumerate(turns):
            if t.role == "user":
                if tools and i == last_user:
                    ids += [c["[AVAILABLE_TOOLS]"], *enc(_json(tools)), c["[/AVAILABLE_TOOLS]"]]
                text = f"{system}\n\n{t.text}" if system and i == last_user else t.text
                ids += [c["[INST]"], *enc(text), c["[/INST]"]]
            elif t.role == "assistant":
                ids += ([c["[TOOL_CALLS]"], *enc(_json(t.calls))] if t.calls is not None
                        else enc(t.text.rstrip(" "))) + [self.eos_id]
            else:
                ids += [c["[TOOL_RESULTS]"], *enc(_json(t.result)), c["[/TOOL_RESULTS]"]]
        return ids


@dataclass
class _Turn:
    """One message of a conversation, checked: a user or assistant text, an assistant's tool calls
    ([{"name", "arguments", "id"}], Mistral's order), or a tool's result ({"content", "call_id"})."""

    role: str  # "user" | "assistant" | "tool"
    text: str = ""
    calls: list[dict] | None = None
    result: dict | None = None


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _maybe_json(text: str):
    """mistral-common's rule for arguments and tool results: the parsed JSON, or the text if it is not JSON."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _content(message: dict, i: int, sep: str = "\n\n") -> str:
    """Content as a str; OpenAI-style text parts are joined with "\\n\\n" ("" in a tool message), as mistral-common
    does."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ChatTemplateError(f"messages[{i}].content[{j}]: expected {{'type': 'text', 'text': str}}")
            parts.append(part["text"])
        return sep.join(p for p in parts if p)  # mistral-common skips empty chunks
    raise ChatTemplateError(f"messages[{i}].content: expected str or list of text parts, got {type(content).__name__}")


def _calls(message: dict, i: int) -> list[dict]:
    """An assistant message's OpenAI tool_calls as Mistral writes them: {"name", "arguments", "id"}."""
    calls = message["tool_calls"]
    if not isinstance(calls, list) or not calls:
        raise ChatTemplateError(f"messages[{i}].tool_calls: expected a non-empty list")
    if message.get("content"):
        raise ChatTemplateError(f"messages[{i}].content: an assistant message with tool_calls must have no content "
                                "(Mistral's format has no place for both)")
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatTemplateError(f"{where}: expected {{'id', 'type': 'function', "
                                    "'function': {'name', 'arguments'}}")
        args = fn.get("arguments", "{}")
        if not isinstance(args, (str, dict)):
            raise ChatTemplateError(f"{where}.function.arguments: expected a JSON string, got {type(args).__name__}")
        if not isinstance(call.get("id", ""), str):
            raise ChatTemplateError(f"{where}.id: expected a string")
        entry = {"name": fn["name"], "arguments": _maybe_json(args) if isinstance(args, str) else args}
        if call.get("id") and call["id"] != "null":  # mistral-common leaves out an id it does not have
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _validate(messages: list[dict]) -> tuple[str, list[_Turn]]:
    """Split into (system prompt, turns), or say exactly what is wrong. Turns go user -> assistant -> user ...;
    an assistant message with tool_calls is followed by one tool message or more, then an assistant or user
    message; the conversation ends with a user or tool message."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages: expected a non-empty list")
    system = ""
    turns: list[_Turn] = []
    follows = {None: ("user",), "user": ("assistant",), "assistant": ("user",), "calls": ("tool",),
               "tool": ("tool", "assistant", "user")}
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in _ROLES:
            raise ChatTemplateError(f"messages[{i}].role: expected one of {_ROLES}, got {role!r}")
        if role in _SYSTEM_ROLES:
            if i != 0:
                raise ChatTemplateError(f"messages[{i}].role: a {role} message is only allowed at position 0")
            system = _content(m, i)
            continue
        prev = None if not turns else "calls" if turns[-1].calls is not None else turns[-1].role
        if role not in follows[prev]:
            expected = " or ".join(repr(r) for r in follows[prev])
            raise ChatTemplateError(f"messages[{i}].role: expected role {expected}, got {role!r}")
        if role == "assistant" and m.get("tool_calls") is not None:
            turns.append(_Turn(role, calls=_calls(m, i)))
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise ChatTemplateError(f"messages[{i}].tool_call_id: expected the id of the tool call answered")
            turns.append(_Turn(role, result={"content": _maybe_json(_content(m, i, sep="")), "call_id": call_id}))
        else:
            text = _content(m, i)
            if role == "assistant" and not text:
                raise ChatTemplateError(f"messages[{i}].content: assistant message is empty")
            turns.append(_Turn(role, text))
    if not turns or turns[-1].role not in ("user", "tool"):  # no user turn at all, or ends with an answer
        i, role = len(messages) - 1, messages[-1]["role"]
        raise ChatTemplateError(f"messages[{i}].role: conversation must end with role 'user' or 'tool', got {role!r}")
    return system, turns


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas, as they arrive.

    Decoding piece by piece is wrong twice over: an emoji may arrive as 4 byte pieces, and
    SentencePiece drops the leading space of the first non-control piece only. So ids wait in a
    short window while their bytes are an unfinished UTF-8 character, and once any visible piece
    has been decoded, windows are decoded behind an anchor (<unk>) that takes the first-piece role
    and is cut off again. The window is emptied at every emit, so each push decodes at most a few ids.

    Invariant: "".join(deltas) + flush() == tokenizer.decode(generated_ids) when prompt_ids is empty.
    With prompt_ids, the text is the continuation of the prompt instead: a first piece "▁world" keeps
    its space, as /v1/completions needs; chat replies pass no prompt and start without one.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()):
        self.sp = tokenizer.sp
        self.text = ""
        self._window: list[int] = []
        self._anchored = any(0 <= i < self.sp.vocab_size() and not self.sp.is_control(i) for i in prompt_ids)
        self._anchor = [tokenizer.unk_id]
        self._anchor_text = self.sp.decode(self._anchor)

    def push(self, token_id: int) -> str:
        """New text since the last push; "" while a multi-byte character is still incomplete."""
        if not 0 <= token_id < self.sp.vocab_size():
            return ""  # as Tokenizer.decode: ids beyond the tokenizer (padded model vocab) have no text
        self._window.append(token_id)
        if self._pending_utf8():
            return ""
        return self.flush()

    def flush(self) -> str:
        """Emit whatever the window holds (an unfinished character becomes U+FFFD, as decode does)."""
        if not self._window:
            return ""
        if self._anchored:
            delta = self.sp.decode(self._anchor + self._window)[len(self._anchor_text):]
        else:
            delta = self.sp.decode(self._window)
            self._anchored = any(not self.sp.is_control(i) for i in self._window)
        self._window.clear()
        self.text += delta
        return delta

    def _pending_utf8(self) -> bool:
        """Do the window's trailing byte pieces end in the start of a character that more bytes can finish?"""
        tail = b""
        for i in reversed(self._window[-3:]):  # an unfinished UTF-8 character is at most 3 bytes
            if not self.sp.is_byte(i):
                break
            tail = bytes([int(self.sp.id_to_piece(i)[3:5], 16)]) + tail  # piece "<0xF0>"
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(tail, final=False)
        return decoder.getstate()[0] != b""


def train_tokenizer(text: str, out_path: str | Path, vocab_size: int = 512) -> Path:
    """Train a small BPE SentencePiece model laid out like Mistral's, for tiny test/demo models.

    Same special ids (unk 0, <s> 1, </s> 2), byte fallback at ids 3..258 so any text encodes,
    identity normalization and the dummy prefix so decode(encode(x)) == x. One thread and no
    shuffling make it deterministic: the same text gives a byte-identical file.
    """
    out_path = Path(out_path)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for line in text.splitlines() if line.strip()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,  # rare characters would fall back to bytes anyway; keep every one seen
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,  # quiet: training otherwise logs hundreds of lines to stderr
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    return out_path


def default_corpus() -> str:
    """The shipped English corpus: training text for the demo tokenizer and tiny demo model."""
    return _CORPUS.read_text(encoding="utf-8")
