"""Structured output: a request's text is made to match a JSON schema or a regular expression, by masking,
before each sample, every token that would leave the language; EOS is allowed only where the text is complete.

The grammar engine is llguidance (guidance-ai; the one vLLM, SGLang and llama.cpp use too), kept behind
three names: Grammar (what the request asks for, validated when made, cheap to pickle), Grammars (one per
tokenizer: the vocabulary as llguidance sees it, built once) and GrammarState (one per sequence: the
mask before a sample, the advance after it). The mask is applied to the logits, so greedy, sampling and
logprobs all see the constrained distribution. Shapes: S rows being sampled, V vocab, W = ceil(V / 32).

JSON is written on one line, as json.dumps writes it (", " and ": " between items, no other whitespace):
a model cannot spend its tokens on whitespace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import llguidance
import numpy as np
import torch
from sentencepiece import sentencepiece_model_pb2

from kernels.tokenizer import Tokenizer

KINDS = ("json_schema", "regex", "lark")
JSON_STYLE: dict = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_LIMITS = llguidance.LLParserLimits()  # llguidance's default fuel and size limits: a huge grammar is an error, no hang


@dataclass(frozen=True)
class Grammar:
    """What the output must match. kind "json_schema": value is the schema as JSON text; "regex": a regular
    expression the whole output must match (Rust regex syntax: no look-around, no backreferences); "lark": a
    grammar in llguidance's Lark format, made by moeray (tool calls: kernels/tools.py), never taken from a client.
    ValueError, naming the problem, if it is not one llguidance can compile."""

    kind: str
    value: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"grammar kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.value, str):
            raise ValueError(f"grammar value must be a string, got {type(self.value).__name__}")
        error = llguidance.LLMatcher.validate_grammar(self.lark, limits=_LIMITS)
        if error:
            what = {"json_schema": "JSON schema", "regex": "regex", "lark": "grammar"}[self.kind]
            raise ValueError(f"invalid {what}: {error.strip()}")

    @classmethod
    def json_schema(cls, schema) -> Grammar:
        """A JSON schema given as a dict."""
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's JSON mode)."""
        return cls.json_schema({"type": "object"})

    @classmethod
    def regex(cls, pattern) -> Grammar:
        return cls("regex", pattern)

    @property
    def lark(self) -> str:
        """The grammar in llguidance's own format."""
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.value)
        if self.kind == "lark":
            return self.value
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(self.value, overrides=JSON_STYLE)  # type: ignore[arg-type]
        except ValueError as e:  # not JSON text, or not an object
            raise ValueError(f"invalid JSON schema: {e}") from None


class _Vocab:
    """The tokenizer as llguidance's TokenizerWrapper reads it: each id's bytes (control pieces marked
    special by a leading 0xFF byte, as llguidance's llama.cpp binding does; ids past the tokenizer, where a
    model pads its vocabulary, empty), and an encoder without SentencePiece's dummy-prefix space (llguidance
    tokenizes fragments of text, not whole prompts)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        sp = tokenizer.sp
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.tokens: list[bytes] = []
        for i in range(tokenizer.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):  # "<0x7B>"
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            elif tokenizer.is_special(i):
                self.tokens.append(b"\xff" + piece.encode())
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode())
        self.tokens += [b""] * (vocab_size - tokenizer.vocab_size)
        self.special_token_ids = [i for i, t in enumerate(self.tokens) if t.startswith(b"\xff")]
        proto = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]
        proto.ParseFromString(sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp = type(sp)(model_proto=proto.SerializeToString())

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._sp.encode(text)


class Grammars:
    """Compiles Grammars into GrammarStates for one tokenizer and model vocabulary (which may be larger)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    @cached_property
    def _lltokenizer(self) -> llguidance.LLTokenizer:  # ~0.1 s for a 32000-piece vocabulary: built on first use
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocab(self.tokenizer, self.vocab_size)))

    def state(self, grammar: Grammar) -> GrammarState:
        """A fresh state at the start of the output; ValueError, naming the problem, if it does not compile."""
        matcher = llguidance.LLMatcher(self._lltokenizer, grammar.lark, log_level=0, limits=_LIMITS)
        if matcher.is_error():
            raise ValueError(f"grammar does not compile: {matcher.get_error()}")
        return GrammarState(matcher, self.tokenizer.eos_id, self.vocab_size)


class GrammarState:
    """Where one sequence's output is in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_id: int, vocab_size: int):
        self.matcher, self.eos_id, self.vocab_size = matcher, eos_id, vocab_size

    def fill(self, row: torch.Tensor) -> None:
        """Writes the allowed next tokens into row [W] (int32, bit i of word i // 32 for token i). A matcher in
        error or with nothing allowed (neither should happen: it only sees tokens its masks allowed, and
        unsatisfiable grammars are refused when made) allows EOS alone, so the sequence ends rather than
        sampling from nothing."""
        if not self.matcher.is_error():
            self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)
        if self.matcher.is_error() or not row.any():
            bit = 1 << (self.eos_id % 32)
            row.zero_()
            row[self.eos_id // 32] = bit - (bit >> 31 << 32)  # the int32 of those bits (bit 31 is the sign)

    def accept(self, token: int) -> None:
        """Advances past a sampled token (one its mask allowed)."""
        self.matcher.consume_token(token)

    @property
    def accepting(self) -> bool:
        """Could the output end here?"""
        return self.matcher.is_accepting()


def constrain(logits: torch.Tensor, states: list[GrammarState | None]) -> None:
    """Masks in place, to -inf, the tokens each row's grammar forbids; rows without a grammar (None) are
    left untouched, bit for bit. logits [S, V] fp32 on CPU."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return
    V = logits.shape[1]
    bitmask = np.empty((len(rows), (V + 31) // 32), dtype=np.int32)  # [R, W]
    for r, i in enumerate(rows):
        states[i].fill(torch.from_numpy(bitmask[r]))  # type: ignore[union-attr]
    allowed = torch.from_numpy(np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").view(bool))  # [R, 32W]
    for r, i in enumerate(rows):
        logits[i].masked_fill_(~allowed[r, :V], float("-inf"))
