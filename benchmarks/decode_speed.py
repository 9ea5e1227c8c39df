"""Decode speed of one sequence against the memory-bandwidth floor, dense and with attention sinks.

Builds a model of a given shape with random (dummy) weights, prefills one prompt of `context`
random tokens and times `--decode-tokens` decode steps (the engine's `step()`, synchronised).
For each context it reports tokens/s and the floor: a decode step must read every weight and
every cached K/V once, so it cannot take less than (weight bytes + KV bytes) / copy bandwidth,
where the bandwidth is measured here by copying a 1 GiB tensor. `of floor` is floor time /
measured time (100% = at the roofline).

Modes: `dense` keeps the whole context in the cache; `sinks` keeps 4 sinks and a window of
`--window` tokens, so its cache (and step time) stays flat as the context grows.

On a GPU (the issue's roofline and long-context runs; TinyLlama-1.1B shape, bf16):

    PYTHONPATH=. python benchmarks/decode_speed.py --shape tinyllama --contexts 512
    PYTHONPATH=. python benchmarks/decode_speed.py --shape tinyllama --contexts 1024 8192 32768 --modes dense sinks

On a CPU, a smoke run: `--shape small --device cpu --contexts 128 512 --decode-tokens 16`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from model.checkpoints.model_path import BUNDLED_MODEL_DIR
from model.sampling_params import SamplingParams
from scheduler.engine import Engine

SHAPES = {
    "tinyllama": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=32000),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=688, vocab_size=32000),
}


def write_config(directory: Path, shape: dict, max_positions: int) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              "max_position_embeddings": max_positions, **shape}
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL_DIR / name, directory / name)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(engine: Engine, context: int, decode_tokens: int, vocab: int, seed: int, **policy) -> float:
    """Seconds per decode step of one sequence after a `context`-token prompt."""
    rng = random.Random(seed)
    prompt = [rng.randrange(3, min(vocab, 512)) for _ in range(context)]
    engine.add_request(f"ctx{context}-{policy}", prompt,
                       SamplingParams(max_tokens=decode_tokens + 1, temperature=0.0, ignore_eos=True), **policy)
    while not any(out.new_token_ids for out in engine.step()):
        pass  # prefill chunks; the last one samples the first token
    times = []
    while engine.has_unfinished_requests():
        synchronize(engine.device)
        start = time.perf_counter()
        engine.step()
        synchronize(engine.device)
        times.append(time.perf_counter() - start)
    times = sorted(times[2:] or times)  # the first steps may compile or capture
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512])
    parser.add_argument("--modes", nargs="+", choices=["dense", "sinks"], default=["dense"])
    parser.add_argument("--window", type=int, default=1020, help="sinks mode: window (4 sinks + window)")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--attention-backend", default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-json", type=Path, default=None)
    args = parser.parse_args(argv)

    shape = SHAPES[args.shape]
    max_len = max(args.contexts) + args.decode_tokens + 64
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        write_config(model_dir, shape, max_positions=max(max_len, 2048))
        engine = Engine(model_dir, args.device, args.dtype, load_format="dummy", max_model_len=max_len,
                        max_num_seqs=8, num_kv_blocks=max_len // 16 + 64, enable_prefix_caching=False,
                        attention_backend=args.attention_backend, enforce_eager=args.enforce_eager, seed=args.seed)
        element = torch.empty((), dtype=engine.dtype).element_size()
        weight_bytes = sum(p.numel() for p in engine.model.parameters()) * element
        head_dim = shape["hidden_size"] // shape["num_attention_heads"]
        kv_bytes_per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * element
        bandwidth = copy_bandwidth(engine.device)
        device_name = torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu"
        print(f"{args.shape} shape, {weight_bytes / 2**30:.2f} GiB of {engine.dtype} weights on {device_name} "
              f"(attention: {engine.attention_backend}); copy bandwidth {bandwidth / 1e9:.0f} GB/s")
        print(f"{'mode':<6}{'context':>8}{'cache':>8}{'ms/token':>10}{'tokens/s':>10}{'floor ms':>10}{'of floor':>10}")
        for mode in args.modes:
            policy = {"attention_sinks": 4, "attention_window": args.window} if mode == "sinks" else \
                {"attention_window": 0}
            for context in args.contexts:
                seconds = measure(engine, context, args.decode_tokens, shape["vocab_size"], args.seed, **policy)
                cache = min(context + args.decode_tokens // 2, 4 + args.window) if mode == "sinks" else \
                    context + args.decode_tokens // 2
                floor = (weight_bytes + cache * kv_bytes_per_token) / bandwidth
                rows.append({"mode": mode, "context": context, "cache_tokens": cache, "s_per_token": seconds,
                             "tokens_per_s": 1 / seconds, "floor_s": floor, "of_floor": floor / seconds})
                print(f"{mode:<6}{context:>8}{cache:>8}{1000 * seconds:10.3f}{1 / seconds:10.1f}"
                      f"{1000 * floor:10.3f}{floor / seconds:10.1%}")
    if args.result_json:
        args.result_json.parent.mkdir(parents=True, exist_ok=True)
        args.result_json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                "device": device_name, "bandwidth_bytes_per_s": bandwidth,
                                                "weight_bytes": weight_bytes, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
