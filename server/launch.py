"""Building and running the server of `python -m server` (server/__main__.py parses the command
line): the engine and the server state from the arguments, the app, and uvicorn with a graceful
shutdown. Importing this module imports nothing heavy: torch, uvicorn, the engine and the app are
imported where they are used, once the command line is parsed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from server.defaults import DEFAULT_MAX_TOKENS, SERVER_THREAD_STACK_BYTES
from server.generation_config import GenerationConfigError

if TYPE_CHECKING:
    from scheduler.engine_config import EngineConfig
    from server.serving import ServerState

logger = logging.getLogger("sinkserve")


class ResponseStoreError(ValueError):
    """A --response-store that cannot be opened; says why."""


def model_errors() -> tuple[type[Exception], ...]:
    """Errors a user fixes in what the command names: the files of --model (found before any weight is
    read where they can be), --generation-config, --response-store."""
    from model.checkpoints.config import ConfigError
    from model.checkpoints.gguf_checkpoint import GGUFError
    from model.checkpoints.loader import CheckpointError
    from model.checkpoints.model_path import ModelPathError
    from model.tokenizers.tokenizer import TokenizerError
    from server.chat_template import ChatTemplateError
    return (ModelPathError, ConfigError, CheckpointError, GGUFError, TokenizerError, ChatTemplateError,
            GenerationConfigError, ResponseStoreError)


def api_keys(args: argparse.Namespace) -> list[str]:
    """Keys from --api-key, SINKSERVE_API_KEY (comma-separated) and --api-key-file /
    SINKSERVE_API_KEY_FILE (one per line, # comments). Never logged."""
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("SINKSERVE_API_KEY", "").split(",") if k.strip()]
    key_file = args.api_key_file or os.environ.get("SINKSERVE_API_KEY_FILE")
    if key_file:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as exc:
            raise SystemExit(f"cannot read the API key file: {exc.strerror}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not keys:
            raise SystemExit("the API key file has no keys")
    return keys


@functools.cache
def graceful_server_class() -> type:
    """GracefulServer, a uvicorn.Server (defined on first use: uvicorn is imported after parsing)."""
    import asyncio
    import signal

    import uvicorn

    from server.async_engine import AsyncEngine

    class GracefulServer(uvicorn.Server):
        """On SIGTERM/Ctrl-C: stop accepting, let requests run up to the timeout, then abort the rest
        so that their streams end with finish_reason "abort" and [DONE] instead of a cut connection."""

        def __init__(self, config: uvicorn.Config, engine: AsyncEngine, timeout: float):
            super().__init__(config)
            self.engine = engine
            self.drain_timeout = timeout

        async def shutdown(self, sockets=None):
            for server in self.servers:
                server.close()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.drain_timeout
            while self.engine.num_active_requests and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if self.engine.num_active_requests:
                logger.info("aborting %d requests still running", self.engine.num_active_requests)
                self.engine.abort_all()
                flush_deadline = loop.time() + 5.0
                while self.engine.num_active_requests and loop.time() < flush_deadline:
                    await asyncio.sleep(0.05)
            await super().shutdown(sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after shutting down; a drained server exits 0 instead.
            signals = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return GracefulServer


def listen_error(host: str, port: int) -> str | None:
    """Why the server cannot listen on host:port, or None: binds a socket to every address `host`
    resolves to as uvicorn will (asyncio's create_server: AI_PASSIVE, SO_REUSEADDR, IPV6_V6ONLY),
    then closes them. A port in use is found before the model loads rather than after."""
    try:
        infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return exc.strerror.lower()
    with contextlib.ExitStack() as stack:
        for family, type_, proto, _, address in dict.fromkeys(infos):
            try:
                sock = stack.enter_context(socket.socket(family, type_, proto))
            except OSError:  # an address family this host lacks (asyncio skips it too)
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
            except OSError as exc:
                return (exc.strerror or str(exc)).lower()
    return None


def engine_config(args: argparse.Namespace) -> EngineConfig:
    from scheduler.engine_config import EngineConfig
    return EngineConfig(
        args.model, args.device, args.dtype, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=int(args.kv_cache_memory * 2**30), gpu_memory_utilization=args.gpu_memory_utilization,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
        session_ttl=args.session_ttl, session_memory=int(args.session_memory * 2**30),
        attention_sinks=args.attention_sinks, attention_window=args.attention_window,
        load_format=args.load_format, seed=args.seed, attention_backend=args.attention_backend,
        enforce_eager=args.enforce_eager, grammar_cache_memory=int(args.grammar_cache_memory * 2**30),
        grammar_mask_timeout=args.grammar_mask_timeout, quantization=args.quantization,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization_group_size=args.quantization_group_size,
        smoothquant_alpha=None if args.no_smoothquant else args.smoothquant_alpha,
    )


def build_state(args: argparse.Namespace) -> ServerState:
    from model.checkpoints.model_path import default_model_name, resolve_model_path
    from scheduler.engine import Engine
    from server.async_engine import AsyncEngine
    from server.chat_template import ChatTemplate
    from server.generation_config import resolve_generation_defaults
    from server.metrics import Metrics
    from server.response_stores import default_response_store_path, open_response_store
    from server.serving import ServerState

    # The model's recommended sampling is read first: a GGUF's metadata is then parsed once, for
    # this and for the engine (model.gguf_checkpoint.open_gguf keeps the reader).
    path = resolve_model_path(args.model)
    name = args.served_model_name or default_model_name(args.model, path)
    started = time.perf_counter()
    logger.info("reading the metadata of %s", path)
    generation = resolve_generation_defaults(path, (name,), args.generation_config, args.override_generation_config)
    logger.info("metadata read (%.1f s)", time.perf_counter() - started)
    store = args.response_store or default_response_store_path()
    try:
        response_store = open_response_store(store, args.max_stored_responses, args.response_ttl,
                                             int(args.response_store_memory * 2**30), args.max_chain_tokens)
    except (OSError, ValueError, sqlite3.Error) as exc:
        raise ResponseStoreError(f"--response-store {store}: {exc} (name another file, a redis:// URL, "
                                 "or memory)") from None
    engine = Engine.from_config(engine_config(args))
    default_max_tokens = args.default_max_tokens
    if default_max_tokens is None:
        default_max_tokens = generation.max_new_tokens or DEFAULT_MAX_TOKENS
    logger.info("sampling defaults %s (from %s); requests without max_tokens get at most %s", generation.sampling
                or "temperature 1, top_p 1", generation.source, default_max_tokens or "the rest of the context")
    logger.info("stored responses are kept %s", response_store.description)
    async_engine = AsyncEngine(engine)
    return ServerState(
        engine=async_engine, tokenizer=engine.tokenizer, chat_template=ChatTemplate(engine.tokenizer),
        metrics=Metrics(async_engine.stats, name, engine.served_as()), model_name=name,
        max_model_len=engine.max_model_len, served_as=engine.served_as(),
        generation=generation, default_max_tokens=default_max_tokens or None,
        max_waiting_requests=args.max_waiting_requests or None, request_timeout=args.request_timeout,
        max_output_tokens=args.max_output_tokens, shared_prefix_cache=args.shared_prefix_cache,
        tool_call_parser=args.tool_call_parser, grammar_compile_timeout=args.grammar_compile_timeout,
        response_store=response_store,
    )


def serve(args: argparse.Namespace) -> None:
    """Load the model, build the app and serve it until a signal stops the server."""
    # Every thread the server starts from here on (the engine's, the request workers', the
    # grammar masks') gets this stack: several times a grammar sandbox's (server/grammar_compiler.py).
    threading.stack_size(SERVER_THREAD_STACK_BYTES)
    import torch
    import uvicorn

    from server.app import build_app
    from server.connections import (KEEP_ALIVE_TIMEOUT, MAX_REQUEST_HEAD_BYTES, ConnectionGuard, connection_limits,
                                    http_protocol, quiet_repeated_logs)
    from server.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    quiet_repeated_logs()
    max_connections, backlog = connection_limits(args.max_connections)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        state = build_state(args)
    except model_errors() as exc:  # a model the user can fix: one line, no traceback
        print(f"sinkserve: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    app = build_app(state, api_keys(args), args.allowed_origins, args.max_request_body_bytes, args.rate_limit,
                    args.body_timeout)
    # Our logging for uvicorn too; the access log is RequestIdMiddleware's (it has the request id).
    # The h11 protocol always (with the connection bounds, server/connections.py), even where
    # httptools is installed.
    guard = ConnectionGuard(max_connections, args.header_timeout)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, log_config=None,
                            access_log=False, timeout_graceful_shutdown=5, http=http_protocol(guard), backlog=backlog,
                            timeout_keep_alive=KEEP_ALIVE_TIMEOUT, h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
                            proxy_headers=args.forwarded_allow_ips is not None,
                            forwarded_allow_ips=args.forwarded_allow_ips)
    served = state.served_as
    logger.info("serving %s (quantization %s, %s activations, %.0f MB of weights) on http://%s:%d", state.model_name,
                served["quantization"], served["dtype"], served["weight_bytes"] / 1e6, args.host, args.port)
    graceful_server_class()(config, state.engine, args.shutdown_timeout).run()
