"""The FastAPI app: thin routes over the shared server state."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from model.tokenizers.tokenizer import Tokenizer, replace_lone_surrogates
from server.async_engine import EngineDeadError, RequestFailedError, ServerShuttingDownError
from server.chat import create_chat_completion, render_chat_prompt
from server.completions import create_completion
from server.errors import APIError, error_response, install_error_handlers
from server.generation_config import API_SAMPLING_DEFAULTS
from server.middleware import (DEFAULT_BODY_TIMEOUT, APIKeyMiddleware, BodySizeLimitMiddleware, RateLimitMiddleware,
                               RequestIdMiddleware)
from server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.request_body import add_body_schemas, body_schema, parse_body
from server.responses import create_response
from server.responses_protocol import ResponseRequest
from server.json_response import json_response
from server.serving import ServerState, session_key
from server.stored_responses import delete_response, list_input_items, retrieve_response
from server.streaming import engine_api_error

from server.defaults import DEFAULT_MAX_BODY_BYTES  # the CLI's default (--max-request-body-bytes)


def tokenize_text(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """/tokenize of a prompt, as Hugging Face tokenizers (and vLLM) tokenize: special-token text
    (`</s>`, `<|im_end|>`) becomes its id, and BOS / EOS are added as the checkpoint adds them
    when `add_special_tokens`."""
    ids = tokenizer.encode_with_special_tokens(replace_lone_surrogates(text))
    if add_special_tokens and tokenizer.add_bos_token and tokenizer.bos_token_id is not None:
        ids.insert(0, tokenizer.bos_token_id)
    if add_special_tokens and tokenizer.add_eos_token and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def build_app(state: ServerState, api_keys: list[str] | None = None, cors_origins: list[str] | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, rate_limit: float | None = None,
              body_timeout: float = DEFAULT_BODY_TIMEOUT) -> FastAPI:
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        state.engine.start()
        state.grammar_compiler.start()  # its sandbox processes, in the background
        try:
            yield
        finally:
            await state.grammar_compiler.stop()
            state.engine.stop()

    app = FastAPI(title="sinkserve", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(RequestFailedError)
    @app.exception_handler(ServerShuttingDownError)
    async def _engine_error(_: Request, exc: Exception):
        error = engine_api_error(exc)
        return error_response(error.status, error.message, error.type, code=error.code, headers=error.headers)

    # Bodies are parsed in a worker thread (server/request_body.py), not on the event loop.
    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
    async def completions(raw: Request):
        return await create_completion(state, await parse_body(raw, CompletionRequest), raw)

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatCompletionRequest))
    async def chat_completions(raw: Request):
        return await create_chat_completion(state, await parse_body(raw, ChatCompletionRequest), raw)

    # The Responses API (server/responses.py): response chains run as sessions.
    @app.post("/v1/responses", openapi_extra=body_schema(ResponseRequest))
    async def responses(raw: Request):
        return await create_response(state, await parse_body(raw, ResponseRequest), raw)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, raw: Request, stream: bool = False,
                           include: list[str] | None = Query(None)):
        return await retrieve_response(state, response_id, raw, stream, include)

    @app.delete("/v1/responses/{response_id}")
    async def forget_response(response_id: str, raw: Request):
        return await delete_response(state, response_id, raw)

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(response_id: str, raw: Request, after: str | None = None,
                                   limit: int = Query(20, ge=1, le=100), order: Literal["asc", "desc"] = "desc",
                                   include: list[str] | None = Query(None)):
        return await list_input_items(state, response_id, raw, after, limit, order, include)

    @app.delete("/v1/sessions/{session_id:path}")
    async def end_session(session_id: str, raw: Request):
        key = session_key(raw, session_id, "session_id")
        if not await state.engine.end_session(key):
            raise APIError(404, f"No session `{session_id}`.", "not_found_error", "session_id", "session_not_found")
        return {"id": session_id, "object": "session", "deleted": True}

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": created, "owned_by": "sinkserve",
                "max_model_len": state.max_model_len, **{key: state.served_as[key] for key in
                                                         ("quantization", "dtype", "kv_cache_dtype")
                                                         if key in state.served_as},
                # What a request that leaves these out gets (server/generation_config.py).
                "default_sampling": {**API_SAMPLING_DEFAULTS, **state.generation.sampling},
                "default_sampling_source": state.generation.source,
                "default_max_tokens": state.default_max_tokens}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        state.check_model(model_id)
        return model_card()

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if not state.engine.is_alive:
            return error_response(503, "The engine loop is not running.", "service_unavailable")
        return Response(status_code=200)

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", openapi_extra=body_schema(TokenizeRequest))
    async def tokenize(raw: Request):
        body = await parse_body(raw, TokenizeRequest)
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if body.tools and body.messages is None:
            raise APIError(400, "tools are rendered with messages only", param="tools")
        if body.messages is not None:
            tokens = await run_in_threadpool(render_chat_prompt, state, body)
        else:
            tokens = await run_in_threadpool(tokenize_text, state.tokenizer, body.prompt, body.add_special_tokens)
        return await json_response({"tokens": tokens, "count": len(tokens), "max_model_len": state.max_model_len})

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        # vLLM's endpoint: evaluation tools (lm-eval's remote tokenizer) read the special tokens
        # and the chat template here, and tokenize through /tokenize and /detokenize.
        tokenizer = state.tokenizer
        names = tokenizer.special_token_texts()
        return {"tokenizer_class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
                "model_max_length": state.max_model_len, "bos_token": names.get("bos_token"),
                "eos_token": names.get("eos_token"), "pad_token": None, "unk_token": None,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "add_bos_token": tokenizer.add_bos_token, "add_eos_token": tokenizer.add_eos_token,
                "chat_template": state.chat_template.source}

    @app.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest))
    async def detokenize(raw: Request):
        body = await parse_body(raw, DetokenizeRequest)
        state.check_model(body.model)

        def decode() -> str:
            vocab = state.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in body.tokens):
                raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
            return state.tokenizer.decode(body.tokens)

        return await json_response({"prompt": await run_in_threadpool(decode)})

    add_body_schemas(app, [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest,
                           ResponseRequest])

    # Outermost last: auth runs before the rate limit (a wrong key uses no one's quota), both
    # before the body is read (a client without a key, or past its quota, sends no body the
    # server keeps), CORS before them, and the request id before everything, so that every
    # response (errors included) carries one.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_body_bytes, body_timeout=body_timeout)
    if rate_limit:
        app.add_middleware(RateLimitMiddleware, per_minute=rate_limit)
    if api_keys:
        app.add_middleware(APIKeyMiddleware, api_keys=api_keys)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-Id"])
    app.add_middleware(RequestIdMiddleware)
    return app
