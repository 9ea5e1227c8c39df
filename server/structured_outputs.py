"""What a request asks its output to follow, as an llguidance grammar, compiled before it runs.

Three ways to ask, at most one per request:
- `response_format` (OpenAI): `{"type": "json_object"}` (any JSON object) or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
- `structured_outputs` (vLLM's extension): one of `json` (a schema), `regex`, `choice`,
  `grammar` (Lark, or llama.cpp's GBNF) or `json_object`;
- `tool_choice` "required" or a named function (server/tools.py).

The grammar is compiled in a worker thread (the event loop never does it); one that llguidance
cannot compile, or a schema using a feature it does not implement, is a 400 naming the parameter
and quoting llguidance's reason. `strict: false` is served as strictly as `true`: the output
always validates.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from llguidance.gbnf_to_lark import any_to_lark
from starlette.concurrency import run_in_threadpool

from scheduler.structured_output import (GrammarError, choice_grammar, json_schema_grammar, lark_grammar,
                                         regex_grammar)
from server.errors import APIError
from server.protocol import SamplingFields

ANY_JSON_OBJECT = {"type": "object"}


def requested_grammar(body: SamplingFields) -> tuple[str | None, str | None]:
    """The grammar `response_format` or `structured_outputs` asks for, and which of them asked
    (None, None: free output)."""
    response_format, outputs = body.response_format, body.structured_outputs
    if response_format is not None and response_format.type != "text" and outputs is not None:
        raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
    try:
        if response_format is not None and response_format.type == "json_object":
            return json_schema_grammar(ANY_JSON_OBJECT), "response_format"
        if response_format is not None and response_format.type == "json_schema":
            return json_schema_grammar(response_format.json_schema.json_schema), "response_format"
        if outputs is None:
            return None, None
        if outputs.json_ is not None:
            try:
                schema = json.loads(outputs.json_) if isinstance(outputs.json_, str) else outputs.json_
            except RecursionError:
                raise ValueError("the schema is nested too deeply") from None
            return json_schema_grammar(schema), "structured_outputs"
        if outputs.json_object:
            return json_schema_grammar(ANY_JSON_OBJECT), "structured_outputs"
        if outputs.regex is not None:
            return regex_grammar(outputs.regex), "structured_outputs"
        if outputs.choice is not None:
            return choice_grammar(outputs.choice), "structured_outputs"
        try:
            lark = any_to_lark(outputs.grammar)
        except Exception as exc:  # noqa: BLE001 (the GBNF converter raises plain Exceptions)
            raise ValueError(f"the grammar does not parse: {exc}") from None
        return lark_grammar(lark), "structured_outputs"
    except (GrammarError, ValueError) as exc:  # a schema that is not JSON, GBNF that does not parse
        param = "response_format" if outputs is None else "structured_outputs"
        raise APIError(400, f"{param} is not a valid grammar: {exc}", param=param) from exc


async def output_grammar(state, body: SamplingFields, salt: str | None,
                         forced_calls: Callable[[], str | None] | None = None) -> str | None:
    """The compiled (or cached) grammar of a request, None for free output; built and compiled in
    a worker thread, cached under the request's prefix-cache `salt` (its API key's). `forced_calls`
    builds the grammar its tool_choice forces (server/tools.py)."""

    def build() -> str | None:
        grammar, param = requested_grammar(body)
        tool_grammar = forced_calls() if forced_calls is not None else None
        if tool_grammar is not None:
            if grammar is not None:
                raise APIError(400, f"{param} cannot be combined with a tool_choice that forces a call",
                               param="tool_choice")
            grammar, param = tool_grammar, "tools"
        if grammar is None:
            return None
        try:
            state.engine.compile_grammar(grammar, salt)
        except GrammarError as exc:
            raise APIError(400, f"{param} cannot be followed: {exc}", param=param) from exc
        return grammar

    return await run_in_threadpool(build)
