"""Where an engine step's time goes: its phases timed at steady-state decode, offline, one thread.

    PYTHONPATH=. .venv/bin/python benchmarks/step_phases.py [--model DIR] [--batch 64] [--steps 40] \\
        [--ops]

B requests of 16 random prompt tokens decode greedily (EOS ignored) after their prefill and first
decode; every step after that is timed, and inside it, with `time.perf_counter` around each:
scheduling, building the model input, the attention metadata, the model forward, the logits,
the scheduler's update, and turning sampled tokens into outputs (detokenizing, stop checks).
`--ops` adds a torch.profiler table of the forward's ops over 5 steps. The default model is the
76M shape of benchmarks/compare_servers.py (from its `--work-dir` cache).
"""

from __future__ import annotations

import argparse
import collections
import random
import time
from pathlib import Path

import torch

import model.layers.attention as attention
from model.sampling_params import SamplingParams
from scheduler.engine import Engine

DEFAULT_MODEL = Path("~/.cache/sinkserve-compare/76m/hf").expanduser()
PROMPT_LEN = 16


def timed(phases: dict[str, float], name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] += time.perf_counter() - start
    return wrapper


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint directory, GGUF or package name")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ops", action="store_true", help="also profile the forward's ops (torch.profiler)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    context = PROMPT_LEN + args.steps + 8
    engine = Engine(args.model, device="cpu", dtype="float32", max_num_seqs=args.batch, max_model_len=context,
                    num_kv_blocks=args.batch * -(-context // 16) + 8)
    vocab = engine.runner.model.config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 2, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), [rng.randrange(3, min(vocab, 512)) for _ in range(PROMPT_LEN)], params)
    engine.step()  # prefill
    engine.step()  # first decode

    phases: dict[str, float] = collections.defaultdict(float)
    engine.fault_isolation.schedule = timed(phases, "schedule (and model input)", engine.fault_isolation.schedule)
    engine.runner.model.forward = timed(phases, "forward", engine.runner.model.forward)
    engine.runner.model.compute_logits = timed(phases, "logits", engine.runner.model.compute_logits)
    engine.runner.sampler = timed(phases, "sampler", engine.runner.sampler)
    engine.scheduler.update = timed(phases, "scheduler update", engine.scheduler.update)
    engine._process_samples = timed(phases, "outputs (text, stops)", engine._process_samples)
    attention.AttentionMetadata.build = staticmethod(timed(phases, "attention metadata",
                                                           attention.AttentionMetadata.build))
    start = time.perf_counter()
    for _ in range(args.steps - 5 if args.ops else args.steps):
        engine.step()
    wall = time.perf_counter() - start
    steps = args.steps - 5 if args.ops else args.steps
    print(f"{args.model}: batch {args.batch}, {steps} decode steps, {1000 * wall / steps:.1f} ms per step, "
          f"{args.batch * steps / wall:.0f} tok/s")
    for name, seconds in sorted(phases.items(), key=lambda item: -item[1]):
        print(f"  {name:24} {1000 * seconds / steps:8.2f} ms per step")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                engine.step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
