"""StreamingLLM's headline on stories260K: perplexity over a token stream far past the context.

Builds a stream of `--num-tokens` tokens from TinyStories (each story starts with BOS, as in the
model's training data), starts the real server on the bundled stories260K (512-token context)
with `--max-model-len` as long as the stream, and scores the stream through
`/v1/completions` (`echo: true, logprobs: 0, max_tokens: 0`) in four modes:

- `dense-in-context` (the reference): the stream in 512-token requests that overlap by half;
  every token is scored with 256 to 511 tokens of context, never past the trained length;
- `dense`: the whole stream as one dense request (`attention_window: 0`), positions past 512;
- `sliding`: one request, no sinks and a 512-token window (`attention_sinks: 0`);
- `sinks`: one request, 4 sinks and a 508-token window (the same 512-token cache).

Prints a table (perplexity over the stream, within the first 512 tokens, after them), writes a
PNG of perplexity against position (per `--bucket`-token bucket) and, with `--result-json`, the
numbers. Then it measures the attention mass that queries past position 64 put on the first 4
tokens, per layer (through transformers, eager attention), to show whether the model has an
attention sink at all. Run from the repository root (needs the `bench` extra):

    PYTHONPATH=. .venv/bin/python benchmarks/streaming_perplexity.py \\
        --result-json benchmarks/results/streaming_perplexity.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import httpx

from model.tokenizers.tokenizer_loader import load_tokenizer
from tests.server_process import ServerProcess

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).parent / "results"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "tinystories_2MiB.txt"
BUNDLED = REPO_ROOT / "model" / "bundled" / "stories260K"
CONTEXT = 512
MODES = ("dense-in-context", "dense", "sliding", "sinks")


def token_stream(path: Path, num_tokens: int, bos_per_story: bool = True) -> list[int]:
    """BOS + story, story after story, until `num_tokens` tokens; or, with `bos_per_story`
    False, one BOS and the stories joined by newlines (one document, like a book)."""
    tokenizer = load_tokenizer(BUNDLED)
    stream: list[int] = []
    with open(path, encoding="utf-8") as f:
        story: list[str] = []
        for line in f:
            if line.strip() != "<|endoftext|>":
                story.append(line)
                continue
            text = "".join(story).strip()
            if bos_per_story or not stream:
                stream += tokenizer.encode(text, add_bos=True)
            else:
                stream += tokenizer.encode("\n" + text, add_bos=False)
            story = []
            if len(stream) >= num_tokens:
                return stream[:num_tokens]
    raise ValueError(f"{path} has fewer than {num_tokens} tokens")


def score(client: httpx.Client, url: str, tokens: list[int], **policy) -> list[float | None]:
    body = {"prompt": tokens, "max_tokens": 0, "echo": True, "logprobs": 0, **policy}
    response = client.post(f"{url}/v1/completions", json=body)
    response.raise_for_status()
    return response.json()["choices"][0]["logprobs"]["token_logprobs"]


def score_in_context(client: httpx.Client, url: str, stream: list[int]) -> list[float | None]:
    """Dense, never past the context: 512-token requests with a stride of 256."""
    stride = CONTEXT // 2
    logprobs: list[float | None] = score(client, url, stream[:CONTEXT], attention_window=0)
    for start in range(stride, len(stream) - CONTEXT + stride, stride):
        window = stream[start:start + CONTEXT]
        scored = score(client, url, window, attention_window=0)
        logprobs += scored[CONTEXT - stride:][:len(stream) - len(logprobs)]
    assert len(logprobs) == len(stream)
    return logprobs


def perplexity(logprobs: list[float | None], start: int = 0, end: int | None = None) -> float:
    values = [lp for lp in logprobs[start:end] if lp is not None]
    return math.exp(-sum(values) / len(values))


def attention_mass_on_first_tokens(stream: list[int], num_first: int = 4, from_position: int = 64) -> list[float]:
    """Per layer: mean attention probability (over heads and queries at positions >= from_position)
    on the first `num_first` keys, for the first 512 tokens of the stream."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(BUNDLED, attn_implementation="eager", torch_dtype=torch.float32)
    with torch.no_grad():
        out = model(torch.tensor([stream[:CONTEXT]]), output_attentions=True)
    # each: [1, heads, queries, keys]
    return [a[0, :, from_position:, :num_first].sum(-1).mean().item() for a in out.attentions]


def plot(per_mode: dict[str, list[float | None]], bucket: int, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for mode, logprobs in per_mode.items():
        starts = range(0, len(logprobs), bucket)
        ax.plot([s + bucket / 2 for s in starts], [perplexity(logprobs, s, s + bucket) for s in starts],
                label=mode, lw=1.2)
    ax.axvline(CONTEXT, color="grey", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("position in the stream (tokens)")
    ax.set_ylabel(f"perplexity per {bucket}-token bucket")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--num-tokens", type=int, default=20_000)
    parser.add_argument("--one-document", action="store_true",
                        help="one BOS, stories joined by newlines (default: BOS before every story)")
    parser.add_argument("--bucket", type=int, default=500, help="tokens per point in the plot")
    parser.add_argument("--png", type=Path, default=RESULTS_DIR / "streaming_perplexity.png")
    parser.add_argument("--result-json", type=Path, default=None)
    args = parser.parse_args(argv)

    stream = token_stream(args.data, args.num_tokens, bos_per_story=not args.one_document)
    policies = {"dense": {"attention_window": 0}, "sliding": {"attention_sinks": 0, "attention_window": 512},
                "sinks": {"attention_sinks": 4, "attention_window": 508}}
    server_args = ["--max-model-len", str(args.num_tokens + 16), "--num-kv-blocks", str(args.num_tokens // 16 + 64),
                   "--no-prefix-caching"]
    print(f"server: python -m server --threads 1 {' '.join(server_args)}")
    per_mode: dict[str, list[float | None]] = {}
    seconds: dict[str, float] = {}
    with ServerProcess(*server_args) as server, httpx.Client(timeout=None) as client:
        for mode in MODES:
            start = time.perf_counter()
            if mode == "dense-in-context":
                per_mode[mode] = score_in_context(client, server.url, stream)
            else:
                per_mode[mode] = score(client, server.url, stream, **policies[mode])
            seconds[mode] = time.perf_counter() - start

    rows = {mode: {"ppl": perplexity(lp), "ppl_first_512": perplexity(lp, 0, CONTEXT),
                   "ppl_after_512": perplexity(lp, CONTEXT), "ppl_last_2000": perplexity(lp, -2000),
                   "seconds": seconds[mode]} for mode, lp in per_mode.items()}
    layout = "one document" if args.one_document else "BOS before every story"
    print(f"\n{len(stream):,} tokens of TinyStories ({layout}), stories260K (context {CONTEXT})")
    print(f"{'mode':<18}{'ppl':>9}{'first 512':>11}{'after 512':>11}{'last 2000':>11}{'seconds':>9}")
    for mode, row in rows.items():
        print(f"{mode:<18}{row['ppl']:9.3f}{row['ppl_first_512']:11.3f}{row['ppl_after_512']:11.3f}"
              f"{row['ppl_last_2000']:11.3f}{row['seconds']:9.1f}")

    mass = attention_mass_on_first_tokens(stream)
    uniform = sum(4 / (q + 1) for q in range(64, CONTEXT)) / (CONTEXT - 64)
    print("\nattention mass on the first 4 tokens (queries at positions 64-511), per layer: "
          + ", ".join(f"{m:.3f}" for m in mass) + f"  (uniform attention would give {uniform:.3f})")

    plot(per_mode, args.bucket, f"stories260K on {len(stream):,} TinyStories tokens ({layout})", args.png)
    if args.result_json:
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "server_args": server_args, "modes": rows, "attention_mass_first_4_per_layer": mass,
                   "attention_mass_if_uniform": uniform,
                   "policies": policies}
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps(payload, indent=1))
        print(f"wrote {args.result_json}")


if __name__ == "__main__":
    main()
