"""Tool calls in a model's output, one parser per format that models write them in.

Every format writes a call as a JSON object holding the tool's name and its arguments object, and groups calls in
blocks that open with a marker. A parser splits a whole output into its content and its calls (`extract`), follows
an output as it streams (`streamer`: server/tool_call_streamer.py), and writes the llguidance Lark grammar that
holds a model to calls in its format (`grammar`). `TOOL_PARSERS` maps each format's name to its parser; a new
format is a `ToolParser` subclass added there.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from typing import ClassVar

from server.strict_schema import strict_schema
from server.tool_call_streamer import ToolCallStreamer
from server.tool_call_text import WS, ToolCall

_SKIP_WHITESPACE = re.compile(WS)
_DECODER = json.JSONDecoder()


def _skip_whitespace(text: str, i: int) -> int:
    return _SKIP_WHITESPACE.match(text, i).end()


def _object_members(text: str, start: int) -> tuple[dict[str, tuple[object, str]], int] | None:
    """The members of the JSON object at text[start], key -> (value, the value's text), and the index just past the
    object; None when no valid JSON object starts there."""
    if not text.startswith("{", start):
        return None
    try:
        _, end = _DECODER.raw_decode(text, start)
    except (ValueError, RecursionError):
        return None
    members = {}
    i = _skip_whitespace(text, start + 1)
    while text[i] != "}":
        key, i = _DECODER.raw_decode(text, i)
        i = _skip_whitespace(text, _skip_whitespace(text, i) + 1)  # past the colon
        value, value_end = _DECODER.raw_decode(text, i)
        members[key] = value, text[i:value_end]
        i = _skip_whitespace(text, value_end)
        if text[i] == ",":
            i = _skip_whitespace(text, i + 1)
    return members, end


# Keywords whose values are JSON data, not schemas: a "$ref" inside them is data, left alone.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def _lark_regex(text: str) -> str:
    """`text` as a literal inside a Lark regex (`/.../`, Rust regex syntax)."""
    return "".join("\\" + c if c in r"\.+*?()|[]{}^$#&-~/" else c for c in text)


def _rebased_refs(schema, root: str):
    """A copy of a JSON schema whose local references ("#" and "#/...") point into it where it
    now sits, at the pointer `root` of a larger document. Walked without recursion (a schema may
    be nested as deeply as the request body's parser allows)."""
    def rebase(value):
        if isinstance(value, dict):
            copy = dict(value)
            ref = copy.get("$ref")
            if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
                copy["$ref"] = root + ref[1:]
            return copy
        return list(value) if isinstance(value, list) else value

    top = rebase(schema)
    stack = [top]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, value in list(items):
            if isinstance(value, (dict, list)) and not (isinstance(node, dict) and k in _DATA_KEYWORDS):
                node[k] = rebase(value)
                stack.append(node[k])
    return top


class ToolParser(ABC):
    """One tool-call format: a block of calls opens with `block_start`, holds one call (`call_separator` None) or
    calls separated by `call_separator`, and closes with `block_end`. A call is a JSON object with a string "name"
    and an object of arguments under the first of `arguments_keys` that it has. Whitespace may surround calls and
    separators, and the output may end where the block's end marker would be; text outside blocks is content.

    A block is read call by call: it goes as far as its last well-formed call when what follows does not continue
    it (that text stays content). A block with no well-formed call is content as a whole, unless it is empty (its
    end marker right after its opening, as SmolLM2 writes when it calls nothing): that is dropped.
    """

    name: ClassVar[str]
    block_start: ClassVar[str]
    block_end: ClassVar[str]
    call_separator: ClassVar[str | None]
    arguments_keys: ClassVar[tuple[str, ...]] = ("arguments",)  # the first is the one the grammar writes
    # The text that opens a call once written (under tool_choice "auto" with strict tools, the
    # grammar takes over there): the block's tag.
    call_opener: ClassVar[str] = ""

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The whole output -> its content outside the calls (stripped; None when empty) and its calls."""
        content, calls, pos, at_output_start = [], [], 0, True
        while True:
            start, calls_start = self.block_opening(text[pos:], at_output_start)
            at_output_start = False
            if calls_start is None:
                break
            block = self._block_at(text, pos + calls_start)
            if block is None:
                content.append(text[pos:pos + calls_start])
                pos += calls_start
            else:
                content.append(text[pos:pos + start])
                calls += block[0]
                pos = block[1]
        content.append(text[pos:])
        return "".join(content).strip() or None, calls

    def streamer(self) -> ToolCallStreamer:
        return ToolCallStreamer(self)

    def grammar(self, tools: list[dict], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect) for one call (or, `parallel`, one or more) in this format, each to
        one of the OpenAI `tools` with arguments valid against its parameters schema (in OpenAI's strict meaning for
        a function with `strict`: server/strict_schema.py); nothing outside the calls."""
        return f"{self._start_rule(parallel)}\ncall: %json {json.dumps(self._call_schema(tools, strict_only=False))}\n"

    def auto_grammar(self, tools: list[dict], parallel: bool, content_schema: dict | None = None) -> str:
        """A Lark grammar for tool_choice "auto" with strict tools: the reply is free until it opens a call in this
        format; from there the call must be well formed, name one of `tools`, and give a strict function's
        arguments valid against its schema (another function's: any JSON object). With `content_schema` (a
        response_format's), the reply is either JSON valid against it or calls alone."""
        call = f"call: %json {json.dumps(self._call_schema(tools, strict_only=True))}\n"
        if content_schema is not None:
            layout = {"x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}}
            calls = self._start_rule(parallel).replace("start:", "calls:", 1)
            return f"start: content | calls\n{calls}\ncontent: %json {json.dumps({**content_schema, **layout})}\n{call}"
        opener = _lark_regex(self.call_opener)
        text = rf"TEXT: /(?s:.*)/ & ~/(?s:.*){opener}(?s:.*)/"
        opening = rf"OPEN: /(?s:.*){opener}/ & ~/(?s:.*){opener}(?s:.+)/"
        blocks = "*" if parallel else "?"
        return f"start: (OPEN {self._block_rest(parallel)}){blocks} TEXT\n{text}\n{opening}\n{call}"

    def _call_schema(self, tools: list[dict], strict_only: bool) -> dict:
        """The JSON schema of one call to one of `tools`; with `strict_only`, the arguments of a function without
        `strict` are any JSON object."""
        if not tools:
            raise ValueError("a tool-call grammar needs at least one tool")
        key = self.arguments_keys[0]

        def arguments(function: dict, i: int) -> dict:
            if strict_only and not function.get("strict"):
                return {"type": "object"}
            schema = function.get("parameters") or {"type": "object"}
            schema = strict_schema(schema) if function.get("strict") else schema
            return _rebased_refs(schema, f"#/anyOf/{i}/properties/{key}")

        # Each tool's parameters sit at /anyOf/i/properties/<key> of the call's schema: their own
        # references ("#/$defs/...") are rebased there.
        return {"anyOf": [{"type": "object",
                           "properties": {"name": {"const": function["name"]}, key: arguments(function, i)},
                           "required": ["name", key], "additionalProperties": False}
                          for i, function in enumerate(tool["function"] for tool in tools)]}

    @abstractmethod
    def _start_rule(self, parallel: bool) -> str:
        """The grammar's start rule, placing the rule `call` (one call's JSON object) in this format."""

    def _block_rest(self, parallel: bool) -> str:
        """What follows `call_opener` in a block this format writes: its call(s) and its end."""
        raise NotImplementedError

    def block_opening(self, text: str, at_output_start: bool) -> tuple[int, int | None]:
        """Where the first block opens in text (the rest of an output; `at_output_start` when it is all of it):
        (its start, where its calls begin), or (how much of text surely opens no block, None)."""
        start = text.find(self.block_start)
        if start >= 0:
            return start, start + len(self.block_start)
        held = next((n for n in range(min(len(text), len(self.block_start) - 1), 0, -1)
                     if text.endswith(self.block_start[:n])), 0)  # the start of a marker, maybe
        return len(text) - held, None

    def _block_at(self, text: str, i: int) -> tuple[list[ToolCall], int] | None:
        """The calls of the block whose calls begin at text[i] and the index where the block ends; None when it is
        not a block."""
        empty_end = _skip_whitespace(text, i)
        if self.block_end and text.startswith(self.block_end, empty_end):
            return [], empty_end + len(self.block_end)
        calls, end = [], i
        while (found := self.call_at(text, _skip_whitespace(text, i))) is not None:
            call, end = found
            calls.append(call)
            i = _skip_whitespace(text, end)
            if self.call_separator and text.startswith(self.call_separator, i):
                i += len(self.call_separator)
                continue
            if text.startswith(self.block_end, i):
                return calls, i + len(self.block_end)
            if self.block_end.startswith(text[i:]):  # the output ends where the end marker would be
                return calls, len(text)
            break
        return (calls, end) if calls else None

    def call_at(self, text: str, start: int) -> tuple[ToolCall, int] | None:
        """The call whose JSON object starts at text[start] and the index past it; None when there is none."""
        parsed = _object_members(text, start)
        if parsed is None:
            return None
        members, end = parsed
        name = members.get("name", (None, ""))[0]
        key = next((key for key in self.arguments_keys if key in members), None)
        if not isinstance(name, str) or key is None or not isinstance(members[key][0], dict):
            return None
        return ToolCall(name, members[key][1]), end


class HermesToolParser(ToolParser):
    """Hermes and Qwen: each call in its own block, `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`,
    blocks one after another (content may come before them)."""

    name = "hermes"
    block_start = "<tool_call>"
    block_end = "</tool_call>"
    call_separator = None
    call_opener = "<tool_call>"

    def _start_rule(self, parallel: bool) -> str:
        block = r'"<tool_call>\n" call "\n</tool_call>"'
        return rf'start: {block} ("\n" {block})*' if parallel else f"start: {block}"

    def _block_rest(self, parallel: bool) -> str:
        return r'"\n" call "\n</tool_call>"'


class SmolLM2ToolParser(ToolParser):
    """SmolLM2: all calls in one block as a JSON list,
    `<tool_call>[{"name": "f", "arguments": {...}}, {"name": "g", "arguments": {...}}]</tool_call>` (content may come
    before it; `<tool_call>[]</tool_call>` calls nothing). The grammar writes this layout, which
    chat_templates/chatml_tools.jinja renders past calls in; whitespace around the calls is read too."""

    name = "smollm2"
    block_start = "<tool_call>["
    block_end = "]</tool_call>"
    call_separator = ","
    call_opener = "<tool_call>"

    def _start_rule(self, parallel: bool) -> str:
        return f'start: "<tool_call>" {self._block_rest(parallel)}'

    def _block_rest(self, parallel: bool) -> str:
        calls = 'call (", " call)*' if parallel else "call"
        return f'"[" {calls} "]</tool_call>"'


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1 and 3.2 JSON tool calling: the output is calls, `{"name": "f", "parameters": {...}}` separated by
    `;`, after an optional `<|python_tag|>` (block_start here); an output that does not open with `{` there is all
    content. Arguments are read under "arguments" too."""

    name = "llama3_json"
    block_start = "<|python_tag|>"
    block_end = ""
    call_separator = ";"
    arguments_keys = ("parameters", "arguments")

    def _start_rule(self, parallel: bool) -> str:
        return 'start: call ("; " call)*' if parallel else "start: call"

    def auto_grammar(self, tools: list[dict], parallel: bool, content_schema: dict | None = None) -> str:
        if content_schema is not None:
            return super().auto_grammar(tools, parallel, content_schema)
        # Calls are the whole output: an output the parser would read as calls (after whitespace as Python's
        # str.strip sees it, and the python tag as text, a "{") must be calls, which may follow whitespace.
        calls = 'call ("; " call)*' if parallel else "call"
        space = r"[\s\x1c-\x1f]*"
        return (f"start: TEXT | SPACE {calls}\nSPACE: /{space}/\n"
                f"TEXT: /(?s:.*)/ & ~/{space}(<\\|python_tag\\|>{space})?\\{{(?s:.*)/\n"
                f"call: %json {json.dumps(self._call_schema(tools, strict_only=True))}\n")

    def block_opening(self, text: str, at_output_start: bool) -> tuple[int, int | None]:
        if not at_output_start:
            return len(text), None
        rest = text.lstrip()
        if rest.startswith(self.block_start):
            rest = rest[len(self.block_start):].lstrip()
        elif self.block_start.startswith(rest):  # whitespace or the start of the tag so far
            return 0, None
        if not rest:
            return 0, None
        if rest[0] != "{":
            return len(text), None
        return 0, len(text) - len(rest)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    parser.name: parser for parser in (HermesToolParser, SmolLM2ToolParser, Llama3JsonToolParser)}


def tool_parser(name: str) -> ToolParser:
    """The parser of the format called `name`; ValueError naming the known ones for any other name."""
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}") from None
