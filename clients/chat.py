"""An interactive chat in the terminal, streaming each reply as it is generated.

    python -m clients.chat --url http://127.0.0.1:8000 [--system "You are ..."] [--max-tokens 128]

The whole conversation is resent every turn, as OpenAI clients do. Commands: /help lists them,
/reset forgets the conversation (keeping the system prompt), /quit or end of input (Ctrl-D) leaves;
any other line that starts with "/" is an unknown command, never sent. Ctrl-C while a reply is
streaming stops that reply only; what was shown of it stays in the history.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import closing

import httpx

from clients.client import DEFAULT_URL, APIError, Client

try:
    import readline  # noqa: F401  (line editing and history for input(), where available)
except ImportError:
    pass

USER_PROMPT = "you> "
ASSISTANT_PROMPT = "assistant> "
COMMANDS = {"/help": "list the commands", "/reset": "forget the conversation, keeping the system prompt",
            "/quit": "leave (as does Ctrl-D)"}
HELP_LINE = f"Commands: {', '.join(COMMANDS)}. Ctrl-C stops a reply."


def unreachable(url: str, exc: Exception) -> str:
    """What to say when the server cannot be reached."""
    return f"cannot reach the server at {url}: {exc} (is it running there? --url sets the address)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m clients.chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=DEFAULT_URL, help="server base URL")
    p.add_argument("--api-key", default=None, help="bearer key, if the server wants one")
    p.add_argument("--model", default=None, help="model name (default: the server's)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens per reply (default: the server's, its --default-max-tokens)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the server's)")
    p.add_argument("--session-id", default=None, help="sent as the X-Session-ID header")
    return p.parse_args(argv)


def stream_reply(client: Client, request: dict) -> tuple[str, str | None]:
    """Print the reply as it streams; its text and finish reason ("interrupted" on Ctrl-C)."""
    parts: list[str] = []
    finish_reason = None
    print(ASSISTANT_PROMPT, end="", flush=True)
    try:
        # closing(): Ctrl-C between events must still close the connection, aborting the request.
        with closing(client.stream_chat(**request)) as events:
            for event in events:
                for choice in event.get("choices", []):
                    text = choice.get("delta", {}).get("content") or ""
                    if not parts:  # the template already puts a space after "assistant:"
                        text = text.lstrip()
                    if text:
                        print(text, end="", flush=True)
                        parts.append(text)
                    finish_reason = choice.get("finish_reason") or finish_reason
    except KeyboardInterrupt:
        finish_reason = "interrupted"
    finally:
        print()
    return "".join(parts), finish_reason


def converse(client: Client, args: argparse.Namespace, model: str) -> int:
    """The loop: read a line from input(), run a command or stream the reply; the exit status."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    options = {"max_tokens": args.max_tokens, "temperature": args.temperature, "model": model}
    options = {key: value for key, value in options.items() if value is not None}
    print(f"Chatting with {model} at {args.url}. {HELP_LINE}")
    while True:
        try:
            line = input(USER_PROMPT)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, as a shell does
            print()
            continue
        command = line.strip()
        if not command:
            continue
        if command == "/quit":
            return 0
        if command == "/help":
            print("\n".join(f"{name:<8}{text}" for name, text in COMMANDS.items()))
            continue
        if command == "/reset":
            history = list(system)
            print("(conversation reset)")
            continue
        if command.startswith("/"):
            print(f"unknown command {command.split()[0]}; the commands are {', '.join(COMMANDS)}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            reply, finish_reason = stream_reply(client, {**options, "messages": history})
        except (APIError, httpx.HTTPError) as exc:
            history.pop()  # the turn did not happen; the user may retry or /reset
            hint = " (try /reset)" if isinstance(exc, APIError) and exc.code == "context_length_exceeded" else ""
            message = unreachable(args.url, exc) if isinstance(exc, httpx.TransportError) else f"{exc}{hint}"
            print(f"error: {message}", file=sys.stderr)
            continue
        if finish_reason == "interrupted":
            print("(reply stopped)")
        elif finish_reason == "length":
            print("(reply cut at the length limit)")
        history.append({"role": "assistant", "content": reply})


def run(args: argparse.Namespace) -> int:
    headers = {"X-Session-ID": args.session_id} if args.session_id else None
    with Client(args.url, api_key=args.api_key, headers=headers) as client:
        try:  # the server, its key and its model are checked before the first line is typed
            served = [entry["id"] for entry in client.models()]
        except httpx.TransportError as exc:
            print(f"error: {unreachable(args.url, exc)}", file=sys.stderr)
            return 1
        except (APIError, httpx.HTTPError) as exc:
            print(f"error: the server at {args.url} answered: {exc}", file=sys.stderr)
            return 1
        model = args.model or served[0]
        if model not in served:
            print(f"error: the server at {args.url} serves {', '.join(served)}, not {model}", file=sys.stderr)
            return 1
        return converse(client, args, model)


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(parse_args(argv)))


if __name__ == "__main__":
    main()
