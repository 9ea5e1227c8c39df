"""The cost of constrained decoding on SmolLM2: grammar compile time, and the per-token overhead of
the grammar mask at batch 1 and 64, side by side with the same requests unconstrained.

    python benchmarks/structured_output.py [--threads 1] [--tokens 32] [--trials 3]

Compile times are measured in the engine's process, and through the server's grammar compiler
(a trial in a sandbox process, then the same compile in the server).

Decode steps only (prefill excluded): a batch of B identical prompts generates `--tokens` tokens
each, free (ignore_eos) or under a JSON schema that cannot complete that soon (an array of at
least 500 short strings), in interleaved trials; medians. The mask of each step is filled in a
worker thread while the forward pass runs, so the overhead is what is left of it after the
overlap; the mask fill alone is timed too, the engine's (row by row, each row timed against the
mask budget) beside llguidance's parallel fill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import llguidance
import llguidance.torch
import torch

from model.checkpoints.model_path import resolve_model_path
from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from scheduler.structured_output import StructuredOutput, json_schema_grammar
from server.chat_template import ChatTemplate

# Cannot complete within the run: every step is a constrained step.
LONG_ARRAY = {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 500}
COMPILE_SCHEMAS = {
    "string": {"type": "string"},
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
               "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
    "product": {"type": "object", "additionalProperties": False, "required": ["sku", "price", "tags", "stock"],
                "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"},
                               "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                               "tags": {"type": "array", "items": {"enum": ["new", "sale", "eco"]}},
                               "stock": {"type": "integer", "minimum": 0, "maximum": 500}}},
    "20 tools (anyOf)": {"anyOf": [
        {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
         "properties": {"name": {"const": f"tool_{i}"}, "arguments": {
             "type": "object", "required": ["query", "limit"],
             "properties": {"query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                            "mode": {"enum": ["fast", "exact"]}}}}} for i in range(20)]},
}


def decode_seconds(engine: Engine, prompt: list[int], batch: int, params: SamplingParams) -> tuple[float, int]:
    """Seconds spent in decode steps and the tokens they produced, for `batch` copies of a prompt."""
    for i in range(batch):
        engine.add_request(f"bench-{i}", prompt, params)
    started = set()
    while len(started) < batch:  # prefill, and the first token of each
        started.update(out.request_id for out in engine.step() if out.new_token_ids)
    tokens, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        tokens += sum(len(out.new_token_ids) for out in engine.step())
    return time.perf_counter() - start, tokens


def mask_fill_seconds(engine: Engine, grammar: str, batch: int, steps: int, parallel: bool) -> float:
    """Seconds per step to fill the masks of `batch` matchers alone (no forward pass): the engine's
    fill (row by row, each timed against the mask budget), or llguidance's parallel one."""
    structured = engine.structured_output
    matchers = [structured.compile(grammar).deep_copy() for _ in range(batch)]
    bitmask = torch.empty(llguidance.torch.get_bitmask_shape(batch, structured.vocab_size), dtype=torch.int32)
    executor = llguidance.LLExecutor()
    tokens = engine.tokenizer.encode_text('["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"')
    start = time.perf_counter()
    for step in range(steps):
        if parallel:
            llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        else:
            structured._fill(matchers, list(range(batch)), bitmask, [])
        for matcher in matchers:
            matcher.consume_token(tokens[step % len(tokens)] if step < len(tokens) else tokens[-1])
    return (time.perf_counter() - start) / steps


def compile_times(engine: Engine, trials: int) -> dict:
    results = {}
    for name, schema in COMPILE_SCHEMAS.items():
        cold, cached = [], []
        for _ in range(trials):
            fresh = StructuredOutput(engine.tokenizer, engine.model.config.vocab_size, engine.stop_token_ids)
            fresh._ll_tokenizer = engine.structured_output.ll_tokenizer  # built once per engine
            start = time.perf_counter()
            grammar = json_schema_grammar(schema)
            fresh.compile(grammar)
            cold.append(time.perf_counter() - start)
            start = time.perf_counter()
            fresh.compile(grammar)
            cached.append(time.perf_counter() - start)
        results[name] = {"compile_ms": statistics.median(cold) * 1e3, "cached_ms": statistics.median(cached) * 1e3}
    return results


def sandboxed_compile_times(engine: Engine, trials: int) -> dict:
    """Milliseconds for the server's compiler (server/grammar_compiler.py) to compile a new
    schema: a trial in a sandbox process, then the compile in the server; medians."""
    import asyncio

    from server.grammar_compiler import GrammarCompiler

    async def run() -> dict:
        compiler = GrammarCompiler(engine.structured_output)
        compiler.start()
        await compiler._starting  # the sandboxes, started once per server
        results = {}
        for name, schema in COMPILE_SCHEMAS.items():
            times = []
            for trial in range(trials):
                grammar = json_schema_grammar(schema)
                start = time.perf_counter()
                await compiler.compile(grammar, salt=f"bench-{trial}", tenant=None)  # a new salt: not cached
                times.append(time.perf_counter() - start)
            results[name] = statistics.median(times) * 1e3
        await compiler.stop()
        return results

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens per request")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine(resolve_model_path("smollm2"), device="cpu", dtype="float32", num_kv_blocks=2048,
                    max_model_len=2048, max_num_seqs=max(args.batches))
    start = time.perf_counter()
    engine.structured_output.ll_tokenizer  # noqa: B018 (built on first use)
    print(f"llguidance tokenizer for {engine.tokenizer.vocab_size} tokens: {time.perf_counter() - start:.3f} s (once)")
    sandboxed = sandboxed_compile_times(engine, args.trials)
    for name, times in compile_times(engine, args.trials).items():
        print(f"compile {name:>18}: {times['compile_ms']:7.2f} ms   cached: {times['cached_ms']:.3f} ms   "
              f"through the server's sandbox first: {sandboxed[name]:.2f} ms")

    prompt = ChatTemplate(engine.tokenizer).encode(
        [{"role": "user", "content": "List as many words as you can, as a JSON array of strings."}])
    grammar = json_schema_grammar(LONG_ARRAY)
    free = SamplingParams(temperature=0, max_tokens=args.tokens + 1, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=args.tokens + 1, ignore_eos=True, grammar=grammar)
    decode_seconds(engine, prompt, 2, constrained)  # warm-up
    summary = {}
    for batch in args.batches:
        runs = {"free": [], "constrained": []}
        for _ in range(args.trials):
            for mode, params in (("free", free), ("constrained", constrained)):
                seconds, tokens = decode_seconds(engine, prompt, batch, params)
                runs[mode].append(seconds / (tokens / batch))  # seconds per decode step
        step_free, step_constrained = (statistics.median(runs[m]) for m in ("free", "constrained"))
        fill = mask_fill_seconds(engine, grammar, batch, args.tokens, parallel=False)
        fill_par = mask_fill_seconds(engine, grammar, batch, args.tokens, parallel=True)
        summary[batch] = {"step_ms_free": step_free * 1e3, "step_ms_constrained": step_constrained * 1e3,
                          "ratio": step_constrained / step_free,
                          "overhead_ms_per_token": (step_constrained - step_free) / batch * 1e3,
                          "mask_fill_ms_per_step": fill * 1e3, "parallel_fill_ms_per_step": fill_par * 1e3}
        s = summary[batch]
        print(f"batch {batch:3d}: decode step free {s['step_ms_free']:.1f} ms, constrained "
              f"{s['step_ms_constrained']:.1f} ms ({s['ratio']:.3f}x); overhead "
              f"{s['overhead_ms_per_token']:.3f} ms per token; mask fill alone {s['mask_fill_ms_per_step']:.2f} ms "
              f"per step (llguidance's parallel fill: {s['parallel_fill_ms_per_step']:.2f} ms)")
    print(json.dumps({str(k): v for k, v in summary.items()}))


if __name__ == "__main__":
    main()
