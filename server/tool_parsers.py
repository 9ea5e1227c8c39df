"""Tool calls in a model's output, one parser per format that models write them in.

Every format writes a call as a JSON object holding the tool's name and its arguments object, and groups calls in
blocks that open with a marker. A parser splits a whole output into its content and its calls (`extract`), follows
an output as it streams (`streamer`), and writes the llguidance Lark grammar that holds a model to calls in its
format (`grammar`). `TOOL_PARSERS` maps each format's name to its parser; a new format is a `ToolParser` subclass
added there.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from server.strict_schema import strict_schema


@dataclass
class ToolCall:
    name: str
    arguments: str  # the JSON text of the arguments object, as the model wrote it


@dataclass
class ToolCallDelta:
    index: int  # which call of the output: 0, 1, ...
    name: str | None  # on a call's first delta only
    arguments: str  # the next fragment of the call's arguments text


_WHITESPACE = " \t\n\r"  # JSON's
_WS = rf"[{_WHITESPACE}]*"
_SKIP_WHITESPACE = re.compile(_WS)
_DECODER = json.JSONDecoder()
# A call object's opening up to its complete name string: where a streamed call's name is known.
_NAME_HEAD = re.compile(rf'\{{{_WS}"name"{_WS}:{_WS}("(?:[^"\\]|\\.)*")')


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
            start, calls_start = self._block_opening(text[pos:], at_output_start)
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

    def _block_opening(self, text: str, at_output_start: bool) -> tuple[int, int | None]:
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
        while (found := self._call_at(text, _skip_whitespace(text, i))) is not None:
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

    def _call_at(self, text: str, start: int) -> tuple[ToolCall, int] | None:
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

    def _block_opening(self, text: str, at_output_start: bool) -> tuple[int, int | None]:
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


class _JsonObjectEnd:
    """Finds where a JSON object ends in its text fed piece by piece from its opening brace: tracks strings, escapes
    and brace depth (nothing else of the JSON is checked)."""

    def __init__(self) -> None:
        self.length = 0  # how much of the object's text has been read
        self.complete = False  # whether its closing brace has been read
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> int:
        """Reads text up to the object's closing brace at most; returns how many characters it read."""
        for i, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char == "{":
                self._depth += 1
            elif char == "}":
                self._depth -= 1
                if self._depth == 0:
                    self.length += i + 1
                    self.complete = True
                    return i + 1
        self.length += len(text)
        return len(text)


class _CallReader:
    """One call object read as it streams: its text up to its closing brace, its name once the name string is
    complete (when "name" is its first key), and its arguments object when that comes right after the name."""

    def __init__(self, arguments_head: re.Pattern[str]) -> None:
        self.text = ""
        self.name: str | None = None
        self.arguments_start: int | None = None  # where the arguments object starts in text
        self._arguments_head = arguments_head
        self._name_end = 0
        self._object = _JsonObjectEnd()
        self._arguments = _JsonObjectEnd()
        self._sent = 0  # where the arguments text not yet taken starts

    @property
    def complete(self) -> bool:
        return self._object.complete

    def feed(self, text: str) -> int:
        """Reads text up to the object's end at most; returns how many characters it read."""
        read = self._object.feed(text)
        self.text += text[:read]
        # A name is at most 64 characters: the head is looked for in the call's first 256, so
        # a call whose name string never closes costs O(1) per push, not a rescan.
        if self.name is None and (head := _NAME_HEAD.match(self.text[:256])):
            try:
                self.name = json.loads(head[1])
                self._name_end = head.end()
            except ValueError:
                pass
        if self.name is not None and self.arguments_start is None:
            if head := self._arguments_head.match(self.text, self._name_end):
                self.arguments_start = self._sent = head.end() - 1
        if self.arguments_start is not None and not self._arguments.complete:
            self._arguments.feed(self.text[self.arguments_start + self._arguments.length:])
        return read

    def new_arguments(self) -> str:
        """The arguments text read since the last time, up to the arguments object's closing brace."""
        if self.arguments_start is None:
            return ""
        stop = self.arguments_start + self._arguments.length
        fragment, self._sent = self.text[self._sent:stop], stop
        return fragment


_CONTENT, _CALL_START, _CALL, _AFTER_CALL = "content", "call start", "call", "after call"


class ToolCallStreamer:
    """Follows one output of a format as it streams. Content is passed on once it surely opens no block (without the
    output's leading and trailing whitespace, so that it joins up to extract()'s content); a block is held until its
    first call's name is read, and becomes content if it turns out to be none. From a call's name on, the call is
    streamed: its name, then its arguments text in fragments as they arrive. `calls` holds the complete,
    well-formed calls streamed; a call streamed but cut off or malformed after its name is not among them.
    """

    def __init__(self, parser: ToolParser) -> None:
        self.calls: list[ToolCall] = []
        self._parser = parser
        # the rest of a call object's opening, from its name to its arguments object's opening brace
        self._arguments_head = re.compile(rf'{_WS},{_WS}"(?:{"|".join(parser.arguments_keys)})"{_WS}:{_WS}\{{')
        self._state = _CONTENT
        self._text = ""  # received and not yet read by the state
        self._finishing = False
        self._at_output_start = True  # nothing read yet
        self._opening: str | None = None  # the open block's marker text while none of its calls is streamed
        self._since_call = ""  # the block's text read since its opening or its last call (not the call being read)
        self._reader = _CallReader(self._arguments_head)
        self._index = -1  # the index of the call streamed last
        self._content_begun = False
        self._held_whitespace = ""
        self._content: list[str] = []
        self._deltas: list[ToolCallDelta] = []

    def push(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """The next text of the output -> the content and the call deltas that it makes certain."""
        self._text += text
        while self._advance():
            pass
        return self._take()

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The end of the output: what was held, resolved (held text that opens no call is content)."""
        self._finishing = True
        while self._advance():
            pass
        return self._take()

    def _advance(self) -> bool:
        """Reads what the state can of the received text; False when it waits for more (or, finishing, is done)."""
        parser = self._parser
        if self._state is _CONTENT:
            start, calls_start = parser._block_opening(self._text, self._at_output_start)
            if calls_start is None:
                start = len(self._text) if self._finishing else start
                self._at_output_start = self._at_output_start and start == 0
                self._send_content(self._text[:start])
                self._text = self._text[start:]
                return False
            self._at_output_start = False
            self._send_content(self._text[:start])
            self._opening, self._since_call = self._text[start:calls_start], ""
            self._text = self._text[calls_start:]
            self._state = _CALL_START
            return True
        if self._state is _CALL_START:
            call, end = self._text.lstrip(_WHITESPACE), parser.block_end
            if not call and not self._finishing:
                return False
            if self._opening is not None and end and call.startswith(end):  # an empty block
                self._text, self._opening = call[len(end):], None
                self._state = _CONTENT
                return True
            if self._opening is not None and end.startswith(call) and not self._finishing:
                return False
            if not call.startswith("{"):
                return self._fail()
            self._since_call += self._text[:len(self._text) - len(call)]
            self._text = call
            self._reader = _CallReader(self._arguments_head)
            self._state = _CALL
            return True
        if self._state is _CALL:
            return self._read_call()
        return self._read_after_call()

    def _read_call(self) -> bool:
        reader = self._reader
        named = reader.name is not None
        self._text = self._text[reader.feed(self._text):]
        if reader.name is not None:
            if not named:
                self._begin_call(reader.name)
            self._send_arguments(reader.new_arguments())
        if reader.complete:
            return self._end_call()
        if self._finishing and reader.name is None:
            return self._fail()
        return False  # waiting, or the output ended inside a streamed call: it is left incomplete

    def _end_call(self) -> bool:
        reader = self._reader
        found = self._parser._call_at(reader.text, 0)
        call = found[0] if found else None
        if reader.name is None:
            if call is None:
                return self._fail()
            self._begin_call(call.name)
        if call is not None:
            if reader.arguments_start is None:
                self._send_arguments(call.arguments)
            self.calls.append(call)
        self._since_call = ""
        self._state = _AFTER_CALL
        return True

    def _read_after_call(self) -> bool:
        separator, end = self._parser.call_separator, self._parser.block_end
        rest = self._text.lstrip(_WHITESPACE)
        if not rest and not self._finishing:
            return False
        if separator and rest.startswith(separator):
            self._since_call = self._text[:len(self._text) - len(rest) + len(separator)]
            self._text = rest[len(separator):]
            self._state = _CALL_START
            return True
        if rest.startswith(end) or (self._finishing and end.startswith(rest)):  # closed, or the output ended there
            self._text = rest[len(end):]
        elif not self._finishing and (end.startswith(rest) or (separator and separator.startswith(rest))):
            return False
        self._state = _CONTENT  # what follows does not continue the block: it is content
        return True

    def _fail(self) -> bool:
        """The open block does not go on: its text since its opening (or its last streamed call) is content."""
        if self._opening is not None:
            self._send_content(self._opening)
        self._text = self._since_call + (self._reader.text if self._state is _CALL else "") + self._text
        self._opening, self._since_call = None, ""
        self._state = _CONTENT
        return True

    def _begin_call(self, name: str) -> None:
        self._opening, self._since_call = None, ""  # streamed: the block can no longer turn out to be content
        self._index += 1
        self._deltas.append(ToolCallDelta(self._index, name, ""))

    def _send_arguments(self, fragment: str) -> None:
        if not fragment:
            return
        if self._deltas and self._deltas[-1].index == self._index:
            self._deltas[-1].arguments += fragment
        else:
            self._deltas.append(ToolCallDelta(self._index, None, fragment))

    def _send_content(self, text: str) -> None:
        """Sends content without the output's leading whitespace, holding whitespace until more content follows."""
        text = self._held_whitespace + text if self._content_begun else text.lstrip()
        sent = text.rstrip()
        self._held_whitespace = text[len(sent):]
        if sent:
            self._content_begun = True
            self._content.append(sent)

    def _take(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = "".join(self._content), self._deltas
        self._content, self._deltas = [], []
        return content, deltas
