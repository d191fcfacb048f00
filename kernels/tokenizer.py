"""SentencePiece tokenizer, the Mistral v1 chat template, streaming detokenization, tiny-tokenizer training.

One file because the four share one fact: ids are SentencePiece pieces with byte fallback
(ids 3..258 are the bytes 0x00..0xFF), and the first non-control piece loses its leading space
on decode (the "dummy prefix" that encode added).
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

_MODEL_NAMES = ("tokenizer.model", "tokenizer.model.v3", "tokenizer.model.v1")  # HF, then Mistral native
_ROLES = ("system", "developer", "user", "assistant")
_SYSTEM_ROLES = ("system", "developer")  # OpenAI's newer name for the system message
_CORPUS = Path(__file__).parent / "assets" / "corpus.txt"


class ChatTemplateError(ValueError):
    """A conversation the template cannot encode; the message names the offending index and field."""


class Tokenizer:
    """Thin wrapper over a SentencePiece model, with the Mixtral/Mistral v1 instruct template."""

    def __init__(self, model_file: str | Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()

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

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Mistral v1 instruct template, token for token what mistral-common's `MistralTokenizer.v1()` gives:

            <s>[INST] {system}\\n\\n{user 1} [/INST] {answer 1}</s>[INST] {user 2} [/INST]

        Each segment is encoded on its own (so each gets SentencePiece's dummy-prefix space), which is
        why this is not `encode(one_big_string)`. The system prompt (role "system" or OpenAI's "developer")
        goes into the FIRST user turn, as in mistral-common's InstructTokenizerV1. (v3 tokenizer files make
        [INST] a control token; not handled here.)
        """
        system, turns = _validate(messages)
        ids = [self.bos_id]
        for i, text in enumerate(turns):
            if i % 2:  # assistant
                ids += self.sp.encode(text) + [self.eos_id]
            else:
                if i == 0 and system:
                    text = f"{system}\n\n{text}"
                ids += self.sp.encode(f"[INST] {text} [/INST]")
        return ids


def _content(message: dict, i: int) -> str:
    """Content as a str; OpenAI-style text parts are joined with "\\n\\n", as mistral-common does."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ChatTemplateError(f"messages[{i}].content[{j}]: expected {{'type': 'text', 'text': str}}")
            parts.append(part["text"])
        return "\n\n".join(p for p in parts if p)  # mistral-common skips empty chunks
    raise ChatTemplateError(f"messages[{i}].content: expected str or list of text parts, got {type(content).__name__}")


def _validate(messages: list[dict]) -> tuple[str, list[str]]:
    """Split into (system prompt, alternating user/assistant texts), or say exactly what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages: expected a non-empty list")
    system = ""
    turns: list[str] = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in _ROLES:
            raise ChatTemplateError(f"messages[{i}].role: expected one of {_ROLES}, got {role!r}")
        text = _content(m, i)
        if role in _SYSTEM_ROLES:
            if i != 0:
                raise ChatTemplateError(f"messages[{i}].role: a {role} message is only allowed at position 0")
            system = text
            continue
        expected = ("user", "assistant")[len(turns) % 2]
        if role != expected:
            raise ChatTemplateError(f"messages[{i}].role: expected role {expected!r}, got {role!r}")
        if role == "assistant" and not text:
            raise ChatTemplateError(f"messages[{i}].content: assistant message is empty")
        turns.append(text)
    if len(turns) % 2 == 0:  # no user turn at all, or ends with an assistant turn
        i, role = len(messages) - 1, messages[-1]["role"]
        raise ChatTemplateError(f"messages[{i}].role: conversation must end with role 'user', got {role!r}")
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
