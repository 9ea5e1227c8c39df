"""StreamingLLM's headline on SmolLM2-135M-Instruct: attention sinks keep a window model fluent far
past its 8,192-token context; a window without sinks does not; dense attention collapses.

The paper's experiment (Xiao et al., ICLR 2024, Figure 3 and Table 2), run through the real
server: the stream (War and Peace, `--num-tokens` tokens, default 65,536 = 8x the context) is
scored in one `/v1/completions` request per mode (`echo: true, logprobs: 0, max_tokens: 0`). The
requests of all modes are sent at once, so the server batches them as it batches any traffic.

- `sinks-C`: 4 sinks + a window of C-4 tokens (a cache of C), for C in `--caches`;
- `window-C`: no sinks, a window of C tokens (the same cache);
- `dense`: the first `--dense-tokens` tokens as one dense request (no window), past the context;
- `sinks=S`: S sinks + a window of `--ablation-cache` - S tokens, over the first
  `--ablation-tokens` tokens (the paper's Table 2);
- `oracle-C`: the sliding window with recomputation, the upper bound a cache of C can reach:
  a token is scored by a dense request over the tokens before it (O(T*C^2), so it is sampled).
  Each of `--oracle-blocks` evenly spaced blocks of C/16 tokens is one dense request over the C
  tokens before the block and the block: its tokens are scored with C to C + C/16 - 1 tokens of
  context, at least the cache's worth, so the oracle is if anything a little better off.

Each run's logprobs go to `--out-dir` as soon as the run finishes, and runs already there are
skipped, so an interrupted experiment resumes (the raw logprobs are not kept in the repository;
the numbers are in `benchmarks/results/streaming_sinks.json`). Then it prints the tables, writes the plot of
log-perplexity against position, and measures the attention mass per layer (transformers, eager
attention, on the first 1,024 tokens): how much of each query's attention lands on token 0.

    PYTHONPATH=. .venv/bin/python benchmarks/streaming_sinks.py            # all of it, hours on 1 CPU
    PYTHONPATH=. .venv/bin/python benchmarks/streaming_sinks.py --report   # tables and plot only
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx

from benchmarks.streaming_perplexity import score
from model.checkpoints.model_path import resolve_model_path
from model.tokenizers.tokenizer_loader import load_tokenizer
from tests.server_process import ServerProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "war_and_peace.txt"
CONTEXT = 8192  # SmolLM2-135M's trained context
NUM_SINKS = 4


def token_stream(model: str, path: Path, num_tokens: int) -> list[int]:
    """The book's text, tokenized as one document (the tokenizer's own BOS rule), cut to `num_tokens`."""
    tokenizer = load_tokenizer(resolve_model_path(model))
    text = path.read_text(encoding="utf-8")
    # Tokenize a prefix only: roughly 4 characters a token, with room to spare.
    tokens = tokenizer.encode(text[:num_tokens * 8])
    if len(tokens) < num_tokens:
        raise ValueError(f"{path} has fewer than {num_tokens} tokens")
    return tokens[:num_tokens]


def perplexity(logprobs: list[float | None], start: int = 0, end: int | None = None) -> float:
    values = [lp for lp in logprobs[start:end] if lp is not None]
    return math.exp(-sum(values) / len(values)) if values else math.nan


def oracle_block_starts(num_tokens: int, cache: int, blocks: int) -> list[int]:
    """`blocks` evenly spaced starts of C/16-token blocks, each with a full cache of tokens before it."""
    span = num_tokens - cache - cache // 16
    return [cache + (i * span) // blocks for i in range(blocks)]


def plan_runs(args) -> dict[str, dict]:
    """Run name -> what to score and how."""
    runs: dict[str, dict] = {}
    for cache in args.caches:
        runs[f"sinks-{cache}"] = {"tokens": args.num_tokens, "policy": {
            "attention_sinks": NUM_SINKS, "attention_window": cache - NUM_SINKS}}
        runs[f"window-{cache}"] = {"tokens": args.num_tokens, "policy": {
            "attention_sinks": 0, "attention_window": cache}}
    runs["dense"] = {"tokens": args.dense_tokens, "policy": {"attention_window": 0}}
    for sinks in args.sink_counts:
        if sinks in (0, NUM_SINKS) and args.ablation_cache in args.caches and args.ablation_tokens <= args.num_tokens:
            continue  # the full-length run of that cache has it
        runs[f"sinks={sinks}"] = {"tokens": args.ablation_tokens, "policy": {
            "attention_sinks": sinks, "attention_window": args.ablation_cache - sinks}}
    for cache, blocks in zip(args.caches, args.oracle_blocks):
        runs[f"oracle-{cache}"] = {"oracle": oracle_block_starts(args.num_tokens, cache, blocks), "cache": cache}
    if args.only:
        runs = {name: run for name, run in runs.items() if name in args.only}
    return runs


def ablation_logprobs(results: dict[str, list], args, sinks: int) -> list:
    name = f"sinks={sinks}"
    if name not in results and sinks in (0, NUM_SINKS):  # taken from the full-length run
        name = f"{'sinks' if sinks else 'window'}-{args.ablation_cache}"
    return results[name][:args.ablation_tokens]


def run_one(client: httpx.Client, url: str, stream: list[int], run: dict) -> list:
    if "oracle" not in run:
        return score(client, url, stream[:run["tokens"]], **run["policy"])
    cache = run["cache"]
    block = cache // 16
    pairs = []
    for start in run["oracle"]:  # one dense request: the cache's worth of tokens, then the block scored
        logprobs = score(client, url, stream[start - cache:start + block], attention_window=0)[-block:]
        pairs += [[start + i, lp] for i, lp in enumerate(logprobs)]
    return pairs


def run_all(args, stream: list[int], runs: dict[str, dict]) -> None:
    todo = {name: run for name, run in runs.items() if not (args.out_dir / f"{name}.json").exists()}
    if not todo:
        return
    # Windowed requests may run past --max-model-len; dense ones (and the oracle's) may not.
    dense = [run["tokens"] for run in todo.values() if run.get("policy", {}).get("attention_window") == 0]
    longest = max(dense + [CONTEXT]) + 16
    blocks = sum(-(-tokens // 16) + 1 for tokens in dense)
    blocks += sum(16 * (run["cache"] + run["cache"] // 16) // 16 // 4 + 8 for run in todo.values() if "oracle" in run)
    blocks += sum(run["policy"]["attention_window"] // 16 + 3 for run in todo.values()
                  if run.get("policy", {}).get("attention_window"))
    blocks = max(blocks, longest // 16 + 64)
    server_args = ["--threads", str(args.threads), "--model", args.model, "--max-model-len", str(max(longest, CONTEXT)),
                   "--num-kv-blocks", str(blocks), "--no-prefix-caching", "--max-num-seqs", "64"]
    print(f"server: python -m server {' '.join(server_args)}", flush=True)
    print(f"runs: {', '.join(todo)}", flush=True)
    with ServerProcess(*server_args, startup_timeout=600) as server, httpx.Client(timeout=None) as client:
        # Oracle runs are split so that a few of their requests run beside the long ones.
        work = []
        for name, run in todo.items():
            if "oracle" in run:
                positions = run["oracle"]
                parts = 4
                for i in range(parts):
                    work.append((name, i, {**run, "oracle": positions[i::parts]}))
            else:
                work.append((name, 0, run))
        parts_done: dict[str, list] = {}
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(work)) as pool:
            futures = {pool.submit(run_one, client, server.url, stream, run): (name, i) for name, i, run in work}
            for future in as_completed(futures):
                name, _ = futures[future]
                parts_done.setdefault(name, []).append(future.result())
                expected = sum(1 for n, _, _ in work if n == name)
                if len(parts_done[name]) < expected:
                    continue
                if "oracle" in todo[name]:
                    result = sorted(pair for part in parts_done[name] for pair in part)
                else:
                    result = parts_done[name][0]
                args.out_dir.mkdir(parents=True, exist_ok=True)
                (args.out_dir / f"{name}.json").write_text(json.dumps(result))
                print(f"{time.perf_counter() - started:8.0f} s  {name} done", flush=True)


def attention_mass(model: str, stream: list[int], num_tokens: int = 1024, from_position: int = 64) -> dict:
    """Per layer, the mean attention probability (over heads and queries at positions >=
    `from_position`) on token 0 and on the first 4 tokens, through transformers (eager)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, attn_implementation="eager",
                                                     torch_dtype=torch.float32)
    with torch.no_grad():
        out = reference(torch.tensor([stream[:num_tokens]]), output_attentions=True)
    # each: [1, heads, queries, keys]
    return {"token_0": [a[0, :, from_position:, 0].mean().item() for a in out.attentions],
            "first_4": [a[0, :, from_position:, :4].sum(-1).mean().item() for a in out.attentions],
            "uniform_token_0": sum(1 / (q + 1) for q in range(from_position, num_tokens))
            / (num_tokens - from_position)}


def plot(results: dict[str, list], args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    bucket = args.bucket
    styles = {"sinks": "-", "window": "--", "dense": ":"}
    for name, logprobs in results.items():
        if name.startswith(("oracle", "sinks=")):
            continue
        starts = range(0, len(logprobs) - bucket + 1, bucket)
        ax.plot([s + bucket / 2 for s in starts], [math.log(perplexity(logprobs, s, s + bucket)) for s in starts],
                styles[name.split("-")[0]], label=name, lw=1.1)
    for cache in args.caches:
        name = f"oracle-{cache}"
        if name in results:
            pairs = results[name]
            ax.axhline(-sum(lp for _, lp in pairs) / len(pairs), lw=0.8, ls="-.",
                       label=f"{name} (mean of {len(pairs)} sampled tokens)", color=f"C{args.caches.index(cache)}")
    ax.axvline(CONTEXT, color="black", ls=":", lw=1)
    ax.set_ylim(top=9)
    ax.set_xlabel("position in the stream (tokens)")
    ax.set_ylabel(f"log-perplexity per {bucket}-token bucket")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    ax.set_title(f"SmolLM2-135M-Instruct on War and Peace ({args.num_tokens:,} tokens, context {CONTEXT:,})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def report(args, stream: list[int], runs: dict[str, dict]) -> dict:
    results = {name: json.loads((args.out_dir / f"{name}.json").read_text())
               for name in runs if (args.out_dir / f"{name}.json").exists()}
    table: dict[str, dict] = {}
    print(f"\n{args.num_tokens:,} tokens of War and Peace, SmolLM2-135M-Instruct (context {CONTEXT:,})")
    print(f"{'run':<13}{'tokens':>8}{'ppl':>9}{'first 8k':>10}{'after 8k':>10}{'last 8k':>9}")
    for name, logprobs in results.items():
        if name.startswith(("oracle", "sinks=")):
            continue
        row = {"tokens": len(logprobs), "ppl": perplexity(logprobs), "ppl_first_8k": perplexity(logprobs, 0, CONTEXT),
               "ppl_after_8k": perplexity(logprobs, CONTEXT), "ppl_last_8k": perplexity(logprobs, -CONTEXT)}
        table[name] = row
        print(f"{name:<13}{row['tokens']:>8}{row['ppl']:9.2f}{row['ppl_first_8k']:10.2f}{row['ppl_after_8k']:10.2f}"
              f"{row['ppl_last_8k']:9.2f}")

    oracle_rows: dict[str, dict] = {}
    print("\nat the oracle's sampled tokens (the same tokens for every column):")
    print(f"{'cache':>6}{'tokens':>9}{'oracle':>9}{'sinks':>9}{'window':>9}{'sinks/oracle':>14}")
    for cache in args.caches:
        if f"oracle-{cache}" not in results:
            continue
        pairs = results[f"oracle-{cache}"]
        row = {"samples": len(pairs), "oracle": math.exp(-sum(lp for _, lp in pairs) / len(pairs))}
        for kind in ("sinks", "window"):
            if f"{kind}-{cache}" in results:
                logprobs = results[f"{kind}-{cache}"]
                row[kind] = math.exp(-sum(logprobs[t] for t, _ in pairs) / len(pairs))
        oracle_rows[str(cache)] = row
        print(f"{cache:>6}{row['samples']:>9}{row['oracle']:9.2f}{row.get('sinks', math.nan):9.2f}"
              f"{row.get('window', math.nan):9.2f}{row.get('sinks', math.nan) / row['oracle']:14.3f}")

    ablation: dict[str, float] = {}
    print(f"\nsinks at a cache of {args.ablation_cache} (window = cache - sinks), "
          f"first {args.ablation_tokens:,} tokens:")
    for sinks in args.sink_counts:
        try:
            ablation[str(sinks)] = perplexity(ablation_logprobs(results, args, sinks))
        except KeyError:
            continue
        print(f"  {sinks} sinks: {ablation[str(sinks)]:.2f}")

    mass_path = args.out_dir / "attention_mass.json"
    if not mass_path.exists():
        mass_path.write_text(json.dumps(attention_mass(args.model, stream)))
    mass = json.loads(mass_path.read_text())
    print("\nattention mass on token 0 (queries at positions 64-1023), per layer: "
          + ", ".join(f"{m:.2f}" for m in mass["token_0"]) + f"  (uniform: {mass['uniform_token_0']:.4f})")
    plot(results, args, args.png)
    return {"runs": table, "oracle": oracle_rows, "sinks_ablation": ablation, "attention_mass": mass}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--num-tokens", type=int, default=65_536)
    parser.add_argument("--dense-tokens", type=int, default=20_480)
    parser.add_argument("--caches", type=ints, default=[256, 1024, 2048])
    parser.add_argument("--oracle-blocks", type=ints, default=[240, 60, 30], help="per cache size")
    parser.add_argument("--sink-counts", type=ints, default=[0, 1, 2, 4, 8])
    parser.add_argument("--ablation-cache", type=int, default=256)
    parser.add_argument("--ablation-tokens", type=int, default=32_768)
    parser.add_argument("--bucket", type=int, default=1024, help="tokens per point in the plot")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR / "streaming_sinks")
    parser.add_argument("--png", type=Path, default=RESULTS_DIR / "streaming_sinks.png")
    parser.add_argument("--only", type=lambda text: text.split(","), default=None,
                        help="run only these (comma-separated run names); the report reads every run in --out-dir")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--report", action="store_true", help="only the tables and plot from --out-dir")
    args = parser.parse_args(argv)

    stream = token_stream(args.model, args.data, max(args.num_tokens, args.dense_tokens, args.ablation_tokens))
    if not args.report:
        run_all(args, stream, plan_runs(args))
    args.only = None
    summary = report(args, stream, plan_runs(args))
    (args.out_dir / "summary.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **summary}, indent=1))
    print(f"wrote {args.out_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
