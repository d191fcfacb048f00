"""Tool calling: the function tools a chat request offers, the grammar that makes a reply a well-formed call of
them, and the calls read back out of the reply.

Mistral's format (mistral-common's v3 instruct tokenizer; kernels/tokenizer.py writes the prompt): the tools are
listed as JSON before the last [INST], and a reply that calls tools is [TOOL_CALLS] then a JSON array of
{"name", "arguments"}. A v3 tokenizer has [TOOL_CALLS] as a control token; a v1 tokenizer
(Mixtral-8x7B-Instruct-v0.1) has none, so there the same layout is text and the reply's marker is the text
"[TOOL_CALLS] ".

The reply is held to the request by structured output (kernels/structured.py), so every call the server returns
names an offered function and its arguments validate against that function's parameters schema:
- tool_choice "auto" (the default with tools): text, or the marker and a JSON array of calls. Under a v1
  tokenizer the two are told apart by the first character, so a text reply there cannot start with "[".
- "required": the marker and one call or more; {"type": "function", "function": {"name": N}}: one call of N.
- "none": the tools are left out of the prompt and the reply is text.
- parallel_tool_calls false: at most one call.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass

from kernels.structured import JSON_STYLE, Grammar
from kernels.tokenizer import Tokenizer

TEXT_MARKER = "[TOOL_CALLS]"  # a v1 reply's tool-call marker, the text of v3's control token
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
_ID_CHARS = string.ascii_letters + string.digits


class ToolError(ValueError):
    """A request's tools or tool_choice that cannot be served; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCall:
    id: str  # 9 letters and digits, as Mistral's v3 format requires of ids sent back in the conversation
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai(self) -> dict:
        """As OpenAI's message.tool_calls[i]."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Tools:
    """The tools of one chat request and how they may be called. `offered`: Mistral's rendering of the tools,
    for the prompt (empty under tool_choice "none"); `callable`: the names a call may use; `choice`: "auto" |
    "required" | "none"; `parallel`: more than one call per reply."""

    offered: tuple[dict, ...]
    callable: tuple[str, ...]
    choice: str
    parallel: bool
    schemas: tuple[dict, ...]  # each callable function's parameters schema

    @classmethod
    def parse(cls, tools, tool_choice, parallel_tool_calls) -> Tools | None:
        """OpenAI's tools / tool_choice / parallel_tool_calls fields, checked (ToolError naming the field);
        None when there is nothing to call (no tools)."""
        if tools is None or tools == []:
            if tool_choice not in (None, "none", "auto"):
                raise ToolError("requires tools", "tool_choice")
            return None
        if not isinstance(tools, list):
            raise ToolError("expected a list of function tools", "tools")
        rendered, names, schemas = [], [], []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
                raise ToolError('expected {"type": "function", "function": {"name", "description", "parameters"}}',
                                f"tools.{i}")
            name, params = fn.get("name"), fn.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ToolError("must be 1 to 64 letters, digits, underscores or dashes", f"tools.{i}.function.name")
            if name in names:
                raise ToolError(f"two tools are named {name!r}", f"tools.{i}.function.name")
            if not isinstance(fn.get("description", ""), str):
                raise ToolError("must be a string", f"tools.{i}.function.description")
            try:
                Grammar.json_schema(params)  # the schema must compile on its own: the error names this tool
            except ValueError as e:
                raise ToolError(str(e), f"tools.{i}.function.parameters") from None
            rendered.append({"type": "function", "function": {"name": name, "description": fn.get("description", ""),
                                                              "parameters": params}})
            names.append(name)
            schemas.append(params)
        if not isinstance(parallel_tool_calls, (bool, type(None))):
            raise ToolError("must be a boolean", "parallel_tool_calls")
        parallel = parallel_tool_calls is not False
        choice = "auto" if tool_choice is None else tool_choice
        if isinstance(choice, dict):
            fn = choice.get("function") if choice.get("type") == "function" else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if name not in names:
                raise ToolError(f"names no tool of this request (tools: {', '.join(names)})" if isinstance(name, str)
                                else 'expected "none", "auto", "required" or {"type": "function", "function": '
                                     '{"name": N}}', "tool_choice")
            k = names.index(name)
            return cls(tuple(rendered), (name,), "required", False, (schemas[k],))
        if choice not in ("none", "auto", "required"):
            raise ToolError(f'expected "none", "auto", "required" or a named function, got {choice!r}', "tool_choice")
        return cls(() if choice == "none" else tuple(rendered), tuple(names), choice, parallel, tuple(schemas))

    def grammar(self, tokenizer: Tokenizer) -> Grammar | None:
        """What the reply must match (None: free text, under "none")."""
        if self.choice == "none":
            return None
        calls = {"type": "array", "minItems": 1, **({} if self.parallel else {"maxItems": 1}),
                 "items": {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
                                      "required": ["name", "arguments"], "additionalProperties": False}
                                     for name, schema in zip(self.callable, self.schemas, strict=True)]},
                 "x-guidance": JSON_STYLE}
        marker = tokenizer.tool_calls_id
        # the reply's first piece carries SentencePiece's space ("▁["), hence the optional " "
        lines = [f'calls: <[{marker}]> " "? %json{json.dumps(calls)}' if marker is not None
                 else f'calls: / ?{re.escape(TEXT_MARKER)} / %json{json.dumps(calls)}']
        if self.choice == "auto":
            lines[:0] = ["start: calls | TEXT"]
            lines.append("TEXT: /(?s:.*)/" if marker is not None else r"TEXT: /(?s:( ?[^ \[].*)?)/")
        else:
            lines[:0] = ["start: calls"]
        return Grammar("lark", "\n".join(lines) + "\n")

    def may_call(self, first: int | None, text: str, tokenizer: Tokenizer) -> bool:
        """Can a reply whose first token is `first` (None: none yet) and text so far `text` still be tool calls?
        While it can, a stream holds its text back."""
        if self.choice == "none":
            return False
        undecided = first is None if tokenizer.tool_calls_id is not None else not text.lstrip(" ")
        return undecided or self.body(first, text, tokenizer) is not None

    def body(self, first: int | None, text: str, tokenizer: Tokenizer) -> str | None:
        """The calls' JSON so far of a reply known to be tool calls (first token `first`, text so far `text`),
        "" while its marker is still arriving; None while it is not known to be calls, or is text."""
        if self.choice == "none":
            return None
        marker = tokenizer.tool_calls_id
        if marker is not None:
            return text if first == marker else None
        head = text.lstrip(" ")
        if not head.startswith("["):  # under the grammar, a v1 reply that starts with "[" is calls
            return None
        return head[len(TEXT_MARKER):] if head.startswith(TEXT_MARKER) else ""

    def calls(self, ids: list[int], tokenizer: Tokenizer) -> list[ToolCall] | None:
        """The tool calls a finished reply makes; None if it is text, or calls cut short (max_tokens, a stop
        string) that do not parse."""
        body = self.body(ids[0] if ids else None, tokenizer.decode(ids), tokenizer)  # a control token decodes to ""
        if not body:
            return None
        try:
            calls = json.loads(body)
        except ValueError:
            return None
        if not isinstance(calls, list) or not calls or not all(
                isinstance(c, dict) and c.get("name") in self.callable and isinstance(c.get("arguments"), dict)
                for c in calls):
            return None
        return [ToolCall(new_id(), c["name"], json.dumps(c["arguments"], ensure_ascii=False)) for c in calls]


def new_id() -> str:
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


class CallStream:
    """A stream's tool calls as their JSON arrives: each call's id and name once its name is complete, then its
    arguments piece by piece, as OpenAI's stream deltas (delta.tool_calls entries). It reads the layout the
    grammar writes (json.dumps style, "name" before "arguments"): ` [{"name": N, "arguments": {...}}, ...]`."""

    _HEAD = re.compile(r' ?\[')
    _CALL = re.compile(r'\{"name": "((?:[^"\\]|\\.)*)", "arguments": ')
    _TAIL = re.compile(r'\}(, |\])')

    def __init__(self):
        self.at, self.state, self.index = 0, "head", -1  # read up to body[at]; state: head|call|args|tail|done
        self.depth, self.in_string, self.escaped = 0, False, False  # where the arguments object is
        self.opened = False  # its "{" read

    def feed(self, body: str) -> list[dict]:
        """The deltas that the calls' JSON so far, `body` (a longer string each time), adds."""
        out: list[dict] = []
        while self.state != "done":
            rest = body[self.at:]
            if self.state == "args":
                n = self._scan(rest)
                if n:
                    out.append({"index": self.index, "function": {"arguments": rest[:n]}})
                    self.at += n
                if self.depth or not self.opened:  # the arguments go on, or have not begun
                    break
                self.state = "tail"
                continue
            m = {"head": self._HEAD, "call": self._CALL, "tail": self._TAIL}[self.state].match(rest)
            if not m:
                break
            self.at += m.end()
            if self.state == "head":
                self.state = "call"
            elif self.state == "call":
                self.index += 1
                out.append({"index": self.index, "id": new_id(), "type": "function",
                            "function": {"name": json.loads(f'"{m.group(1)}"'), "arguments": ""}})
                self.state, self.opened = "args", False
            else:
                self.state = "call" if m.group(1) == ", " else "done"
        return _merged(out)

    def _scan(self, text: str) -> int:
        """How much of `text` belongs to the arguments object (all of it while it is still open)."""
        for i, ch in enumerate(text):
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (ch == "\\", ch != '"')
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
                self.opened = True
            elif ch in "}]":
                self.depth -= 1
                if not self.depth:
                    return i + 1
        return len(text)


def _merged(deltas: list[dict]) -> list[dict]:
    """One entry per call in a chunk: a call's name and the first piece of its arguments together."""
    out: list[dict] = []
    for d in deltas:
        if out and out[-1]["index"] == d["index"]:
            out[-1]["function"]["arguments"] += d["function"]["arguments"]
        else:
            out.append(d)
    return out
