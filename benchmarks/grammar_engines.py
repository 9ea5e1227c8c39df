"""llguidance against xgrammar on SmolLM2's 49,152-token vocabulary: JSON-schema compile time and
the time to fill the token bitmask per decode step, at batch 1 and 64, one CPU thread each.

    python benchmarks/grammar_engines.py
    # xgrammar is not a dependency; to compare, put it on the path without its dependencies:
    pip install --no-deps --target /tmp/xgpkgs xgrammar apache-tvm-ffi
    PYTHONPATH=/tmp/xgpkgs python benchmarks/grammar_engines.py

Both engines follow the same valid JSON document token by token (the tokens SmolLM2's tokenizer
gives it), filling the mask before each token, as a decode step does; medians of `--trials`.
Both write JSON as `", "` / `": "` with no other whitespace, as sinkserve asks llguidance to.
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
from model.tokenizers.tokenizer import Tokenizer
from model.tokenizers.tokenizer_loader import load_tokenizer
from scheduler.structured_output import StructuredOutput, json_schema_grammar

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["new", "sale", "eco"]}}}}
DOCUMENT = '{"name": "John Smith", "age": 42, "tags": ["new", "eco", "sale"]}'
TOOLS = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                    "properties": {"name": {"const": f"tool_{i}"}, "arguments": {
                        "type": "object", "required": ["query", "limit"],
                        "properties": {"query": {"type": "string"},
                                       "limit": {"type": "integer", "minimum": 1, "maximum": 100}}}}}
                   for i in range(20)]}


def median_seconds(fn, trials: int) -> float:
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def llguidance_engine(tokenizer: Tokenizer, vocab_size: int, stop_ids: list[int]):
    structured = StructuredOutput(tokenizer, vocab_size, stop_ids)
    ll_tokenizer = structured.ll_tokenizer
    executor = llguidance.LLExecutor(1)

    def compile_schema(schema: dict):
        grammar = json_schema_grammar(schema)
        return llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)

    def follow(compiled, batch: int, tokens: list[int]) -> float:
        matchers = [compiled.deep_copy() for _ in range(batch)]
        bitmask = torch.empty(llguidance.torch.get_bitmask_shape(batch, vocab_size), dtype=torch.int32)
        fill = 0.0
        for token in tokens:
            start = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
            fill += time.perf_counter() - start
            assert all(m.consume_token(token) for m in matchers)
        return fill / len(tokens)

    return compile_schema, follow


def xgrammar_engine(tokenizer: Tokenizer, vocab_size: int, stop_ids: list[int]):
    import xgrammar

    info = xgrammar.TokenizerInfo([tokenizer.token_bytes(i) for i in range(vocab_size)],
                                  vocab_type=xgrammar.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop_ids)

    def compile_schema(schema: dict):
        compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def follow(compiled, batch: int, tokens: list[int]) -> float:
        matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(batch)]
        bitmask = xgrammar.allocate_token_bitmask(batch, vocab_size)
        fill = 0.0
        for token in tokens:
            start = time.perf_counter()
            for i, matcher in enumerate(matchers):
                matcher.fill_next_token_bitmask(bitmask, i)
            fill += time.perf_counter() - start
            assert all(m.accept_token(token) for m in matchers)
        return fill / len(tokens)

    return compile_schema, follow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(resolve_model_path("smollm2"))
    vocab_size, stop_ids = tokenizer.vocab_size, [tokenizer.eos_token_id]
    tokens = tokenizer.encode_text(DOCUMENT)
    engines = {"llguidance": llguidance_engine}
    try:
        import xgrammar  # noqa: F401
        engines["xgrammar"] = xgrammar_engine
    except ImportError:
        print("xgrammar is not installed: llguidance only")
    results = {}
    for name, make in engines.items():
        start = time.perf_counter()
        compile_schema, follow = make(tokenizer, vocab_size, stop_ids)
        setup = time.perf_counter() - start
        compiled = compile_schema(PERSON)
        follow(compiled, 1, tokens)  # warm-up
        result = {"tokenizer_setup_s": setup,
                  "compile_person_ms": median_seconds(lambda: compile_schema(PERSON), args.trials) * 1e3,
                  "compile_20_tools_ms": median_seconds(lambda: compile_schema(TOOLS), args.trials) * 1e3}
        for batch in args.batches:
            result[f"mask_ms_per_step_batch_{batch}"] = statistics.median(
                follow(compiled, batch, tokens) for _ in range(args.trials)) * 1e3
        results[name] = result
        print(name, ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
