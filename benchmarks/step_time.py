"""Milliseconds per engine step at 64 concurrent decodes, offline, one thread, on any checkout.

    for tree in /work/before27 .; do PYTHONPATH=$tree .venv/bin/python benchmarks/step_time.py; done

Only the engine's offline API (`Engine(...)`, `add_request`, `step`) is used, so the same script
times an older tree: PYTHONPATH picks whose code runs. The bundled stories260K model, a KV pool
sized as compare_servers.py sizes it for 64 requests of 16 prompt tokens and 128 output tokens,
greedy, EOS ignored; `--admit-per-step` requests join the batch each step (64: all at once).
One untimed round warms up, then `--rounds` rounds are timed; each prints its ms per step.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from model.sampling_params import SamplingParams
from scheduler.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--admit-per-step", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    engine = Engine(None, device="cpu", dtype="float32", num_kv_blocks=(args.requests + 1) * 9,
                    max_num_seqs=args.requests, max_model_len=144, block_size=16)
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)

    def run(round_index: int) -> tuple[int, float]:
        pending = [[rng.randrange(1, 500) for _ in range(16)] for _ in range(args.requests)]
        steps, start = 0, time.perf_counter()
        while pending or engine.has_unfinished_requests():
            for _ in range(min(args.admit_per_step, len(pending))):
                engine.add_request(f"r{round_index}-{len(pending)}", pending.pop(), params)
            engine.step()
            steps += 1
        return steps, time.perf_counter() - start

    run(0)
    for round_index in range(1, args.rounds + 1):
        steps, seconds = run(round_index)
        print(f"round {round_index}: {steps} steps, {1000 * seconds / steps:.2f} ms/step", flush=True)


if __name__ == "__main__":
    main()
