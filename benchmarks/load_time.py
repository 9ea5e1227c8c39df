"""Time to load a GGUF model ready to serve: sinkserve's engine against transformers' own GGUF
loading, each in a fresh process, interleaved, medians. Run from the repository root:

    PYTHONPATH=. python benchmarks/load_time.py --model smollm2 --repeats 3 \
        --result-json benchmarks/results/load_time_smollm2.json

sinkserve: `Engine(model)` (config, tokenizer, dequantized weights, KV pool) after its imports.
transformers: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` plus
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` after their imports. Both on one torch
thread, float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SINKSERVE = """
import time, torch
torch.set_num_threads(1)
from scheduler.engine import Engine
start = time.perf_counter()
engine = Engine({model!r}, device="cpu", dtype="float32", max_model_len=2048)
print(time.perf_counter() - start)
"""

TRANSFORMERS = """
import time, torch
torch.set_num_threads(1)
import transformers
from model.model_path import resolve_model_path
path = resolve_model_path({model!r})
transformers.logging.set_verbosity_error()
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
print(time.perf_counter() - start)
"""


def timed(script: str) -> float:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a .gguf path or an installed model name")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--result-json", type=Path, default=None)
    args = parser.parse_args(argv)

    times: dict[str, list[float]] = {"sinkserve": [], "transformers": []}
    for i in range(args.repeats):
        times["sinkserve"].append(timed(SINKSERVE.format(model=args.model)))
        print(f"run {i}: sinkserve {times['sinkserve'][-1]:.2f} s", flush=True)
        if not args.skip_transformers:
            times["transformers"].append(timed(TRANSFORMERS.format(model=args.model)))
            print(f"run {i}: transformers {times['transformers'][-1]:.2f} s", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items() if t}
    for name, median in medians.items():
        print(f"{name}: median {median:.2f} s over {len(times[name])} runs")
    if "transformers" in medians:
        print(f"transformers / sinkserve: {medians['transformers'] / medians['sinkserve']:.1f}x")
    if args.result_json:
        args.result_json.write_text(json.dumps({"model": args.model, "times_s": times, "median_s": medians}, indent=2))
        print(f"wrote {args.result_json}")


if __name__ == "__main__":
    main()
