"""JSON responses serialized off the event loop: a large one (many choices, logprobs) is
written in a worker thread, piece by piece."""

from __future__ import annotations

import json

from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from server.errors import utf8_safe


async def json_response(payload: dict) -> Response:
    """A JSON response serialized in a worker thread, piece by piece, so that a large one (many
    choices, logprobs) never holds the event loop."""
    return Response(await run_in_threadpool(_encode_json, payload), media_type="application/json")


def _encode_json(payload) -> bytes:
    parts: list[str] = []

    def encode(value, depth: int) -> None:
        # The response's outer levels (choices, a choice's logprobs, the list of logprob entries)
        # are written element by element, and an entry (depth 4 and below) in one call: no single
        # C call runs long, so the interpreter can switch to the event loop's thread between them.
        if isinstance(value, list):
            parts.append("[")
            for start in range(0, len(value), 1024):
                if start:
                    parts.append(",")
                piece = value[start:start + 1024]
                if all(not isinstance(item, (list, dict)) for item in piece):  # numbers: 1024 at once
                    parts.append(json.dumps(piece, ensure_ascii=False, allow_nan=False)[1:-1])
                    continue
                for i, item in enumerate(piece):
                    if i:
                        parts.append(",")
                    encode(item, depth + 1)
            parts.append("]")
        elif isinstance(value, dict) and depth < 4:
            parts.append("{")
            for i, (key, item) in enumerate(value.items()):
                parts.append(("," if i else "") + json.dumps(str(key), ensure_ascii=False) + ":")
                encode(item, depth + 1)
            parts.append("}")
        else:
            parts.append(json.dumps(value, ensure_ascii=False, allow_nan=False))

    encode(payload, 0)
    return utf8_safe("".join(parts)).encode()
