"""A long chat through /v1/responses: a response chain runs as a session, past the context.

Starts the real server on `--model` (default smollm2, SmolLM2-135M-Instruct with its ChatML
template) with a `--max-model-len` context and StreamingLLM attention sinks + window, then chats
for `--turns` turns: each turn a short user message, `previous_response_id` pointing at the
previous turn, the same `instructions` every turn (instructions are not carried over), and a
reply of at most `--max-output-tokens` tokens. With 100 turns of ~100-token replies the
conversation grows to about 3x a 4,096-token context.

Per turn it records the turn's latency as the client sees it (one non-streamed request),
`usage.input_tokens` (the whole conversation), `input_tokens_details.cached_tokens` (what the
chain's session cache saved) and so the tokens prefilled, the output tokens, and after the
turn `sinkserve_kv_blocks_used` from /metrics (the blocks the chain's session holds between
turns). Reported: a table per turn, the mean latency of the last 10 turns over the first 10,
and KV blocks min/max after warm-up (once the conversation is past sinks + window, the cache
must stay flat); a JSON file and a PNG of latency and KV blocks against the turn. Run from the
repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/responses_chain.py \\
        --result-json benchmarks/results/responses_chain.json

`--turns 5` makes a smoke run. The machine is shared, so compare ratios, not times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import httpx

from tests.server_process import ServerProcess

RESULTS_DIR = Path(__file__).parent / "results"
INSTRUCTIONS = ("You are a storyteller. Continue the story the user and you are writing together, "
                "a few sentences a turn.")
FIRST_MESSAGE = "Let's write a long story about a lighthouse keeper and a lost ship. Start it."
FOLLOW_UPS = ["Go on.", "What happened next?", "And then?", "Tell me more.", "Continue the story.",
              "What did the keeper do?", "Keep going.", "What happened to the ship?"]


def read_metrics(client: httpx.Client, url: str) -> dict[str, float]:
    """Unlabelled-by-us samples of /metrics by name (our metrics carry only model_name)."""
    values = {}
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith("sinkserve_"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{", 1)[0]] = float(value)
    return values


def run_chain(url: str, model: str, turns: int, max_output_tokens: int, temperature: float) -> list[dict]:
    records = []
    previous = None
    with httpx.Client(timeout=None) as client:
        for turn in range(turns):
            message = FIRST_MESSAGE if turn == 0 else FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]
            body = {"model": model, "instructions": INSTRUCTIONS, "input": message,
                    "max_output_tokens": max_output_tokens, "temperature": temperature}
            if previous is not None:
                body["previous_response_id"] = previous
            start = time.perf_counter()
            response = client.post(f"{url}/v1/responses", json=body)
            latency = time.perf_counter() - start
            if response.status_code != 200:
                raise RuntimeError(f"turn {turn}: {response.status_code} {response.text[:500]}")
            result = response.json()
            previous = result["id"]
            usage = result["usage"]
            metrics = read_metrics(client, url)
            cached = usage["input_tokens_details"]["cached_tokens"]
            records.append({
                "turn": turn, "latency_s": latency, "status": result["status"],
                "input_tokens": usage["input_tokens"], "cached_tokens": cached,
                "prefilled_tokens": usage["input_tokens"] - cached, "output_tokens": usage["output_tokens"],
                "kv_blocks_used": metrics["sinkserve_kv_blocks_used"],
                "sessions_active": metrics["sinkserve_sessions_active"],
                "sink_evictions": metrics["sinkserve_sink_evictions_total"],
            })
            r = records[-1]
            print(f"{turn:>4} {latency:8.2f} {r['input_tokens']:>7} {cached:>7} {r['prefilled_tokens']:>6} "
                  f"{r['output_tokens']:>5} {r['kv_blocks_used']:>5.0f} {r['status']}", flush=True)
    return records


def summarize(records: list[dict], capacity: int) -> dict:
    def mean(key: str, rows: list[dict]) -> float:
        return statistics.fmean(r[key] for r in rows)

    k = min(10, len(records))
    first, last = records[:k], records[-k:]
    # Warm-up: the turns before the conversation passed the window (sinks + window tokens).
    warm = [r for r in records if r["input_tokens"] > capacity]
    blocks = [r["kv_blocks_used"] for r in warm]
    return {
        "turns": len(records), "window_capacity_tokens": capacity,
        "first_k": k, "first_mean_latency_s": mean("latency_s", first), "last_mean_latency_s": mean("latency_s", last),
        "last_over_first_latency": mean("latency_s", last) / mean("latency_s", first),
        "first_mean_ms_per_output_token": 1000 * sum(r["latency_s"] for r in first) / max(1, sum(
            r["output_tokens"] for r in first)),
        "last_mean_ms_per_output_token": 1000 * sum(r["latency_s"] for r in last) / max(1, sum(
            r["output_tokens"] for r in last)),
        "final_input_tokens": records[-1]["input_tokens"],
        "turns_with_cache": sum(r["cached_tokens"] > 0 for r in records[1:]),
        "mean_prefilled_after_first": mean("prefilled_tokens", records[1:]) if len(records) > 1 else None,
        "past_window_from_turn": warm[0]["turn"] if warm else None,
        "kv_blocks_after_warmup": {"min": min(blocks), "max": max(blocks)} if blocks else None,
    }


def plot(records: list[dict], title: str, path: Path, max_model_len: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [r["turn"] for r in records]
    fig, (ax_latency, ax_blocks, ax_tokens) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    ax_latency.plot(turns, [r["latency_s"] for r in records], ".-", ms=4)
    ax_latency.set_ylabel("turn latency (s)")
    ax_latency.set_ylim(0, max(r["latency_s"] for r in records) * 1.15)
    ax_latency.grid(alpha=0.3)
    ax_blocks.plot(turns, [r["kv_blocks_used"] for r in records], ".-", ms=4)
    ax_blocks.set_ylabel("KV blocks used\n(after the turn)")
    ax_blocks.set_ylim(0, max(r["kv_blocks_used"] for r in records) * 1.3 + 1)
    ax_blocks.grid(alpha=0.3)
    ax_tokens.plot(turns, [r["input_tokens"] for r in records], label="input tokens (conversation)")
    ax_tokens.plot(turns, [r["prefilled_tokens"] for r in records], label="prefilled (input - cached)")
    ax_tokens.axhline(max_model_len, color="gray", ls="--", lw=1, label="max model len")
    ax_tokens.set_ylabel("tokens")
    ax_tokens.set_xlabel("turn")
    ax_tokens.legend(loc="upper left")
    ax_tokens.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--turns", type=int, default=100)
    parser.add_argument("--max-output-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--attention-sinks", type=int, default=4)
    parser.add_argument("--attention-window", type=int, default=2044)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch CPU threads")
    parser.add_argument("--server-arg", action="append", default=[], help="one more server argument (repeatable)")
    parser.add_argument("--png", type=Path, default=RESULTS_DIR / "responses_chain.png")
    parser.add_argument("--result-json", type=Path, default=None)
    args = parser.parse_args(argv)

    server_args = ["--model", args.model, "--max-model-len", str(args.max_model_len),
                   "--attention-sinks", str(args.attention_sinks), "--attention-window", str(args.attention_window),
                   "--threads", str(args.threads), *args.server_arg]
    capacity = args.attention_sinks + args.attention_window
    print(f"server: python -m server {' '.join(server_args)}")
    load_before = os.getloadavg()[0]
    with ServerProcess(*server_args, startup_timeout=600) as server:
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        print(f"{'turn':>4} {'lat s':>8} {'input':>7} {'cached':>7} {'prefill':>6} {'out':>5} {'kv':>5} status")
        start = time.perf_counter()
        records = run_chain(server.url, model, args.turns, args.max_output_tokens, args.temperature)
        wall_s = time.perf_counter() - start
    load_after = os.getloadavg()[0]

    summary = summarize(records, capacity)
    print(f"\n{len(records)} turns in {wall_s:.1f} s (load average {load_before:.2f} before, {load_after:.2f} after)")
    print(f"conversation: {summary['final_input_tokens']:,} tokens at the last turn "
          f"({summary['final_input_tokens'] / args.max_model_len:.2f}x max_model_len {args.max_model_len})")
    print(f"turns that found their chain's cache: {summary['turns_with_cache']} of {len(records) - 1}; "
          f"mean tokens prefilled per turn after the first: {summary['mean_prefilled_after_first'] or 0:.1f}")
    print(f"mean turn latency: first {summary['first_k']} {summary['first_mean_latency_s']:.2f} s, "
          f"last {summary['first_k']} {summary['last_mean_latency_s']:.2f} s, "
          f"ratio {summary['last_over_first_latency']:.3f}; per output token "
          f"{summary['first_mean_ms_per_output_token']:.1f} -> {summary['last_mean_ms_per_output_token']:.1f} ms")
    blocks = summary["kv_blocks_after_warmup"]
    if blocks:
        print(f"KV blocks used after warm-up (from turn {summary['past_window_from_turn']}, the conversation past "
              f"{capacity} tokens): min {blocks['min']:.0f}, max {blocks['max']:.0f}")
    else:
        print(f"KV blocks after warm-up: the conversation never passed {capacity} tokens (more turns needed)")

    title = (f"{model}: /v1/responses chain, {args.attention_sinks} sinks + {args.attention_window} window, "
             f"max_model_len {args.max_model_len}, {len(records)} turns")
    plot(records, title, args.png, args.max_model_len)
    if args.result_json:
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "server_args": server_args, "wall_s": wall_s, "load_avg_1m": [load_before, load_after],
                   "summary": summary, "turns": records}
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.result_json}")


if __name__ == "__main__":
    main()
