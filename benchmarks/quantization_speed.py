"""Decode speed and weight memory of each `--quantization` on SmolLM2, in the engine, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/quantization_speed.py [--threads 1] [--tokens 48] [--trials 3]

One engine per method (SmolLM2's Q4_1 GGUF, one thread), each running a chat prompt's decode at
batch 1 and at batch 64 (`--tokens` tokens per sequence, greedy, ignore_eos); the median step of
each run, the runs interleaved across methods (`--trials` rounds), medians of the rounds. Also
the weights' bytes as served and the process's resident memory after load. `--context N`
lengthens the prompt to N tokens of War and Peace (from ../shared/data), where the KV cache's
dtype (the "int8 KV" methods) shows. Writes `benchmarks/results/quantization_speed.json` (or
`--result-json`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

import torch

from model.checkpoints.model_path import resolve_model_path
from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from server.chat_template import ChatTemplate

RESULTS = Path(__file__).parent / "results" / "quantization_speed.json"
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "war_and_peace.txt"
# name: (quantization, dtype, kv_cache_dtype)
METHODS = {"none (float32)": ("none", "float32", "auto"), "none (bfloat16)": ("none", "bfloat16", "auto"),
           "auto": ("auto", "auto", "auto"), "int4-weight": ("int4-weight", "auto", "auto"),
           "int8-weight": ("int8-weight", "auto", "auto"), "int8": ("int8", "auto", "auto"),
           "auto, int8 KV": ("auto", "auto", "int8"), "none (float32), int8 KV": ("none", "float32", "int8")}
DEFAULT_METHODS = ["none (float32)", "none (bfloat16)", "auto", "int4-weight", "int8-weight", "int8"]


def rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def step_seconds(engine: Engine, prompt: list[int], batch: int, tokens: int) -> float:
    """The median decode step of `batch` copies of a prompt (the prefill step left out)."""
    stamp = time.time()
    for i in range(batch):
        engine.add_request(f"bench-{stamp}-{i}", prompt, SamplingParams(max_tokens=tokens, ignore_eos=True,
                                                                         temperature=0))
    steps, first = [], True
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        if not first:
            steps.append(time.perf_counter() - start)
        first = False
    return statistics.median(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--context", type=int, default=0,
                        help="lengthen the prompt to this many tokens with text (0: the bare chat prompt)")
    parser.add_argument("--result-json", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_path("smollm2")
    engines, served = {}, {}
    for name in args.methods:
        method, dtype, kv_cache_dtype = METHODS[name]
        before = rss_mb()
        engines[name] = Engine(path, device="cpu", dtype=dtype, quantization=method, kv_cache_dtype=kv_cache_dtype,
                               num_kv_blocks=64 * (args.context + args.tokens + 64) // 16 + 64,
                               max_model_len=max(2048, args.context + args.tokens + 64))
        served[name] = {**engines[name].served_as(), "rss_added_mb": rss_mb() - before}
    tokenizer = engines[args.methods[0]].tokenizer
    content = "Write a short story about the sea."
    if args.context:  # a long document before the ask, to make attention's reads count
        content = TEXT.read_text()[:8 * args.context] + "\n\n" + content
    prompt = ChatTemplate(tokenizer).encode([{"role": "user", "content": content}])
    if args.context:
        prompt = prompt[-args.context:]
    for engine in engines.values():
        step_seconds(engine, prompt, 2, 4)  # warm-up
    runs = {name: {1: [], 64: []} for name in engines}
    for _ in range(args.trials):
        for batch in (1, 64):
            for name, engine in engines.items():
                runs[name][batch].append(step_seconds(engine, prompt, batch, args.tokens))
    results = {}
    base = args.methods[0]
    for name in engines:
        one, many = (statistics.median(runs[name][b]) for b in (1, 64))
        results[name] = {"served": served[name]["quantization"], "dtype": served[name]["dtype"],
                         "kv_cache_dtype": METHODS[name][2], "context": len(prompt),
                         "weight_mb": served[name]["weight_bytes"] / 1e6, "rss_added_mb": served[name]["rss_added_mb"],
                         "tok_s_1": 1 / one, "tok_s_64": 64 / many}
    for name, r in results.items():
        print(f"{name:16} {r['dtype']:9} weights {r['weight_mb']:6.0f} MB (RSS +{r['rss_added_mb']:5.0f} MB)  "
              f"1 stream {r['tok_s_1']:6.1f} tok/s ({r['tok_s_1'] / results[base]['tok_s_1']:4.2f}x)  "
              f"64 streams {r['tok_s_64']:6.0f} tok/s ({r['tok_s_64'] / results[base]['tok_s_64']:4.2f}x)")
    args.result_json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
