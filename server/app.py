"""The FastAPI app: thin routes over the shared server state."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.async_engine import EngineDeadError, RequestFailedError
from server.chat import chat_prompt, create_chat_completion
from server.completions import create_completion
from server.errors import APIError, error_response, install_error_handlers
from server.middleware import APIKeyMiddleware, BodySizeLimitMiddleware, RateLimitMiddleware, RequestIdMiddleware
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.serving import ServerState, engine_api_error

DEFAULT_MAX_BODY_BYTES = 16 * 2**20


def build_app(state: ServerState, api_keys: list[str] | None = None, cors_origins: list[str] | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, rate_limit: float | None = None) -> FastAPI:
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.engine.start()
        try:
            yield
        finally:
            state.engine.stop()

    app = FastAPI(title="sinkserve", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(RequestFailedError)
    async def _engine_error(_: Request, exc: Exception):
        error = engine_api_error(exc)
        return error_response(error.status, error.message, error.type, code=error.code)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await create_completion(state, body, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(state, body, raw)

    @app.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: str):
        if not await state.engine.call(lambda engine: engine.end_session(session_id)):
            raise APIError(404, f"No session `{session_id}`.", "not_found_error", "session_id", "session_not_found")
        return {"id": session_id, "object": "session", "deleted": True}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": created, "owned_by": "sinkserve",
            "max_model_len": state.max_model_len}]}

    @app.get("/health")
    async def health():
        if not state.engine.is_alive:
            return error_response(503, "The engine loop is not running.", "service_unavailable")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            tokens = chat_prompt(state, body)
        else:
            tokens = state.tokenizer.encode(body.prompt, add_bos=None if body.add_special_tokens else False)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        vocab = state.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": state.tokenizer.decode(body.tokens)})

    # Outermost last: auth runs before the rate limit (a wrong key uses no one's quota), the size
    # limit before auth, CORS before both, and the request id before everything, so that every
    # response (errors included) carries one.
    if rate_limit:
        app.add_middleware(RateLimitMiddleware, per_minute=rate_limit)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, api_keys=api_keys)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-Id"])
    app.add_middleware(RequestIdMiddleware)
    return app
