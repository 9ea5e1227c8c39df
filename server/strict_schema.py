"""What `strict: true` means for a JSON schema, as OpenAI's Structured Outputs define it.

Under `strict` (a `response_format` json_schema's, or a function tool's), an object has only
the properties its schema lists, and all of them: every object schema that does not say
`additionalProperties` gets `false`, and its `required` becomes all of its `properties`
(OpenAI asks a strict schema to list them all; an optional field is one whose type allows
`null`). Without `strict`, a schema keeps JSON Schema's meaning: any property it does not
forbid may appear, and only `required` ones must.
"""

from __future__ import annotations

# Keywords whose value is one subschema, a list of them, or a map of name -> subschema.
_ONE = ("additionalProperties", "items", "not", "if", "then", "else", "contains", "propertyNames",
        "unevaluatedProperties", "unevaluatedItems", "additionalItems")
# (allOf's branches are not walked: each holds part of one object's properties, and closing each
# to its own part would allow no object at all.)
_LIST = ("anyOf", "oneOf", "prefixItems", "items")
_MAP = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")


def strict_schema(schema):
    """A copy of `schema` with OpenAI's strict meaning made explicit (the module's doc). Walked
    without recursion: a schema may be nested as deeply as the request body's parser allows."""
    top = _copy(schema)
    stack = [top]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if _is_object_schema(node):
            node.setdefault("additionalProperties", False)
            if isinstance(node.get("properties"), dict):
                node["required"] = list(node["properties"])
        for key in _ONE:
            if isinstance(node.get(key), dict):
                node[key] = _copy(node[key])
                stack.append(node[key])
        for key in _LIST:
            if isinstance(node.get(key), list):
                node[key] = [_copy(item) for item in node[key]]
                stack.extend(node[key])
        for key in _MAP:
            if isinstance(node.get(key), dict):
                node[key] = {name: _copy(sub) for name, sub in node[key].items()}
                stack.extend(node[key].values())
    return top


def _is_object_schema(node: dict) -> bool:
    kind = node.get("type")
    return kind == "object" or (isinstance(kind, list) and "object" in kind) or (
        kind is None and isinstance(node.get("properties"), dict))


def _copy(value):
    return dict(value) if isinstance(value, dict) else value
