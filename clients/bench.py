"""Load-test a running server over HTTP, in the spirit of vLLM's benchmark_serving.

    python -m clients.bench --url http://127.0.0.1:8000 --num-prompts 200 --input-len 64 \\
        --output-len 64 --ignore-eos --max-concurrency 32 --result-json out.json --plot out.png

Prompts are random or read from --dataset (one prompt per line, or JSON lines with a "prompt"
field). A random prompt is --input-len token ids drawn from the tokens of a sample text (through
the server's /tokenize): sent as a token-id prompt to /v1/completions, so its length is exact,
or detokenized to text for chat. --range-ratio R draws every input and output length uniformly
from [L(1-R), L(1+R)]. Requests arrive as a Poisson process of --request-rate per second (inf:
all at once), at most --max-concurrency in flight.

Every request streams. TTFT is the time from sending a request to the first streamed event that
carries generated text: the chat role-only chunk and other empty chunks do not count. A token
event is a chunk with generated text, or the final chunk (its token may have no text, as EOS has
none). Every metric is defined at the end of --help and in the --result-json file. Output (and
prompt) tokens come from the usage that `stream_options.include_usage` adds; without it, from
counting token events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import random
import textwrap
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import httpx
import numpy as np
from tqdm import tqdm

from clients.client import DEFAULT_URL, APIError, AsyncClient

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SAMPLE_TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play in the park with her big dog, "
    "Max. One day they found a shiny red ball under a tree. \"Look, Max!\" she said, and they laughed and "
    "ran until the moon came up. Then everyone went home to sleep, tired but happy."
)
METRICS = ("ttft", "tpot", "itl", "e2e")
DEFINITIONS = {
    "ttft": "time from sending the request to the first streamed event that carries generated text "
            "(not the chat role-only chunk); for an output with no text at all, to the final chunk",
    "tpot": "(E2E - TTFT) / (output tokens - 1)",
    "itl": "every gap between token events (chunks with generated text, and the final chunk)",
    "e2e": "time from sending the request to data: [DONE]",
}
SECRET_ARGS = ("api_key",)  # used, never written to the results
NUM_ERRORS_SHOWN = 5


@dataclass(frozen=True)
class RequestSpec:
    prompt: str | list[int]
    prompt_len: int  # tokens: exact for token-id prompts, the target for random text
    output_len: int


@dataclass
class RequestRecord:
    prompt_tokens: int
    output_tokens: int = 0
    success: bool = False
    error: str = ""
    start: float = 0.0  # seconds since the benchmark started
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    metrics = "\n".join(textwrap.fill(f"{name.upper()}: {text}", 100, initial_indent="  ", subsequent_indent="    ")
                        for name, text in DEFINITIONS.items())
    p = argparse.ArgumentParser(prog="python -m clients.bench", description=__doc__, epilog=f"metrics:\n{metrics}",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=DEFAULT_URL, help="the server (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="its API key (default: none)")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="(default: %(default)s)")
    p.add_argument("--num-prompts", type=int, default=100, help="requests in all (default: %(default)s)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens, about (default: %(default)s)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of each request (default: %(default)s)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths drawn from [L(1-R), L(1+R)] (default: %(default)s)")
    p.add_argument("--dataset", default=None,
                   help="prompts file: text lines or JSON lines with \"prompt\" (default: random tokens)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s, Poisson; inf: all at once (default: %(default)s)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    p.add_argument("--ignore-eos", action="store_true", help="generate output-len tokens whatever the model says")
    p.add_argument("--temperature", type=float, default=0.0, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="of the prompts and arrivals (default: %(default)s)")
    p.add_argument("--result-json", default=None, help="write the results here (default: not written)")
    p.add_argument("--plot", default=None,
                   help="PNG of latency distributions and throughput, needs matplotlib (default: none)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not 0 <= args.range_ratio < 1:
        p.error("--range-ratio must be in [0, 1)")
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        p.error("--num-prompts, --input-len and --output-len must be at least 1")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib: pip install 'sinkserve[bench]'")
    return args


def draw_len(rng: random.Random, length: int, ratio: float) -> int:
    return rng.randint(max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio))))


def read_dataset(path: str) -> list[str]:
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if lines and all(line.lstrip().startswith("{") for line in lines):
        return [json.loads(line)["prompt"] for line in lines]
    return lines


async def build_requests(client: AsyncClient, args: argparse.Namespace, rng: random.Random) -> list[RequestSpec]:
    output_lens = [draw_len(rng, args.output_len, args.range_ratio) for _ in range(args.num_prompts)]
    if args.dataset:
        texts = read_dataset(args.dataset)
        rng.shuffle(texts)
        texts = [texts[i % len(texts)] for i in range(args.num_prompts)]
        counts = await asyncio.gather(*(client.tokenize(prompt=t) for t in texts))
        return [RequestSpec(t, c["count"], o) for t, c, o in zip(texts, counts, output_lens)]
    pool = sorted(set((await client.tokenize(prompt=SAMPLE_TEXT, add_special_tokens=False))["tokens"]))
    prompts = [rng.choices(pool, k=draw_len(rng, args.input_len, args.range_ratio)) for _ in output_lens]
    if args.endpoint == "chat":
        texts = await asyncio.gather(*(client.detokenize(tokens=ids) for ids in prompts))
        return [RequestSpec(t["prompt"], len(ids), o) for t, ids, o in zip(texts, prompts, output_lens)]
    return [RequestSpec(ids, len(ids), o) for ids, o in zip(prompts, output_lens)]


def request_body(spec: RequestSpec, args: argparse.Namespace, model: str, stream: bool = True) -> dict:
    body = {"model": model, "temperature": args.temperature, **({"ignore_eos": True} if args.ignore_eos else {})}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if args.endpoint == "chat":
        messages = [{"role": "user", "content": spec.prompt}]
        return {**body, "messages": messages, "max_completion_tokens": spec.output_len}
    return {**body, "prompt": spec.prompt, "max_tokens": spec.output_len}


async def send(client: AsyncClient, spec: RequestSpec, args: argparse.Namespace, model: str,
               t0: float) -> RequestRecord:
    stream = client.stream_chat if args.endpoint == "chat" else client.stream_completions
    record = RequestRecord(prompt_tokens=spec.prompt_len)
    token_times, usage = [], None
    start = time.perf_counter()
    record.start = start - t0
    try:
        async for event in stream(**request_body(spec, args, model)):
            now = time.perf_counter()
            usage = event.get("usage") or usage
            for choice in event.get("choices") or ():
                text = choice.get("delta", {}).get("content") if args.endpoint == "chat" else choice.get("text")
                if text or choice.get("finish_reason"):  # a token event: the first one is the TTFT
                    token_times.append(now)
                    break
    except Exception as exc:  # noqa: BLE001  (any failure is one failed request, not a crashed run)
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    end = time.perf_counter()
    if not token_times:
        record.error = "the stream ended without a token"
        return record
    record.success, record.e2e, record.ttft = True, end - start, token_times[0] - start
    record.itl = [b - a for a, b in zip(token_times, token_times[1:])]
    record.output_tokens = usage["completion_tokens"] if usage else len(token_times)
    record.prompt_tokens = usage["prompt_tokens"] if usage else spec.prompt_len
    return record


async def run(args: argparse.Namespace) -> tuple[list[RequestRecord], float, str]:
    rng = random.Random(args.seed)
    async with AsyncClient(args.url, api_key=args.api_key, max_connections=args.max_concurrency) as client:
        model = args.model or (await client.models())[0]["id"]
        specs = await build_requests(client, args, rng)
        # The first request once, unstreamed, so a wrong model, key or length fails here, not N times.
        probe = request_body(specs[0], args, model, stream=False)
        await (client.chat if args.endpoint == "chat" else client.completions)(**probe)
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else contextlib.nullcontext()
        progress = tqdm(total=len(specs), disable=args.disable_tqdm, desc="requests")
        t0 = time.perf_counter()

        async def limited(spec: RequestSpec) -> RequestRecord:
            async with limit:
                record = await send(client, spec, args, model, t0)
            progress.update()
            return record

        tasks = []
        for i, spec in enumerate(specs):
            if i and math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
            tasks.append(asyncio.create_task(limited(spec)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        progress.close()
    return records, duration, model


def distribution_ms(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ms = np.asarray(values) * 1000
    return {"mean": float(ms.mean()), "median": float(np.median(ms)),
            "p90": float(np.percentile(ms, 90)), "p99": float(np.percentile(ms, 99))}


def metric_values(records: list[RequestRecord]) -> dict[str, list[float]]:
    done = [r for r in records if r.success]
    return {"ttft": [r.ttft for r in done], "tpot": [r.tpot for r in done if r.output_tokens > 1],
            "itl": [gap for r in done for gap in r.itl], "e2e": [r.e2e for r in done]}


def summarize(records: list[RequestRecord], duration: float) -> dict:
    done = [r for r in records if r.success]
    input_tokens, output_tokens = sum(r.prompt_tokens for r in done), sum(r.output_tokens for r in done)
    summary = {
        "completed": len(done), "failed": len(records) - len(done), "duration": duration,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration, "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "errors": list(dict.fromkeys(r.error for r in records if not r.success))[:NUM_ERRORS_SHOWN],
    }
    for name, values in metric_values(records).items():
        summary.update({f"{stat}_{name}_ms": v for stat, v in distribution_ms(values).items()})
    return summary


TABLE = (("Successful requests:", "completed"), ("Failed requests:", "failed"),
         ("Benchmark duration (s):", "duration"), ("Total input tokens:", "total_input_tokens"),
         ("Total generated tokens:", "total_output_tokens"), ("Request throughput (req/s):", "request_throughput"),
         ("Output token throughput (tok/s):", "output_throughput"),
         ("Total token throughput (tok/s):", "total_token_throughput"))
TITLES = ("Time to First Token", "Time per Output Token (excl. 1st token)", "Inter-token Latency",
          "End-to-end Latency")


def print_table(summary: dict) -> None:
    def row(label: str, value) -> None:
        text = "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{label:<44}{text:>16}")

    print(f"{' Serving Benchmark Result ':=^60}")
    for label, key in TABLE:
        row(label, summary[key])
    for name, title in zip(METRICS, TITLES):
        print(f"{' ' + title + ' ':-^60}")
        for stat, shown in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{shown} {name.upper()} (ms):", summary[f"{stat}_{name}_ms"])
    print("=" * 60)
    for error in summary["errors"]:
        print(f"error: {error}")


def run_title(args: argparse.Namespace, model: str) -> str:
    """What was run, in one line: the model, the endpoint, the load and the lengths."""
    load = f"{args.request_rate:g} req/s" if math.isfinite(args.request_rate) else "all at once"
    concurrency = f"at most {args.max_concurrency} in flight" if args.max_concurrency else "no concurrency cap"
    spread = f" (±{args.range_ratio:.0%})" if args.range_ratio else ""
    return (f"{model} · /v1/{'chat/completions' if args.endpoint == 'chat' else 'completions'} · {load}, "
            f"{concurrency} · {args.input_len} prompt / {args.output_len} output tokens{spread}")


def plot(records: list[RequestRecord], summary: dict, path: str, title: str = "") -> Figure:
    """Save a PNG of the latency distributions and of throughput over time, under `title` (what
    was run: `run_title`); return the figure."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    values = metric_values(records)
    fig = Figure(figsize=(16, 9), layout="constrained")
    axes = fig.subplot_mosaic([["ttft", "tpot", "itl"], ["e2e", "tput", "tput"]])
    fig.suptitle((f"{title}\n" if title else "")
                 + f"{summary['completed']} requests ({summary['failed']} failed) in {summary['duration']:.1f} s: "
                 f"{summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.0f} output tok/s")
    legend = None
    for name in METRICS:
        ax, ms = axes[name], np.sort(np.asarray(values[name]) * 1000)
        ax.set_title(f"{name.upper()} (n={len(ms)})")
        ax.set_xlabel("ms")
        if not len(ms):
            continue
        # A few outliers would squeeze the rest into a sliver of the axis: draw values up to the p99.
        p99 = summary[f"p99_{name}_ms"]
        shown = ms[ms <= p99]
        if beyond := len(ms) - len(shown):
            ax.set_xlabel(f"ms (clipped at p99 = {p99:.2f} ms; {beyond} beyond)")
        ax.hist(shown, bins=50, color="tab:blue", alpha=0.7)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no half requests on a small run
        ax.set_ylabel("gaps" if name == "itl" else "requests", color="tab:blue")
        cdf = ax.twinx()
        cdf.plot(shown, np.arange(1, len(shown) + 1) / len(ms), color="tab:red", drawstyle="steps-post")
        cdf.set_ylim(0, 1.02)
        cdf.set_ylabel("CDF", color="tab:red")
        for stat, style in (("median", "--"), ("p99", ":")):
            ax.axvline(summary[f"{stat}_{name}_ms"], color="black", linestyle=style, label=stat)
        legend = ax.get_legend_handles_labels()
    # Output tokens per 1 s bin: each request's tokens spread evenly over its token events.
    times, weights = [], []
    for r in (r for r in records if r.success):
        events = r.start + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)])
        times.extend(events)
        weights.extend([r.output_tokens / len(events)] * len(events))
    ax = axes["tput"]
    ax.set_title("output token throughput over time")
    if times:
        counts, edges = np.histogram(times, bins=np.arange(0, math.ceil(summary["duration"]) + 1), weights=weights)
        widths = np.minimum(edges[1:], summary["duration"]) - edges[:-1]  # the last bin is partial
        ax.bar(edges[:-1], counts / widths, width=1.0, align="edge", color="tab:green", edgecolor="white")
    ax.set_xlabel("seconds since start (1 s bins)")
    ax.set_ylabel("tokens/s")
    if legend:  # one legend for all the panels, above them, clear of the data
        fig.legend(*legend, loc="outside upper right", ncols=2)
    fig.savefig(path, dpi=100)
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        records, duration, model = asyncio.run(run(args))
    except httpx.TransportError as exc:
        raise SystemExit(f"benchmark setup failed: cannot reach the server at {args.url}: {exc} "
                         "(is it running there? --url sets the address)") from exc
    except (APIError, httpx.HTTPError) as exc:
        raise SystemExit(f"benchmark setup failed at {args.url}: {type(exc).__name__}: {exc}") from exc
    summary = summarize(records, duration)
    print_table(summary)
    if args.result_json:
        config = {key: value for key, value in vars(args).items() if key not in SECRET_ARGS}
        config.update(model=model, request_rate=args.request_rate if math.isfinite(args.request_rate) else "inf")
        with open(args.result_json, "w") as f:
            json.dump({"config": config, "definitions": DEFINITIONS, **summary,
                       "requests": [asdict(r) for r in records]}, f, indent=1)
    if args.plot:
        plot(records, summary, args.plot, run_title(args, model))
    return summary


if __name__ == "__main__":
    main()
