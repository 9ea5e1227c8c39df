"""Tool calling on /v1/chat/completions: tools into the prompt, calls out of the reply.

- The request's `tools` go to the chat template as `tools`; past assistant `tool_calls` (their
  arguments parsed into a dict, as templates expect) and `tool` messages are rendered by it.
- `tool_choice`: "none" (the tools are in the prompt, the reply is not parsed for calls),
  "auto" (the default with tools: the reply is parsed by the server's tool parser; once it
  opens a call, a grammar holds the call to the format, the tools' names, and a `strict`
  function's `parameters`), "required" or a named function (a grammar forces one call, or with
  `parallel_tool_calls` one or more, whose arguments validate against the function's
  `parameters`, in OpenAI's strict meaning for a `strict` function: server/strict_schema.py).
- A reply with calls has `message.tool_calls` (`id`, `type: "function"`, `function.name`,
  `function.arguments` as JSON text), the text before them as `content` (null when none), and
  `finish_reason: "tool_calls"`; streamed, the calls come as `delta.tool_calls` with their index,
  the id, type and name first and then the arguments in fragments. With `parallel_tool_calls`
  false only the first call is kept.
"""

from __future__ import annotations

import json
import uuid

from scheduler.structured_output import lark_grammar
from server.errors import APIError
from server.protocol import ChatCompletionRequest, ChatMessage
from server.structured_outputs import response_format_schema
from server.tool_call_text import ToolCallDelta
from server.tool_parsers import ToolParser


def template_tools(body: ChatCompletionRequest) -> list[dict] | None:
    """The tools as the chat template sees them (OpenAI's tool objects)."""
    return [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None


def template_message(message: ChatMessage) -> dict:
    """A message as the chat template sees it (transformers' conventions)."""
    rendered = {"role": message.role, "content": message.text()}
    if message.name:
        rendered["name"] = message.name
    if message.tool_calls:
        rendered["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
            for call in message.tool_calls]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


def parses_calls(body: ChatCompletionRequest) -> bool:
    """Whether the reply is read for tool calls."""
    return bool(body.tools) and body.tool_choice != "none"


def tool_grammar(parser: ToolParser, body: ChatCompletionRequest) -> str | None:
    """The grammar that `tool_choice` "required" or a named function imposes, or under "auto" a
    strict function (None: free)."""
    choice = body.tool_choice
    if not body.tools or choice == "none":
        return None
    if choice in (None, "auto"):
        if not any(tool.function.strict for tool in body.tools):
            return None
        content = response_format_schema(body)  # not False: requested_grammar refused that first
        return lark_grammar(parser.auto_grammar(template_tools(body), body.parallel_tool_calls,
                                                {} if content is True else content))
    if choice == "required":
        tools, parallel = template_tools(body), body.parallel_tool_calls
    else:
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools
                 if tool.function.name == choice.function.name]
        parallel = False
    return lark_grammar(parser.grammar(tools, parallel))


def reply_message(parser: ToolParser, body: ChatCompletionRequest, text: str) -> tuple[dict, bool]:
    """The assistant message of a whole reply, and whether it called tools."""
    if not parses_calls(body):
        return {"role": "assistant", "content": text}, False
    content, calls = parser.extract(text)
    if not calls:
        return {"role": "assistant", "content": text}, False
    if not body.parallel_tool_calls:
        calls = calls[:1]
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": call_id(), "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in calls]}, True


class ToolCallStream:
    """One streamed choice's reply split into content deltas and `delta.tool_calls` entries."""

    def __init__(self, parser: ToolParser, parallel: bool):
        self._streamer = parser.streamer()
        self._parallel = parallel
        self.called = False  # any call streamed

    def push(self, text: str) -> tuple[str, list[dict]]:
        content, deltas = self._streamer.push(text)
        return content, self._entries(deltas)

    def finish(self) -> tuple[str, list[dict]]:
        content, deltas = self._streamer.finish()
        return content, self._entries(deltas)

    def _entries(self, deltas: list[ToolCallDelta]) -> list[dict]:
        entries = []
        for delta in deltas:
            if delta.index > 0 and not self._parallel:
                continue
            self.called = True
            if delta.name is not None:
                entries.append({"index": delta.index, "id": call_id(), "type": "function",
                                "function": {"name": delta.name, "arguments": delta.arguments}})
            elif delta.arguments:
                entries.append({"index": delta.index, "function": {"arguments": delta.arguments}})
        return entries


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _arguments(text: str) -> dict | str:
    # Templates render arguments with `tojson`: a dict, unless the client sent text that is not
    # a JSON object (rendered as the string it is).
    try:
        value = json.loads(text)
    except ValueError:
        return text
    except RecursionError:
        raise APIError(400, "a tool call's arguments are nested too deeply", param="messages") from None
    return value if isinstance(value, dict) else text
