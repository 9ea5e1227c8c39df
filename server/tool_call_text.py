"""A tool call as the model writes it: the call, a streamed call's delta, and JSON's whitespace,
shared by the whole-output parsers (server/tool_parsers.py) and the streamer
(server/tool_call_streamer.py)."""

from __future__ import annotations

from dataclasses import dataclass

@dataclass
class ToolCall:
    name: str
    arguments: str  # the JSON text of the arguments object, as the model wrote it


@dataclass
class ToolCallDelta:
    index: int  # which call of the output: 0, 1, ...
    name: str | None  # on a call's first delta only
    arguments: str  # the next fragment of the call's arguments text


JSON_WHITESPACE = " \t\n\r"
WS = rf"[{JSON_WHITESPACE}]*"  # a regex of any run of JSON whitespace
