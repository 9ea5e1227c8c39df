"""Stored responses of the Responses API: GET and DELETE /v1/responses/{id}, GET
/v1/responses/{id}/input_items, and what creating a response shares with them: looking a
response up in the store (a file or a server: its failure is a 503), the output message item,
and ending in the background the engine sessions that storing or forgetting a response ended.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from server.errors import APIError
from server.json_response import json_response
from server.middleware import request_tenant
from server.response_store import StoredResponse
from server.responses_protocol import MAX_ID_CHARS
from server.serving import ServerState

logger = logging.getLogger(__name__)

_background: set[asyncio.Task] = set()  # session ends under way (a reference keeps each task alive)


def not_found(response_id: str, param: str | None = None, code: str | None = None) -> APIError:
    shown = response_id[:MAX_ID_CHARS]
    if param == "previous_response_id":
        return APIError(404, f"Previous response with id '{shown}' not found.", param=param, code=code)
    return APIError(404, f"No response found with id '{shown}'.", "invalid_request_error", param, code)


def spawn_session_ends(state: ServerState, sessions: list[str]) -> None:
    """End sessions in the engine in the background (a request does not wait for it)."""
    if sessions:
        task = asyncio.ensure_future(state.engine.end_sessions(sessions))
        _background.add(task)
        task.add_done_callback(_background.discard)


def using_store(method, *args):
    """A call of the response store (a file or a server: it can fail): its failure is a 503 that
    says so, never a 500 or a reply that pretends to be stored."""
    try:
        return method(*args)
    except Exception as exc:  # noqa: BLE001 (sqlite3, redis, OS errors alike)
        logger.exception("the response store failed")
        raise APIError(503, "The response store is not available: retry later, or send store: false (a reply "
                            "that was generated is not stored).", "service_unavailable",
                       code="response_store_unavailable") from exc


async def lookup(state: ServerState, response_id: str, raw: Request) -> StoredResponse | None:
    """The tenant's stored response (in a worker thread: the store may be a file or a server)."""
    node, ended = await run_in_threadpool(using_store, state.response_store.get, response_id,
                                          request_tenant(raw.scope))
    spawn_session_ends(state, ended)
    return node


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(message_id: str, status: str, text: str | None) -> dict:
    return {"id": message_id, "type": "message", "status": status, "role": "assistant",
            "content": [] if text is None else [text_part(text)]}


def _stored_object(node: StoredResponse) -> dict:
    status = "completed" if node.fields["status"] == "completed" else "incomplete"
    return {**node.fields, "instructions": node.instructions,
            "output": [message_item(node.message_id, status, node.output_text)]}


async def retrieve_response(state: ServerState, response_id: str, raw: Request, stream: bool,
                            include: list[str] | None) -> Response:
    if stream:
        raise APIError(400, "stream is not supported when retrieving a response: responses are not run in the "
                            "background", param="stream")
    if include:
        raise APIError(400, "include is not supported: none of its fields can be filled", param="include")
    node = await lookup(state, response_id, raw)
    if node is None:
        raise not_found(response_id)
    return await json_response(await run_in_threadpool(_stored_object, node))


async def delete_response(state: ServerState, response_id: str, raw: Request) -> dict:
    """Forget a response; if its chain's session holds its turn (it was the chain's head), or
    it was the chain's last response kept, the session's cache ends too."""
    deleted, ended = await run_in_threadpool(using_store, state.response_store.delete, response_id,
                                             request_tenant(raw.scope))
    await state.engine.end_sessions(ended)
    if not deleted:
        raise not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def _input_item(item_id: str, role: str, text: str) -> dict:
    if role == "assistant":
        return {"id": item_id, "type": "message", "status": "completed", "role": role, "content": [text_part(text)]}
    return {"id": item_id, "type": "message", "status": "completed", "role": role,
            "content": [{"type": "input_text", "text": text}]}


async def list_input_items(state: ServerState, response_id: str, raw: Request, after: str | None, limit: int,
                           order: str, include: list[str] | None) -> Response:
    if include:
        raise APIError(400, "include is not supported: none of its fields can be filled", param="include")
    node = await lookup(state, response_id, raw)
    if node is None:
        raise not_found(response_id)

    def page() -> dict:
        items = list(node.input_items) if order == "asc" else list(reversed(node.input_items))
        start = 0
        if after is not None:
            ids = [item_id for item_id, _, _ in items]
            if after not in ids:
                raise APIError(400, f"No input item with id '{after[:MAX_ID_CHARS]}' in this response.", param="after")
            start = ids.index(after) + 1
        data = [_input_item(*item) for item in items[start:start + limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": start + limit < len(items)}

    return await json_response(await run_in_threadpool(page))
