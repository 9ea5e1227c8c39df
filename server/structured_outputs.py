"""What a request asks its output to follow, as an llguidance grammar, compiled before it runs.

Three ways to ask, at most one per request:
- `response_format` (OpenAI): `{"type": "json_object"}` (any JSON object) or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`;
- `structured_outputs` (vLLM's extension): one of `json` (a schema), `regex`, `choice`,
  `grammar` (Lark, or llama.cpp's GBNF) or `json_object`;
- `tool_choice` "required" or a named function (server/tools.py).

The grammar is built in a worker thread and compiled by the server's grammar compiler (a
sandbox process tries it first: server/grammar_compiler.py); one that llguidance cannot
compile, a schema using a feature it does not implement, or one past the compiler's bounds
(its deadline, its memory, a depth that crashes the compiler) is a 400 naming the parameter
and the reason. The output always validates against the schema: with `strict: true` in
OpenAI's meaning (no property the schema does not list, all that it lists:
server/strict_schema.py), else in JSON Schema's.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from llguidance.gbnf_to_lark import any_to_lark, is_lark_syntax
from starlette.concurrency import run_in_threadpool

from scheduler.structured_output import (GrammarError, choice_grammar, json_schema_grammar, lark_grammar,
                                         regex_grammar)
from server.errors import APIError
from server.grammar_compiler import CompilerBusyError, CompilerUnavailableError
from server.protocol import SamplingFields
from server.strict_schema import strict_schema

ANY_JSON_OBJECT = {"type": "object"}
# llguidance's GBNF converter is Python and quadratic in rules: a 32 KiB chain of 2,150 rules
# converts in 0.19 s, 125 KB of 8,000 in 3.3 s, in a request thread.
MAX_GBNF_CHARS = 32 * 1024


def response_format_schema(body: SamplingFields) -> dict | bool | None:
    """The JSON schema a JSON `response_format` asks the reply to follow, in OpenAI's strict
    meaning when it says `strict` (None: no JSON format; a schema of true or false as given)."""
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return ANY_JSON_OBJECT
    schema = response_format.json_schema.json_schema
    return strict_schema(schema) if response_format.json_schema.strict and isinstance(schema, dict) else schema


def requested_grammar(body: SamplingFields) -> tuple[str | None, str | None]:
    """The grammar `response_format` or `structured_outputs` asks for, and which of them asked
    (None, None: free output)."""
    response_format, outputs = body.response_format, body.structured_outputs
    if response_format is not None and response_format.type != "text" and outputs is not None:
        raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
    try:
        if response_format is not None and response_format.type != "text":
            return json_schema_grammar(response_format_schema(body)), "response_format"
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
        if not is_lark_syntax(outputs.grammar) and len(outputs.grammar) > MAX_GBNF_CHARS:
            raise ValueError(f"a GBNF grammar is at most {MAX_GBNF_CHARS} characters (a Lark grammar may be longer)")
        try:
            lark = any_to_lark(outputs.grammar)
        except Exception as exc:  # noqa: BLE001 (the GBNF converter raises plain Exceptions, RecursionError)
            raise ValueError(f"the grammar does not parse: {exc}") from None
        return lark_grammar(lark), "structured_outputs"
    except (GrammarError, ValueError) as exc:  # a schema that is not JSON, GBNF that does not parse
        param = "response_format" if outputs is None else "structured_outputs"
        raise APIError(400, f"{param} is not a valid grammar: {exc}", param=param) from exc


async def output_grammar(state, body: SamplingFields, salt: str | None, tenant: str | None,
                         forced_calls: Callable[[], str | None] | None = None) -> tuple[str | None, object | None]:
    """The grammar of a request and its compiled matcher ((None, None): free output). Built in a
    worker thread, compiled by the server's grammar compiler (a sandbox trial first, within its
    deadline and bounds; server/grammar_compiler.py), cached under the request's prefix-cache
    `salt` in its API key's (`tenant`'s) share. `forced_calls` builds the grammar its
    tool_choice forces (server/tools.py)."""

    def build() -> tuple[str | None, str | None]:
        grammar, param = requested_grammar(body)
        tool_grammar = forced_calls() if forced_calls is not None else None
        if tool_grammar is not None:
            forced = body.tool_choice not in (None, "auto")
            if grammar is not None and (forced or param != "response_format"):
                # (Under "auto", a JSON response_format is part of the tools' grammar: the reply is
                # that JSON or calls.)
                raise APIError(400, f"{param} cannot be combined with a tool_choice that forces a call" if forced else
                               f"{param} cannot be combined with strict tools under tool_choice \"auto\" (their "
                               "calls follow a grammar too): give the tools strict false, or use response_format",
                               param="tool_choice" if forced else "tools")
            grammar, param = tool_grammar, "tools"
        return grammar, param

    grammar, param = await run_in_threadpool(build)
    if grammar is None:
        return None, None
    try:
        return grammar, await state.grammar_compiler.compile(grammar, salt, tenant)
    except GrammarError as exc:
        raise APIError(400, f"{param} cannot be followed: {exc}", param=param) from exc
    except CompilerBusyError as exc:
        raise APIError(503, f"The server is overloaded ({exc}). Retry later.", "service_unavailable",
                       code="overloaded", headers={"Retry-After": "1"}) from exc
    except CompilerUnavailableError as exc:
        raise APIError(503, "The grammar compiler is not available; constrained output cannot be served now.",
                       "service_unavailable", code="grammar_compiler_unavailable") from exc
