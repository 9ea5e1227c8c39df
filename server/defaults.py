"""Defaults of the `sinkserve` command-line flags that the server's modules use as well.

Standard library only (and scheduler/grammar_vocab.py's constants, which import nothing else):
`python -m server --help` and argument parsing read these without importing torch, uvicorn or
the app (server/__main__.py imports those after parsing). The modules that use a default import
it from here (server.app.DEFAULT_MAX_BODY_BYTES etc. still work).
"""

from __future__ import annotations

from scheduler.grammar_vocab import DEFAULT_GRAMMAR_CACHE_BYTES, DEFAULT_GRAMMAR_MASK_TIMEOUT  # noqa: F401

# --max-request-body-bytes (server/app.py).
DEFAULT_MAX_BODY_BYTES = 16 * 2**20

# --max-connections, --header-timeout (server/connections.py). 2048 connections is well above the
# requests the engine admits by default (256 running + 1024 waiting); 30 s for a request head is
# generous for any real client (Node's HTTP server allows 60 s, Apache 20 to 40 s) and short
# enough that a stalled connection does not linger.
DEFAULT_MAX_CONNECTIONS = 2048
DEFAULT_HEADER_TIMEOUT = 30.0

# --body-timeout (server/middleware.py): seconds a request body may take to arrive in full (a
# JSON prompt; nginx allows 60 s between reads).
DEFAULT_BODY_TIMEOUT = 60.0

# --max-stored-responses, --response-ttl, --response-store-memory, --max-chain-tokens
# (server/response_store.py).
DEFAULT_MAX_STORED_RESPONSES = 10_000
DEFAULT_RESPONSE_TTL = 24 * 3600.0  # seconds since last use
DEFAULT_RESPONSE_STORE_BYTES = 2**30
# Tokens a chain's conversation may have at most (the rendered prompt of its next turn): every
# turn re-renders and re-tokenizes the whole history, and the engine matches it against the
# session's token history, so both cost O(chain) per turn.
DEFAULT_MAX_CHAIN_TOKENS = 262_144

# --max-output-tokens (server/serving.py): output tokens a request with a StreamingLLM window may
# ask for (its context never fills up).
DEFAULT_MAX_OUTPUT_TOKENS = 65536


# --grammar-compile-timeout (server/grammar_compiler.py): a JSON schema compiles in about a
# millisecond and a grammar of 128 tools in 66 ms; one that takes seconds is an attack or a
# mistake. --grammar-mask-timeout and --grammar-cache-memory are the engine's
# (scheduler/grammar_vocab.py: torch-free too).
DEFAULT_GRAMMAR_COMPILE_TIMEOUT = 3.0

# The stack of every thread of the server process: eight times a grammar sandbox's (2 MiB,
# server/grammar_worker.py), so that a grammar its sandbox survives the server survives.
SERVER_THREAD_STACK_BYTES = 16 * 2**20

# --default-max-tokens (server/serving.py): output tokens a request that sets no max_tokens gets
# at most. vLLM's default is the rest of the context; at a few dozen tokens a second on a CPU, a
# small model that loops at temperature 0 would run for minutes, so the cap is what a long answer
# needs and a finish_reason "length" says when it cut one.
DEFAULT_MAX_TOKENS = 1024
