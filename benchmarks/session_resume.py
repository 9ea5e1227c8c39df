"""The next turn of a long idle session: its cache kept, moved to host memory and copied back,
or dropped and recomputed. SmolLM2-135M-Instruct by default, through the server.

Each trial opens a session with a ~`--history-tokens` user message (War and Peace), then asks a
short follow-up (8 tokens out, streamed) in one of three ways:

- `cached`: right away, the session's KV still in the pool;
- `host`: after a `--squeeze-tokens` prompt that needs the session's blocks, so the session
  moves to host memory (`--session-memory 1`, the default) and is copied back for the turn;
- `dropped`: the same squeeze on a server with `--session-memory 0`: the turn recomputes the
  whole history.

The trials of the three modes are interleaved; it prints the median time to first token and
turn latency of each, and the host-memory counters that show which path ran.

    PYTHONPATH=. .venv/bin/python benchmarks/session_resume.py --result-json benchmarks/results/session_resume.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx

from model.checkpoints.model_path import resolve_model_path
from model.tokenizers.tokenizer_loader import load_tokenizer
from tests.server_process import ServerProcess

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "war_and_peace.txt"
MODES = ("cached", "host", "dropped")


def texts(model: str, path: Path, num_tokens: int, count: int) -> list[str]:
    """`count` consecutive passages of about `num_tokens` tokens each."""
    tokenizer = load_tokenizer(resolve_model_path(model))
    text = path.read_text(encoding="utf-8")
    tokens = tokenizer.encode(text[:num_tokens * count * 6])
    return [tokenizer.decode(tokens[i * num_tokens:(i + 1) * num_tokens]) for i in range(count)]


def chat(client: httpx.Client, url: str, messages: list[dict], session_id: str | None, max_tokens: int) -> dict:
    """One streamed chat turn: its reply, time to first token and latency."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if session_id:
        body["session_id"] = session_id
    start = time.perf_counter()
    first = None
    reply = []
    usage = {}
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    reply.append(choice["delta"]["content"])
    end = time.perf_counter()
    return {"reply": "".join(reply), "ttft": (first or end) - start, "latency": end - start,
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "prompt_tokens": usage.get("prompt_tokens", 0)}


def metric(client: httpx.Client, url: str, name: str) -> float:
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def trial(client: httpx.Client, url: str, mode: str, history: str, squeeze: str, session_id: str) -> dict:
    messages = [{"role": "user", "content": history + "\n\nWho is speaking here?"}]
    first = chat(client, url, messages, session_id, 8)
    if mode != "cached":  # a long prompt that needs the idle session's blocks
        chat(client, url, [{"role": "user", "content": squeeze}], None, 1)
    messages += [{"role": "assistant", "content": first["reply"]}, {"role": "user", "content": "And then?"}]
    return chat(client, url, messages, session_id, 8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--history-tokens", type=int, default=4000)
    parser.add_argument("--squeeze-tokens", type=int, default=3000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--result-json", type=Path, default=None)
    args = parser.parse_args(argv)

    passages = texts(args.model, args.data, args.history_tokens, args.trials * len(MODES) + 1)
    squeeze = passages.pop()[:args.squeeze_tokens * 4]
    # A pool that holds the session and a little more, but not the session and the squeeze.
    blocks = (args.history_tokens + args.squeeze_tokens // 2) // 16
    common = ["--model", args.model, "--num-kv-blocks", str(blocks), "--max-model-len", str(blocks * 16)]
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with ServerProcess(*common, "--session-memory", "1") as host_server, \
            ServerProcess(*common, "--session-memory", "0") as drop_server, httpx.Client(timeout=None) as client:
        print(f"servers: python -m server {' '.join(common)} --session-memory 1 | 0")
        for i in range(args.trials):
            for mode in MODES:
                url = (drop_server if mode == "dropped" else host_server).url
                swapped_in = metric(client, url, "sinkserve_sessions_swapped_in_total")
                result = trial(client, url, mode, passages.pop(), squeeze, f"{mode}-{i}")
                result["swapped_in"] = metric(client, url, "sinkserve_sessions_swapped_in_total") - swapped_in
                results[mode].append(result)
                print(f"trial {i} {mode:<8} ttft {result['ttft']:6.2f} s  turn {result['latency']:6.2f} s  "
                      f"cached {result['cached_tokens']}/{result['prompt_tokens']} tokens  "
                      f"copied back from host: {int(result['swapped_in'])}", flush=True)
    summary = {mode: {"ttft_median_s": statistics.median(r["ttft"] for r in rows),
                      "latency_median_s": statistics.median(r["latency"] for r in rows),
                      "cached_tokens_median": statistics.median(r["cached_tokens"] for r in rows),
                      "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in rows)}
               for mode, rows in results.items()}
    print(f"\n{'mode':<9}{'ttft (median)':>15}{'turn (median)':>15}{'cached/prompt tokens':>23}")
    for mode, row in summary.items():
        print(f"{mode:<9}{row['ttft_median_s']:13.2f} s{row['latency_median_s']:13.2f} s"
              f"{row['cached_tokens_median']:>15.0f}/{row['prompt_tokens_median']:.0f}")
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                "summary": summary, "trials": results}, indent=1))
        print(f"wrote {args.result_json}")


if __name__ == "__main__":
    main()
