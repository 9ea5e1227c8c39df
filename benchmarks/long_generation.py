"""Constant memory and constant speed over a 100,000-token generation with attention sinks.

Starts the real server on the bundled stories260K (512-token context) with StreamingLLM
attention sinks (4 sinks + a 256-token window), then runs one streamed completion of
`--max-tokens` tokens with `ignore_eos` (sampled at temperature 0.8 with a fixed seed, so the
text keeps changing) and reads the SSE stream. The request asks for `logprobs: 0` so that every
event lists its tokens, and tokens whose text is empty (BOS between stories) are counted too.
Every `--metrics-every` tokens a second connection reads `GET /metrics`.

Reported: KV blocks used over the run (min/max after the first 1,000 tokens, which must be
flat), the time per token over each 1,000-token window as the client sees it, its mean over
each 10,000-token segment (first against last), total tokens and tokens/s; a PNG of both
against tokens generated. Run from the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/long_generation.py \\
        --result-json benchmarks/results/long_generation.json

`--max-tokens 5000` makes a smoke run. The machine is shared, so compare ratios, not times.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time
from pathlib import Path

import httpx

from tests.server_process import ServerProcess

RESULTS_DIR = Path(__file__).parent / "results"


def read_metrics(client: httpx.Client, url: str) -> dict[str, float]:
    """Unlabelled-by-us samples of /metrics by name (our metrics carry only model_name)."""
    values = {}
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith("sinkserve_"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{", 1)[0]] = float(value)
    return values


class MetricsSampler(threading.Thread):
    """Reads /metrics on its own connection whenever the reader hands it a token count."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.requests: queue.Queue[int | None] = queue.Queue()
        # {"tokens", "kv_blocks_used", "sink_evictions"} while the request runs; "tokens" is the
        # count when the read was asked for (the read lags it by a few tokens at most).
        self.samples: list[dict] = []

    def run(self) -> None:
        with httpx.Client(timeout=30.0) as client:
            while (tokens := self.requests.get()) is not None:
                metrics = read_metrics(client, self.url)
                if not metrics["sinkserve_num_requests_running"]:
                    continue  # read after the request had finished
                self.samples.append({"tokens": tokens,
                                     "kv_blocks_used": metrics["sinkserve_kv_blocks_used"],
                                     "sink_evictions": metrics["sinkserve_sink_evictions_total"]})


def stream_completion(url: str, body: dict, window_tokens: int, sampler: MetricsSampler,
                      metrics_every: int) -> tuple[list[float], int, dict]:
    """Read one streamed completion; returns the arrival time of every `window_tokens`-th token
    (index 0: the request was sent), the tokens counted, and the final usage."""
    marks = [time.perf_counter()]
    num_tokens, usage = 0, {}
    with httpx.Client(timeout=None) as client, client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(f"stream error: {event['error']}")
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                before = num_tokens
                num_tokens += len(choice["logprobs"]["tokens"])
                if num_tokens // window_tokens > before // window_tokens:
                    marks.append(time.perf_counter())
                if num_tokens // metrics_every > before // metrics_every:
                    sampler.requests.put(num_tokens)
    return marks, num_tokens, usage


def plot(samples: list[dict], window_ms: list[float], window_tokens: int, segments: list[dict],
         title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_blocks, ax_time) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax_blocks.step([s["tokens"] for s in samples], [s["kv_blocks_used"] for s in samples], where="post")
    ax_blocks.set_ylabel("KV blocks used")
    ax_blocks.set_ylim(0, max(s["kv_blocks_used"] for s in samples) * 1.3)
    ax_blocks.grid(alpha=0.3)
    centers = [(i + 0.5) * window_tokens for i in range(len(window_ms))]
    ax_time.plot(centers, window_ms, ".", ms=3, label=f"per {window_tokens:,}-token window")
    for seg in segments:
        ax_time.hlines(seg["ms_per_token"], seg["start"], seg["end"], colors="C1", lw=2)
    ax_time.plot([], [], color="C1", lw=2, label="segment mean")
    ax_time.set_ylim(0, max(window_ms) * 1.15)
    ax_time.set_ylabel("ms / token (client)")
    ax_time.set_xlabel("tokens generated")
    ax_time.legend(loc="lower right")
    ax_time.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=100_000)
    parser.add_argument("--attention-sinks", type=int, default=4)
    parser.add_argument("--attention-window", type=int, default=256)
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--window-tokens", type=int, default=1000, help="timing resolution")
    parser.add_argument("--segment-tokens", type=int, default=10_000, help="tokens per reported segment")
    parser.add_argument("--metrics-every", type=int, default=100, help="read /metrics every this many tokens")
    parser.add_argument("--png", type=Path, default=RESULTS_DIR / "long_generation.png")
    parser.add_argument("--result-json", type=Path, default=None)
    args = parser.parse_args(argv)

    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": args.temperature, "top_p": 1.0,
            "seed": args.seed, "logprobs": 0}
    server_args = ["--attention-sinks", str(args.attention_sinks), "--attention-window", str(args.attention_window)]
    print(f"server: python -m server --threads 1 {' '.join(server_args)}")
    load_before = os.getloadavg()[0]
    with ServerProcess(*server_args) as server:
        sampler = MetricsSampler(server.url)
        sampler.start()
        start = time.perf_counter()
        marks, num_tokens, usage = stream_completion(server.url, body, args.window_tokens, sampler,
                                                     args.metrics_every)
        wall_s = time.perf_counter() - start
        sampler.requests.put(None)
        sampler.join()
    load_after = os.getloadavg()[0]

    if usage.get("completion_tokens") != num_tokens:
        raise RuntimeError(f"counted {num_tokens} tokens, usage says {usage.get('completion_tokens')}")
    window_ms = [1000 * (b - a) / args.window_tokens for a, b in zip(marks, marks[1:])]
    per_segment = args.segment_tokens // args.window_tokens
    segments = []
    for first in range(0, len(window_ms) - per_segment + 1, per_segment):
        chunk = window_ms[first:first + per_segment]
        segments.append({"start": first * args.window_tokens, "end": (first + per_segment) * args.window_tokens,
                         "ms_per_token": sum(chunk) / len(chunk)})
    steady = [s["kv_blocks_used"] for s in sampler.samples if s["tokens"] > 1000]

    print(f"\n{num_tokens:,} tokens in {wall_s:.1f} s: {num_tokens / wall_s:.1f} tokens/s "
          f"(load average {load_before:.2f} before, {load_after:.2f} after; 2 shared cores)")
    print(f"KV blocks used after the first 1,000 tokens: min {min(steady):.0f}, max {max(steady):.0f} "
          f"over {len(steady)} samples; sink evictions {sampler.samples[-1]['sink_evictions']:.0f}")
    print(f"{'segment':>17} {'ms/token':>9}")
    for seg in segments:
        print(f"{seg['start']:>8,}-{seg['end']:<8,} {seg['ms_per_token']:9.3f}")
    ratio = segments[-1]["ms_per_token"] / segments[0]["ms_per_token"] if segments else float("nan")
    print(f"last / first segment time per token: {ratio:.3f}")

    title = (f"stories260K, {args.attention_sinks} sinks + {args.attention_window}-token window, "
             f"{num_tokens:,} tokens")
    plot(sampler.samples, window_ms, args.window_tokens, segments, title, args.png)
    if args.result_json:
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "server_args": server_args, "total_tokens": num_tokens, "wall_s": wall_s,
                   "tokens_per_s": num_tokens / wall_s, "load_avg_1m": [load_before, load_after],
                   "kv_blocks_used_after_1000": {"min": min(steady), "max": max(steady)},
                   "segments": segments, "last_over_first": ratio, "window_ms_per_token": window_ms,
                   "metrics_samples": sampler.samples}
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.result_json}")


if __name__ == "__main__":
    main()
