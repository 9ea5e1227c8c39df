"""Tool calls read from an output as it streams: content passed on once it surely opens no call,
and each call's name and then its arguments in fragments as they arrive (`ToolCallStreamer`).
The format's markers and how it reads a complete call come from its parser (server/tool_parsers.py).
"""

from __future__ import annotations

import json
import re
from typing import Protocol

from server.tool_call_text import JSON_WHITESPACE, WS, ToolCall, ToolCallDelta

# A call object's opening up to its complete name string: where a streamed call's name is known.
_NAME_HEAD = re.compile(rf'\{{{WS}"name"{WS}:{WS}("(?:[^"\\]|\\.)*")')


class CallFormat(Protocol):
    """What the streamer reads of a tool-call format (a ToolParser)."""

    block_end: str
    call_separator: str | None
    arguments_keys: tuple[str, ...]

    def block_opening(self, text: str, at_output_start: bool) -> tuple[int, int | None]: ...

    def call_at(self, text: str, start: int) -> tuple[ToolCall, int] | None: ...


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

    def __init__(self, parser: CallFormat) -> None:
        self.calls: list[ToolCall] = []
        self._parser = parser
        # the rest of a call object's opening, from its name to its arguments object's opening brace
        self._arguments_head = re.compile(rf'{WS},{WS}"(?:{"|".join(parser.arguments_keys)})"{WS}:{WS}\{{')
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
            start, calls_start = parser.block_opening(self._text, self._at_output_start)
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
            call, end = self._text.lstrip(JSON_WHITESPACE), parser.block_end
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
        found = self._parser.call_at(reader.text, 0)
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
        rest = self._text.lstrip(JSON_WHITESPACE)
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
