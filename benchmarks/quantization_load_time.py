"""How long SmolLM2 takes to load under each int8 calibration, against int8-weight (none).

    PYTHONPATH=. .venv/bin/python benchmarks/quantization_load_time.py [--threads 1] [--trials 3]

One engine at a time (SmolLM2's Q4_1 GGUF, a small KV pool), the methods interleaved across
`--trials` rounds; prints the median load of each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model.checkpoints.model_path import resolve_model_path
from scheduler.engine import Engine

CONFIGS = {"int8-weight": {"quantization": "int8-weight"},
           "int8, not smoothed": {"quantization": "int8", "smoothquant_alpha": None},
           "int8, alpha 0.5": {"quantization": "int8", "smoothquant_alpha": 0.5},
           "int8, alpha auto": {"quantization": "int8", "smoothquant_alpha": "auto"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_path("smollm2")
    seconds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.trials):
        for name, options in CONFIGS.items():
            start = time.perf_counter()
            engine = Engine(path, device="cpu", num_kv_blocks=64, max_model_len=1024, **options)
            seconds[name].append(time.perf_counter() - start)
            del engine
    for name, runs in seconds.items():
        print(f"{name:20} load {statistics.median(runs):5.1f} s (runs: {', '.join(f'{s:.1f}' for s in runs)})")


if __name__ == "__main__":
    main()
