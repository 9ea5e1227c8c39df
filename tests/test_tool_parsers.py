"""server/tool_parsers.py: extracting tool calls from whole outputs, streaming them, and their grammars."""

import json
import random

import llguidance
import pytest

from server.tool_call_text import ToolCall, ToolCallDelta
from server.tool_parsers import TOOL_PARSERS, tool_parser

# Arguments that trip naive parsing: braces, brackets, quotes, escapes, backslashes and the markers inside strings.
TRICKY = json.dumps({"q": 'a } { [ ] " \\" </tool_call> ]</tool_call> ; <tool_call>[ \\', "n": {"l": [1, {"d": {}}]},
                     "t": True})
WEATHER = '{"city": "Paris", "days": 3}'


def hermes(calls):
    return "\n".join(f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>' for name, args in calls)


def smollm2(calls):
    return "<tool_call>[" + ", ".join(f'{{"name": "{name}", "arguments": {args}}}' for name, args in calls) + \
        "]</tool_call>"


def llama3(calls):
    return "; ".join(f'{{"name": "{name}", "parameters": {args}}}' for name, args in calls)


WRITE = {"hermes": hermes, "smollm2": smollm2, "llama3_json": llama3}

# (format, output, content, calls): well-formed outputs, whose streaming must agree with extract().
WELL_FORMED = [
    ("hermes", "Let me check.\n" + hermes([("get_weather", WEATHER)]), "Let me check.", [("get_weather", WEATHER)]),
    ("hermes", hermes([("get_weather", WEATHER), ("search", TRICKY)]), None,
     [("get_weather", WEATHER), ("search", TRICKY)]),
    ("hermes", '<tool_call>{"name":"f","arguments":{}}</tool_call><tool_call>{"name":"g","arguments":{"x":1}}'
               "</tool_call>", None, [("f", "{}"), ("g", '{"x":1}')]),
    ("hermes", 'Before <tool_call>\n{"name": "f", "arguments": {}}\n</tool_call> after.', "Before  after.",
     [("f", "{}")]),
    ("hermes", '<tool_call>\n{"arguments": {"x": [1, 2]}, "name": "f"}\n</tool_call>', None, [("f", '{"x": [1, 2]}')]),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n', None, [("f", '{"x": 1}')]),  # end cut off
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool', None, [("f", '{"x": 1}')]),
    ("hermes", "Just an answer, no tools.", "Just an answer, no tools.", []),
    ("hermes", "Tags look like <tool_call or <tool_ca", "Tags look like <tool_call or <tool_ca", []),
    ("hermes", "  \n ", None, []),
    ("smollm2", "Calling it.\n" + smollm2([("get_weather", WEATHER)]), "Calling it.", [("get_weather", WEATHER)]),
    ("smollm2", smollm2([("get_weather", WEATHER), ("search", TRICKY)]), None,
     [("get_weather", WEATHER), ("search", TRICKY)]),
    ("smollm2", '<tool_call>[\n{"name": "f", "arguments": {}},\n{"name": "g", "arguments": {"a": "}"}}\n]</tool_call>',
     None, [("f", "{}"), ("g", '{"a": "}"}')]),  # the layout of SmolLM2's own system prompt
    ("smollm2", "<tool_call>[]</tool_call>", None, []),  # calls nothing
    ("smollm2", "Nothing to call. <tool_call>[\n]</tool_call>", "Nothing to call.", []),
    ("smollm2", "<tool_call>[\n]</tool", "<tool_call>[\n]</tool", []),
    ("hermes", "<tool_call>\n</tool_call>", None, []),
    ("smollm2", "No calls here [really].", "No calls here [really].", []),
    ("llama3_json", "<|python_tag|>" + llama3([("get_weather", WEATHER)]), None, [("get_weather", WEATHER)]),
    ("llama3_json", llama3([("get_weather", WEATHER), ("search", TRICKY)]), None,
     [("get_weather", WEATHER), ("search", TRICKY)]),
    ("llama3_json", '\n {"name": "f", "arguments": {"x": 1}};{"name": "g", "parameters": {}}', None,
     [("f", '{"x": 1}'), ("g", "{}")]),
    ("llama3_json", '{"name": "f", "parameters": {}}\nThat was the call.', "That was the call.", [("f", "{}")]),
    ("llama3_json", 'The call would be {"name": "f", "parameters": {}}.',
     'The call would be {"name": "f", "parameters": {}}.', []),
    ("llama3_json", "Plain text.", "Plain text.", []),
]

# (format, output): outputs whose calls are malformed before their name is read, so the streamer agrees with
# extract() that they are content; `calls` is what both find outside the malformed part.
MALFORMED_BEFORE_NAME = [
    ("hermes", "Hi <tool_call>not json</tool_call> there", []),
    ("hermes", '<tool_call>\n{name: "f", "arguments": {}}\n</tool_call>', []),
    ("hermes", '<tool_call>{"name": 3, "arguments": {}}</tool_call>', []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>', []),
    ("hermes", '<tool_call> <tool_call>{"name": "f", "arguments": {}}</tool_call>', [("f", "{}")]),
    ("smollm2", "<tool_call>[nope]</tool_call>", []),
    ("smollm2", '<tool_call>[{"name": "f", "arguments": {}}, oops]</tool_call>', [("f", "{}")]),
    ("llama3_json", '<|python_tag|>print("hi")', []),
    ("llama3_json", '{"parameters": {}, "name": 1}', []),
    ("llama3_json", '{"name": "f", "parameters": {}}; not a call', [("f", "{}")]),
]

# (format, output): malformed calls, content as a whole for extract().
MALFORMED = [(fmt, text) for fmt, text, calls in MALFORMED_BEFORE_NAME if not calls] + [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": tru}}\n</tool_call>'),
    ("hermes", '<tool_call>{"name": "f", "arguments": "{}"}</tool_call>'),
    ("hermes", '<tool_call>{"name": "f"}</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}'),
    ("smollm2", '<tool_call>[{"name": "f", "arguments": {"a": 1}]</tool_call>'),
    ("smollm2", '<tool_call>[{"name": "f", "arguments": [1]}]</tool_call>'),
    ("llama3_json", '{"name": "f", "parameters": {"a": }}'),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": 7}'),
]


def as_calls(calls):
    return [ToolCall(name, arguments) for name, arguments in calls]


def chunkings(text):
    """The text split into 1-character, 2-character and random-size chunks."""
    yield list(text)
    yield [text[i:i + 2] for i in range(0, len(text), 2)]
    rng = random.Random(text)
    for _ in range(4):
        chunks, i = [], 0
        while i < len(text):
            size = rng.randint(1, 12)
            chunks.append(text[i:i + size])
            i += size
        yield chunks
    yield [text]


def stream(parser, chunks):
    """The joined content, the deltas and the streamer's calls of the output streamed in chunks."""
    streamer = parser.streamer()
    content, deltas = [], []
    for chunk in chunks + [None]:
        more, new = streamer.push(chunk) if chunk is not None else streamer.finish()
        assert all(isinstance(delta, ToolCallDelta) for delta in new)
        content.append(more)
        deltas += new
    return "".join(content), deltas, streamer.calls


def joined_calls(deltas):
    """The calls the deltas add up to, checking that each call's name comes on its first delta only."""
    calls = []
    for delta in deltas:
        if delta.index == len(calls):
            assert delta.name is not None, delta
            calls.append(ToolCall(delta.name, delta.arguments))
        else:
            assert delta.index == len(calls) - 1 and delta.name is None, delta
            calls[-1].arguments += delta.arguments
    return calls


def test_registry():
    assert set(TOOL_PARSERS) == {"hermes", "smollm2", "llama3_json"}
    for name, parser_class in TOOL_PARSERS.items():
        parser = tool_parser(name)
        assert isinstance(parser, parser_class) and parser.name == name
    with pytest.raises(ValueError, match="hermes.*llama3_json.*smollm2"):
        tool_parser("mistral")


@pytest.mark.parametrize("fmt,text,content,calls", WELL_FORMED)
def test_extract(fmt, text, content, calls):
    assert tool_parser(fmt).extract(text) == (content, as_calls(calls))


@pytest.mark.parametrize("fmt,text", MALFORMED)
def test_malformed_calls_stay_content(fmt, text):
    assert tool_parser(fmt).extract(text) == (text.strip(), [])


@pytest.mark.parametrize("fmt,text,calls", [case for case in MALFORMED_BEFORE_NAME if case[2]])
def test_well_formed_calls_before_a_malformed_part_are_kept(fmt, text, calls):
    content, found = tool_parser(fmt).extract(text)
    assert found == as_calls(calls)
    assert content not in (None, text.strip()) and content in text  # the malformed part, as written


@pytest.mark.parametrize("fmt,text", [(fmt, text) for fmt, text, _, _ in WELL_FORMED]
                         + [(fmt, text) for fmt, text, _ in MALFORMED_BEFORE_NAME])
def test_streaming_agrees_with_extract(fmt, text):
    parser = tool_parser(fmt)
    content, calls = parser.extract(text)
    for chunks in chunkings(text):
        streamed, deltas, streamer_calls = stream(parser, chunks)
        assert streamed == (content or "")
        assert joined_calls(deltas) == calls
        assert streamer_calls == calls


@pytest.mark.parametrize("fmt", WRITE)
def test_arguments_stream_before_the_call_ends(fmt):
    arguments = json.dumps({"text": "x" * 40 + " } { \" " + "y" * 40, "more": {"z": [1, 2]}})
    before = "" if fmt == "llama3_json" else "Thinking. "  # llama3_json's calls open the output
    text = before + WRITE[fmt]([("write", arguments)])
    streamer = tool_parser(fmt).streamer()
    name_end = text.index('"write"') + len('"write"')
    content, deltas = streamer.push(text[:name_end])
    assert content == before.strip()
    assert deltas == [ToolCallDelta(0, "write", "")]  # the name as soon as its string is complete
    middle = text.index("yyy")
    _, deltas = streamer.push(text[name_end:middle])
    assert len(deltas) == 1 and deltas[0].name is None and deltas[0].index == 0
    assert arguments.startswith(deltas[0].arguments) and '"x' in deltas[0].arguments
    fragments = [deltas[0].arguments]
    for char in text[middle:]:
        fragments += [delta.arguments for delta in streamer.push(char)[1]]
    fragments += [delta.arguments for delta in streamer.finish()[1]]
    assert "".join(fragments) == arguments and len(fragments) > 10
    assert streamer.calls == [ToolCall("write", arguments)]


def test_marker_start_is_held_until_known():
    streamer = tool_parser("hermes").streamer()
    assert streamer.push("Hello <tool_") == ("Hello", [])
    assert streamer.push("cal") == ("", [])
    assert streamer.push("m and more") == (" <tool_calm and more", [])
    assert streamer.push("  ") == ("", [])  # whitespace waits for content to follow it
    assert streamer.finish() == ("", [])


def test_llama3_python_tag_is_held_until_known():
    streamer = tool_parser("llama3_json").streamer()
    assert streamer.push(" <|python") == ("", [])
    assert streamer.push("_tag|> ") == ("", [])
    assert streamer.push('{"name": "f"') == ("", [ToolCallDelta(0, "f", "")])
    streamer = tool_parser("llama3_json").streamer()
    assert streamer.push(" <|python") == ("", [])
    assert streamer.finish() == ("<|python", [])


def test_output_cut_inside_a_call():
    streamer = tool_parser("hermes").streamer()
    _, deltas = streamer.push('<tool_call>\n{"name": "f", "arguments": {"a": "b')
    assert deltas == [ToolCallDelta(0, "f", '{"a": "b')]
    assert streamer.finish() == ("", [])
    assert streamer.calls == []  # streamed, but never complete


def test_call_malformed_after_its_name_is_not_among_the_calls():
    streamer = tool_parser("smollm2").streamer()
    _, deltas = streamer.push('<tool_call>[{"name": "f", "arguments": {"a": tru}}, {"name": "g", "arguments": {}}]')
    streamer.finish()
    assert [delta.name for delta in deltas] == ["f", "g"]
    assert streamer.calls == [ToolCall("g", "{}")]


# Grammars, checked byte by byte with a byte-level tokenizer.

class _ByteTokenizer:
    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]
    special_token_ids = [256]

    def __call__(self, s):
        return list(s.encode() if isinstance(s, str) else s)


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The forecast",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now"}},
]


@pytest.fixture(scope="module")
def tokenizer():
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))


def accepts(tokenizer, grammar, text):
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    tokens = list(text.encode())
    return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


@pytest.mark.parametrize("fmt", WRITE)
@pytest.mark.parametrize("parallel", [False, True])
def test_grammar_is_valid(fmt, parallel):
    grammar = tool_parser(fmt).grammar(TOOLS, parallel)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(grammar))
    assert not is_error, messages


@pytest.mark.parametrize("fmt", WRITE)
def test_grammar_accepts_calls_in_the_format(tokenizer, fmt):
    parser, write = tool_parser(fmt), WRITE[fmt]
    single, parallel = parser.grammar(TOOLS, False), parser.grammar(TOOLS, True)
    one = [("get_weather", '{"city": "Paris", "days": 2}')]
    two = one + [("now", "{}")]
    for grammar, calls in [(single, one), (single, [("now", '{"any": [1]}')]), (parallel, one), (parallel, two)]:
        assert accepts(tokenizer, grammar, write(calls)), (grammar, write(calls))
        assert parser.extract(write(calls)) == (None, as_calls(calls))
    assert not accepts(tokenizer, single, write(two))


@pytest.mark.parametrize("fmt", WRITE)
@pytest.mark.parametrize("arguments,name", [
    ('{"city": "Paris"}', "get_wether"),  # no such tool
    ('{"city": 3}', "get_weather"),  # the wrong type
    ('{"days": 3}', "get_weather"),  # a required property missing
    ('{"city": "Paris", "country": "FR"}', "get_weather"),  # a property the schema does not allow
    ('"Paris"', "now"),  # arguments that are no object
    ('{}, "id": "call_1"', "now"),  # a key besides the name and the arguments
])
def test_grammar_rejects_calls_off_the_tools(tokenizer, fmt, arguments, name):
    grammar = tool_parser(fmt).grammar(TOOLS, True)
    assert not accepts(tokenizer, grammar, WRITE[fmt]([(name, arguments)]))


@pytest.mark.parametrize("fmt", WRITE)
def test_grammar_has_nothing_outside_the_calls(tokenizer, fmt):
    grammar = tool_parser(fmt).grammar(TOOLS, True)
    text = WRITE[fmt]([("now", "{}")])
    assert not accepts(tokenizer, grammar, "Sure. " + text)
    assert not accepts(tokenizer, grammar, text + " Done.")


@pytest.mark.parametrize("fmt", WRITE)
def test_a_tools_own_schema_references_resolve_in_the_grammar(tokenizer, fmt):
    # pydantic writes nested models as $defs and "#/$defs/..." references; "#" is the tool's schema
    point = {"type": "object", "properties": {"x": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#"}, {
        "type": "null"}]}}, "required": ["x", "next"], "additionalProperties": False}
    tools = [TOOLS[1], {"type": "function", "function": {"name": "route", "parameters": {
        "type": "object", "$defs": {"Point": point, "Unit": {"enum": ["km", "mi"]}},
        "properties": {"start": {"$ref": "#/$defs/Point"}, "unit": {"$ref": "#/$defs/Unit"}},
        "required": ["start", "unit"], "additionalProperties": False}}}]
    grammar = tool_parser(fmt).grammar(tools, False)
    good = '{"start": {"x": 1, "next": null}, "unit": "km"}'
    assert accepts(tokenizer, grammar, WRITE[fmt]([("route", good)]))
    assert not accepts(tokenizer, grammar, WRITE[fmt]([("route", good.replace('"km"', '"m"'))]))
    # "#" inside a tool's schema is the tool's schema, not the grammar's: a start, then its arguments
    nested = '{"start": {"x": 1, "next": {"start": {"x": 2, "next": null}, "unit": "mi"}}, "unit": "km"}'
    assert accepts(tokenizer, grammar, WRITE[fmt]([("route", nested)]))
    assert tools[1]["function"]["parameters"]["properties"]["start"] == {"$ref": "#/$defs/Point"}  # unchanged
    # a "$ref" inside data (const, enum) is data
    literal = [{"type": "function", "function": {"name": "echo", "parameters": {
        "type": "object", "properties": {"v": {"const": {"$ref": "#/x"}}}, "required": ["v"]}}}]
    grammar = tool_parser(fmt).grammar(literal, False)
    assert accepts(tokenizer, grammar, WRITE[fmt]([("echo", '{"v": {"$ref": "#/x"}}')]))


STRICT_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}},
]


@pytest.mark.parametrize("fmt", WRITE)
def test_a_strict_functions_arguments_have_all_its_properties_and_no_other(tokenizer, fmt):
    grammar = tool_parser(fmt).grammar(STRICT_TOOLS, False)
    write = WRITE[fmt]
    assert accepts(tokenizer, grammar, write([("get_weather", '{"city": "Paris", "days": 2}')]))
    assert not accepts(tokenizer, grammar, write([("get_weather", '{"city": "Paris"}')]))  # all are required
    assert not accepts(tokenizer, grammar, write([("get_weather", '{"city": "P", "days": 2, "x": 1}')]))
    # Without strict, JSON Schema's meaning: a property it does not forbid may appear, none is required.
    assert accepts(tokenizer, grammar, write([("search", '{"q": "x", "page": 2}')]))
    assert accepts(tokenizer, grammar, write([("search", "{}")]))


@pytest.mark.parametrize("fmt", WRITE)
@pytest.mark.parametrize("parallel", [False, True])
def test_under_auto_a_strict_call_is_held_once_the_reply_opens_it(tokenizer, fmt, parallel):
    grammar = tool_parser(fmt).auto_grammar(STRICT_TOOLS, parallel)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        llguidance.LLMatcher.grammar_from_lark(grammar))
    assert not is_error, messages
    write = WRITE[fmt]
    good = write([("get_weather", '{"city": "Paris", "days": 2}')])
    assert accepts(tokenizer, grammar, "It is sunny in Paris, {braces} and <tags> included.")
    assert accepts(tokenizer, grammar, "")
    assert accepts(tokenizer, grammar, good)
    assert accepts(tokenizer, grammar, write([("search", '{"anything": [1]}')]))  # not strict: any object
    assert not accepts(tokenizer, grammar, write([("get_weather", '{"city": "Paris"}')]))
    assert not accepts(tokenizer, grammar, write([("get_weather", '{"city": "P", "days": 1, "x": 2}')]))
    assert not accepts(tokenizer, grammar, write([("get_wether", '{"city": "Paris", "days": 2}')]))
    two = write([("search", '{"q": "a"}'), ("get_weather", '{"city": "Paris", "days": 2}')])
    assert accepts(tokenizer, grammar, two) == parallel
    if fmt != "llama3_json":  # where calls may follow content, content before a call is free
        assert accepts(tokenizer, grammar, "Let me look. " + good)
        assert not accepts(tokenizer, grammar, "Let me look. " + write([("get_weather", '{"city": 3, "days": 2}')]))
        assert not accepts(tokenizer, grammar, "Let me look. <tool_call> and then text")  # an opened call is held
    assert parse_as_before(fmt, good)


@pytest.mark.parametrize("fmt", WRITE)
def test_under_auto_with_a_json_format_the_reply_is_that_json_or_calls(tokenizer, fmt):
    answer = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    grammar = tool_parser(fmt).auto_grammar(STRICT_TOOLS, True, answer)
    write = WRITE[fmt]
    assert accepts(tokenizer, grammar, '{"answer": 42}')
    assert accepts(tokenizer, grammar, write([("get_weather", '{"city": "Paris", "days": 2}')]))
    for wrong in ("42", '{"answer": "x"}', "Sure. " + write([("search", '{"q": "x"}')]),
                  write([("get_weather", '{"city": "Paris"}')])):
        assert not accepts(tokenizer, grammar, wrong), wrong


def test_the_llama3_auto_grammar_refuses_what_its_parser_would_read_as_calls(tokenizer):
    """Whatever the parser reads as a call (after any whitespace str.strip knows, or the python tag
    as text) must come through the grammar's calls; a call may follow whitespace."""
    parser = tool_parser("llama3_json")
    grammar = parser.auto_grammar(STRICT_TOOLS, False)
    good = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}'
    bad = '{"name": "get_weather", "parameters": {"bogus": "x"}}'
    for prefix in ("", " \n", "\x0c", "\xa0", "\u2003", "\x1c", "<|python_tag|>", " <|python_tag|> "):
        assert parser.extract(prefix + bad)[1], prefix  # the parser reads a call there
        assert not accepts(tokenizer, grammar, prefix + bad), repr(prefix)
    for prefix in ("", "  ", "\n"):
        assert accepts(tokenizer, grammar, prefix + good), repr(prefix)


def parse_as_before(fmt, text):
    """What the grammar lets through is read by the parser as calls."""
    return tool_parser(fmt).extract(text)[1] == [ToolCall("get_weather", '{"city": "Paris", "days": 2}')]


def test_grammar_needs_tools():
    with pytest.raises(ValueError):
        tool_parser("hermes").grammar([], False)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("template", [None, CHATML], ids=["fallback", "chatml"])
def test_past_calls_render_as_the_grammar_makes_the_model_write_them(tokenizer, template):
    # A session's history then matches the tokens the model wrote, and the parser reads it back.
    from model.tokenizers.tokenizer_loader import load_tokenizer
    from server.chat_template import ChatTemplate

    chat = ChatTemplate(load_tokenizer("model/bundled/stories260K"), template)
    assert chat.tool_format == "smollm2" and (template is None or chat.tool_template is not chat.template)
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
             {"id": "c2", "type": "function", "function": {"name": "now", "arguments": {}}}]
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
    text = chat.render(messages, add_generation_prompt=True, tools=TOOLS)
    assert "get_weather" in text.split("Weather?")[0]  # the tools are listed before the conversation
    reply = text[text.index("Weather?"):]  # the system message shows the format too
    block = reply[reply.index("<tool_call>["):reply.index("]</tool_call>") + len("]</tool_call>")]
    parser = tool_parser("smollm2")
    assert accepts(tokenizer, parser.grammar(TOOLS, parallel=True), block)
    assert parser.extract(block) == (None, [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("now", "{}")])
    plain = chat.render(messages[:1], add_generation_prompt=True)
    assert "tool" not in plain and "<tool_call>" not in plain  # no tools: the model's own template
