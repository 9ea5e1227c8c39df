"""OpenAI's strict meaning of a JSON schema (server/strict_schema.py): every object schema lists
all its properties as required and allows no other, unless it says otherwise; nothing outside
schemas (data in const/enum/default) is touched, and the caller's schema is not changed."""

from __future__ import annotations

import copy

import jsonschema
import pytest

from server.strict_schema import strict_schema

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}


def test_an_object_gets_all_its_properties_and_no_other():
    strict = strict_schema(PERSON)
    assert strict == {**PERSON, "additionalProperties": False, "required": ["name", "age"]}
    jsonschema.validate({"name": "Ann", "age": 3}, strict)
    for wrong in ({"name": "Ann"}, {"name": "Ann", "age": 3, "address": "x"}):
        jsonschema.validate(wrong, PERSON)  # JSON Schema's meaning allows it
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, strict)


def test_nested_objects_everywhere_a_schema_may_sit():
    schema = {"type": "object", "properties": {
        "friends": {"type": "array", "items": PERSON},
        "pair": {"type": "array", "prefixItems": [PERSON, {"$ref": "#/$defs/pet"}]},
        "either": {"anyOf": [PERSON, {"type": "null"}]},
        "all": {"allOf": [{"properties": {"x": {"type": "integer"}}}]},
        "nullable": {"type": ["object", "null"], "properties": {"y": {"type": "string"}}},
        "const": {"const": {"type": "object", "properties": {"z": {}}}},
    }, "$defs": {"pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}}}}
    original = copy.deepcopy(schema)
    strict = strict_schema(schema)
    assert schema == original  # the request's own schema is left as it was
    props = strict["properties"]
    assert strict["required"] == list(schema["properties"]) and strict["additionalProperties"] is False
    assert props["all"]["allOf"] == original["properties"]["all"]["allOf"]  # parts of one object: left open
    for sub in (props["friends"]["items"], props["pair"]["prefixItems"][0], props["either"]["anyOf"][0],
                props["nullable"], strict["$defs"]["pet"]):
        assert sub["additionalProperties"] is False and sub["required"] == list(sub["properties"]), sub
    assert props["const"] == original["properties"]["const"]  # data, not a schema


def test_what_a_schema_says_itself_stays():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "integer"}}
    assert strict_schema(schema)["additionalProperties"] == {"type": "integer"}
    assert strict_schema({"type": "string"}) == {"type": "string"}
    assert strict_schema(True) is True


def test_a_deeply_nested_schema_needs_no_recursion():
    schema = leaf = {}
    for _ in range(5000):
        leaf["type"], leaf["properties"] = "object", {"a": {}}
        leaf = leaf["properties"]["a"]
    strict = strict_schema(schema)
    depth = 0
    while "properties" in strict:
        assert strict["required"] == ["a"] and strict["additionalProperties"] is False
        strict, depth = strict["properties"]["a"], depth + 1
    assert depth == 5000


def test_allof_branches_stay_open_so_that_their_parts_make_one_object():
    schema = {"type": "object", "allOf": [{"properties": {"a": {"type": "integer"}}},
                                          {"properties": {"b": {"type": "integer"}}}]}
    strict = strict_schema(schema)
    assert strict["allOf"] == schema["allOf"] and strict["additionalProperties"] is False
    jsonschema.validate({}, strict)  # the object's own keywords list no properties: nothing is required
