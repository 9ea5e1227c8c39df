"""`python -m server` / `sinkserve`: serve a model over the OpenAI API.

With no arguments it serves the bundled stories260K on 127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Parsing the arguments (and --help) imports nothing heavy: the defaults come from server.defaults
# and these stdlib-only modules; torch, uvicorn, the engine and the app are imported once the
# server is built (server/launch.py).
from model.checkpoints.model_path import INSTALLED_MODELS, ModelPathError, resolve_model_path
from model.quantization.config import CHOICES as QUANTIZATION_CHOICES
from model.quantization.config import DEFAULT_GROUP_SIZE, DEFAULT_SMOOTHQUANT_ALPHA
from model.execution.threads import THREADS_HELP, default_threads
from server.defaults import (DEFAULT_BODY_TIMEOUT, DEFAULT_GRAMMAR_CACHE_BYTES, DEFAULT_GRAMMAR_COMPILE_TIMEOUT,
                             DEFAULT_GRAMMAR_MASK_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_BODY_BYTES,
                             DEFAULT_MAX_CHAIN_TOKENS, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_OUTPUT_TOKENS,
                             DEFAULT_MAX_STORED_RESPONSES, DEFAULT_MAX_TOKENS, DEFAULT_RESPONSE_STORE_BYTES,
                             DEFAULT_RESPONSE_TTL)
from server.generation_config import GenerationConfigError, parse_overrides
from server.launch import listen_error, serve
from server.tool_parsers import TOOL_PARSERS


def positive(kind):
    """An argparse type: a number of `kind` above 0."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text}")
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value"
    return parse


def in_range(kind, low, high, words: tuple[str, ...] = ()):
    """An argparse type: a number of `kind` in [low, high], or one of `words` as written."""
    def parse(text: str):
        if text in words:
            return text
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {' or '.join((*words, 'a number'))}: {text}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {' or '.join((*words, f'in [{low}, {high}]'))}: {text}")
        return value
    return parse


port = in_range(int, 0, 65535)  # 0: any free port


def generation_overrides(text: str) -> dict:
    """An argparse type: --override-generation-config's JSON object."""
    try:
        return parse_overrides(text)
    except GenerationConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--override-generation-config ")) from None
smoothquant_alpha = in_range(float, 0.0, 1.0, ("auto",))


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, once: the help text's own "(default: ...)" where
    it has one (a default of None or a flag's off state, said in words), else the value."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if "(default:" in help or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return help
        return help + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sinkserve", description=__doc__, formatter_class=HelpFormatter)

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="a Hugging Face model directory, a .gguf file, or an installed model's name "
                        f"({', '.join(INSTALLED_MODELS)}) (default: bundled stories260K)")
    g.add_argument("--served-model-name", default=None,
                   help="model name in the API (default: the installed model's name, the directory's name, "
                        "or the GGUF file's name without .gguf)")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights of the checkpoint's shapes, no weight files read")
    g.add_argument("--seed", type=int, default=0, help="seed of the dummy weights (--load-format dummy)")
    g.add_argument("--tool-call-parser", default="auto", choices=["auto", *TOOL_PARSERS],
                   help="how replies are read for tool calls (default: the format the chat template teaches)")

    g = p.add_argument_group("device")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs; auto: cuda where there is a GPU, else cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' and activations' dtype; auto: bfloat16 on a GPU, float32 on a CPU")
    g.add_argument("--threads", type=int, default=default_threads(), help=THREADS_HELP)
    g.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES,
                   help="how the linear layers are stored: none (--dtype floats), int8 (W8A8), int8-weight, "
                        "int4-weight; auto: a GGUF's own 4-bit or 8-bit codes, a float checkpoint in bfloat16 "
                        "where this CPU multiplies that faster (README, Quantization)")
    g.add_argument("--quantization-group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=[32, 64, 128, 256],
                   help="input features per group of 4-bit weights (int4-weight)")
    g.add_argument("--smoothquant-alpha", type=smoothquant_alpha, default=DEFAULT_SMOOTHQUANT_ALPHA,
                   help="SmoothQuant's migration strength for int8: 0-1, or auto (searched per layer on "
                        "the calibration text)")
    g.add_argument("--no-smoothquant", action="store_true", help="int8 without SmoothQuant smoothing")
    g.add_argument("--attention-backend", default=None, choices=["auto", "torch", "triton"],
                   help="paged attention implementation (default: auto, triton kernels on CUDA)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs for decode steps (default: CUDA graphs on a GPU)")

    g = p.add_argument_group("sampling defaults", "what a request that leaves a field out gets")
    g.add_argument("--generation-config", default="auto",
                   help="auto: the model's recommended sampling (generation_config.json, a GGUF's general.sampling "
                        "keys, else the published settings of a known model such as SmolLM2); none: the OpenAI API's "
                        "defaults (temperature 1, top_p 1); or the path of a generation_config.json (or its directory)")
    g.add_argument("--override-generation-config", type=generation_overrides, default=None,
                   help="JSON object of defaults that win over --generation-config, e.g. '{\"temperature\": 0.5}' "
                        "(temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) (default: none)")
    g.add_argument("--default-max-tokens", type=in_range(int, 0, 2**31 - 1), default=None,
                   help="output tokens a request that sets no max_tokens / max_output_tokens gets at most; 0: up to "
                        f"the context (default: the model's max_new_tokens, else {DEFAULT_MAX_TOKENS})")

    g = p.add_argument_group("memory", "the paged KV cache")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV pool size in blocks (default: from --kv-cache-memory or --gpu-memory-utilization)")
    g.add_argument("--kv-cache-memory", type=float, default=1.0, help="GiB for the KV pool on a CPU")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"],
                   help="auto: the model's dtype; int8: keys and values as int8 codes with a scale per token and "
                        "head (about 2x the tokens per GiB of bfloat16, 4x of float32)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="share of the GPU's memory for the model, activations and the KV pool on a GPU")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context length in tokens at most (default: the model's)")
    g.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV blocks of prompt prefixes that earlier requests computed "
                        "(default: reused)")

    g = p.add_argument_group("scheduling")
    g.add_argument("--max-num-seqs", type=int, default=256, help="sequences running at once at most")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens one engine step computes at most")
    g.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="requests past this many waiting get a fast 503 with Retry-After (0: no limit)")
    g.add_argument("--request-timeout", type=float, default=None,
                   help="seconds after which a request ends with what it has: finish_reason 'length', stop_reason "
                        "'timeout' (default: none)")

    g = p.add_argument_group("StreamingLLM", "attention sinks and a sliding window: generation past the context")
    g.add_argument("--attention-sinks", type=int, default=4, help="sink tokens kept (with a window)")
    g.add_argument("--attention-window", type=int, default=None,
                   help="recent window in tokens (default: none, dense attention)")
    g.add_argument("--max-output-tokens", type=positive(int), default=DEFAULT_MAX_OUTPUT_TOKENS,
                   help="output tokens per completion at most for requests with a window (whose context never "
                        "fills up), and their default")

    g = p.add_argument_group("sessions")
    g.add_argument("--session-ttl", type=float, default=600.0, help="seconds an idle session keeps its cache")
    g.add_argument("--session-memory", type=float, default=1.0,
                   help="GiB of host memory for idle sessions' KV caches under memory pressure (0: drop them; "
                        "like llama.cpp's --cache-ram)")

    g = p.add_argument_group("responses", "stored responses of /v1/responses")
    g.add_argument("--response-store", default=None,
                   help="where stored responses live: the path of an SQLite file (kept across restarts, shared by "
                        "the servers of a host that name it), redis://HOST:PORT/DB (shared by replicas on several "
                        "hosts; pip install 'sinkserve[redis]'), or memory (this process only) "
                        "(default: $XDG_STATE_HOME/sinkserve/responses.sqlite3, ~/.local/state/... without it)")
    g.add_argument("--max-stored-responses", type=positive(int), default=DEFAULT_MAX_STORED_RESPONSES,
                   help="responses kept in memory at most (least recently used forgotten first)")
    g.add_argument("--response-ttl", type=positive(float), default=DEFAULT_RESPONSE_TTL,
                   help="seconds a stored response is kept after its last use")
    g.add_argument("--response-store-memory", type=positive(float), default=DEFAULT_RESPONSE_STORE_BYTES / 2**30,
                   help="GiB of memory for stored responses' text at most (an estimate)")
    g.add_argument("--max-chain-tokens", type=positive(int), default=DEFAULT_MAX_CHAIN_TOKENS,
                   help="tokens a response chain's conversation may have at most (400 past it)")

    g = p.add_argument_group("structured output", "grammars (response_format, structured_outputs, tool_choice)")
    g.add_argument("--grammar-compile-timeout", type=positive(float), default=DEFAULT_GRAMMAR_COMPILE_TIMEOUT,
                   help="seconds a new grammar may take to compile (in a sandbox process) before it is refused "
                        "with 400")
    g.add_argument("--grammar-mask-timeout", type=positive(float), default=DEFAULT_GRAMMAR_MASK_TIMEOUT,
                   help="seconds of CPU time one step's grammar mask of a request may take; past it the request "
                        "ends with finish_reason 'length' and stop_reason 'grammar_timeout'")
    g.add_argument("--grammar-cache-memory", type=positive(float), default=DEFAULT_GRAMMAR_CACHE_BYTES / 2**30,
                   help="GiB of compiled grammars kept for reuse at most, shared fairly between API keys")

    g = p.add_argument_group("server", "HTTP: address, connections, timeouts")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every IPv4 interface)")
    g.add_argument("--port", type=port, default=8000, help="port to listen on")
    g.add_argument("--max-connections", type=positive(int), default=DEFAULT_MAX_CONNECTIONS,
                   help="open connections at most; past them a new one replaces the longest idle or half-sent "
                        "one, else only /health and /metrics get through")
    g.add_argument("--header-timeout", type=positive(float), default=DEFAULT_HEADER_TIMEOUT,
                   help="seconds a connection has to send a complete request head before it is closed")
    g.add_argument("--body-timeout", type=positive(float), default=DEFAULT_BODY_TIMEOUT,
                   help="seconds a request body has to arrive in full before the request gets 408")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="bytes a request body may have at most (413 past it)")
    g.add_argument("--forwarded-allow-ips", default=None,
                   help="comma-separated proxy addresses (or *) whose X-Forwarded-For gives the client address "
                        "(rate limits, logs) (default: none, the client is the peer)")
    g.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds in-flight requests may run on after SIGTERM before they are aborted")

    g = p.add_argument_group("security")
    g.add_argument("--api-key", action="append", default=None,
                   help="require this bearer key on /v1/* (repeat for several; also env SINKSERVE_API_KEY, "
                        "comma-separated) (default: none, no key needed)")
    g.add_argument("--api-key-file", default=None,
                   help="file with one API key per line (also env SINKSERVE_API_KEY_FILE) (default: none)")
    g.add_argument("--rate-limit", type=float, default=None,
                   help="requests per minute per API key (per client address without keys); 429 past it "
                        "(default: no limit)")
    g.add_argument("--allowed-origins", nargs="*", default=None,
                   help="enable CORS for these origins (default: CORS off)")
    g.add_argument("--shared-prefix-cache", action="store_true",
                   help="with API keys, let requests of different keys share prefix-cache blocks "
                        "(default: each key's are its own)")

    g = p.add_argument_group("logging")
    g.add_argument("--log-level", default="info", help="debug, info, warning, error or critical")
    g.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="json: one JSON object per line, with the request id")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    error = listen_error(args.host, args.port)
    if error is not None:  # before the model loads, not after it
        address = f"[{args.host}]" if ":" in args.host else args.host
        print(f"sinkserve: error: cannot listen on {address}:{args.port}: {error}", file=sys.stderr)
        raise SystemExit(1)
    try:  # a --model that names nothing, or a directory without weights, is one line before torch is imported
        resolve_model_path(args.model)
    except ModelPathError as exc:
        print(f"sinkserve: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.generation_config not in ("auto", "none") and not Path(args.generation_config).exists():
        print(f"sinkserve: error: --generation-config {args.generation_config}: no such file or directory "
              "(give a generation_config.json, a directory holding one, 'auto' or 'none')", file=sys.stderr)
        raise SystemExit(2)
    serve(args)


if __name__ == "__main__":
    main()
