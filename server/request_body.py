"""Request bodies parsed and validated off the event loop.

FastAPI parses and validates a declared body model on the event loop. The generation and
tokenizer routes take the raw request instead and parse it here, in a worker thread, as FastAPI
would (`json.loads`, then the model). The parser holds the GIL while it builds the objects of
one body, so a hostile 1.6 MB body of 400,000 one-token prompts still holds the loop for about
0.4 s (a single call), not for the tens of seconds that handling its prompts took; the model's
bounds (prompts per request) are checked before anything else is built from them. Their OpenAPI
schema still names the model (`body_schema`, `add_body_schemas`).
"""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

Body = TypeVar("Body", bound=BaseModel)
_SCHEMA_REF = "#/components/schemas/{model}"


async def parse_body(request: Request, model: type[Body]) -> Body:
    """The request's JSON body as `model`; invalid bodies raise FastAPI's validation error
    (a 400 in OpenAI's shape, from server/errors.py)."""
    raw = await request.body()
    if not raw.strip():
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    return await run_in_threadpool(_parse, model, raw)


def _parse(model: type[Body], raw: bytes) -> Body:
    """The body as `model`, or FastAPI's validation error with the first problem (the only one
    the client is told; all of them could be many for a hostile body)."""
    try:
        return model.model_validate(json.loads(raw))
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise RequestValidationError([{**first, "loc": ("body", *first["loc"])}]) from None
    except (ValueError, RecursionError):  # not JSON, not text, or nested past the parser's depth
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": "JSON decode error"}]) from None


def body_schema(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route whose body `parse_body` reads as `model`."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": _SCHEMA_REF.format(model=model.__name__)}}}}}


def add_body_schemas(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Put the models (and the models they use) into the app's OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                model_schema = model.model_json_schema(ref_template=_SCHEMA_REF)
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
