"""The text a request brings, counted before any of it is rendered, compiled or tokenized.

One accounting per request: every string the chat template renders (message contents, names,
assistant tool calls and their arguments, tool call ids, and each tool's name, description and
parameter schema as JSON) is counted in UTF-8 bytes, in a worker thread, and bounded by what
the context can hold: a token is at most `max_token_bytes` long, so text of more than
context x longest token x 4 (the Unicode normalisation slack) bytes cannot fit. A dense
request's whole text must fit. A windowed request's messages may run past the context (its
window evicts the oldest), but its tools and instructions, which sit at the start of the prompt
and would be evicted before the model could use them, must fit on their own. The body itself
is bounded by --max-request-body-bytes.
"""

from __future__ import annotations

import json

from server.errors import APIError
from server.protocol import ChatCompletionRequest


def utf8_size(text: str) -> int:
    # ASCII text needs no encoding to be measured.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def chat_text_sizes(body: ChatCompletionRequest) -> dict[str, int]:
    """Bytes of text per parameter: {"messages": ..., "tools": ...}."""
    messages = 0
    for message in body.messages:
        messages += utf8_size(message.text()) + utf8_size(message.name or "") + utf8_size(message.tool_call_id or "")
        for call in message.tool_calls or ():
            messages += utf8_size(call.id) + utf8_size(call.function.name) + utf8_size(call.function.arguments)
    tools = 0
    for tool in body.tools or ():
        function = tool.function
        tools += utf8_size(function.name) + utf8_size(function.description or "")
        if function.parameters is not None:
            try:
                tools += utf8_size(json.dumps(function.parameters, ensure_ascii=False))
            except (RecursionError, ValueError):
                raise APIError(400, f"the parameters of tool {function.name!r} are nested too deeply",
                               param="tools") from None
    return {"messages": messages, "tools": tools}


def check_text_sizes(max_bytes: int, max_model_len: int, sizes: dict[str, int], windowed: bool,
                     evictable: str) -> None:
    """Refuse a request whose text cannot fit the context (`max_bytes`: what `max_model_len`
    tokens can hold): all of it for a dense request, all but the `evictable` part (the
    messages, the input) for a windowed one. The error names the largest part."""
    counted = {name: size for name, size in sizes.items() if not (windowed and name == evictable)}
    total = sum(counted.values())
    if total <= max_bytes:
        return
    param = max(counted, key=counted.get)
    what = " and ".join(f"{name} ({size} bytes)" for name, size in counted.items() if size)
    raise APIError(400, f"This model's maximum context length is {max_model_len} tokens; the request's {what} have "
                        f"more text than that many tokens can hold ({max_bytes} bytes).",
                   param=param, code="context_length_exceeded")
