"""Time to load a GGUF model ready to serve: sinkserve's engine against transformers' own GGUF
loading, each in a fresh process, interleaved, medians. Run from the repository root:

    PYTHONPATH=. python benchmarks/load_time.py --model smollm2 --repeats 3 \
        --result-json benchmarks/results/load_time_smollm2.json

sinkserve: `Engine(model)` (config, tokenizer, dequantized weights, KV pool) after its imports.
transformers: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` plus
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` after their imports. Both on one torch
thread, float32. Also: `python -m server --model ...` from its start until /health answers 200
(imports included), and where sinkserve's load goes (parsing the metadata, against gguf's own
reader over its memory map; the tokenizer; dequantizing, against gguf's numpy dequantize).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
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
from model.checkpoints.model_path import resolve_model_path
path = resolve_model_path({model!r})
transformers.logging.set_verbosity_error()
start = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
print(time.perf_counter() - start)
"""


BREAKDOWN = """
import json, time, gguf, torch
torch.set_num_threads(1)
from model.checkpoints.gguf_checkpoint import _dequantize, open_gguf
from model.checkpoints.model_path import resolve_model_path
from model.tokenizers.tokenizer_loader import load_tokenizer
path = resolve_model_path({model!r})
times = {{}}
start = time.perf_counter(); gguf.GGUFReader(path); times["gguf_reader_over_memmap"] = time.perf_counter() - start
start = time.perf_counter(); reader = open_gguf(path); times["metadata"] = time.perf_counter() - start
start = time.perf_counter(); load_tokenizer(path); times["tokenizer"] = time.perf_counter() - start
start = time.perf_counter()
for tensor in reader.tensors:
    _dequantize(tensor)
times["dequantize"] = time.perf_counter() - start
start = time.perf_counter()
for tensor in reader.tensors:
    gguf.quants.dequantize(tensor.data, tensor.tensor_type)
times["gguf_numpy_dequantize"] = time.perf_counter() - start
print(json.dumps(times))
"""


def timed(script: str) -> float:
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def server_ready(model: str) -> float:
    """Seconds from starting `python -m server --model MODEL` until /health answers 200."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "server", "--model", model, "--port", str(port),
                               "--threads", "1", "--log-level", "warning"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"the server exited with {server.returncode}")
    finally:
        server.terminate()
        server.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="a .gguf path or an installed model name")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--result-json", type=Path, default=None)
    args = parser.parse_args(argv)

    times: dict[str, list[float]] = {"sinkserve": [], "transformers": [], "server_ready": []}
    stages: dict[str, list[float]] = {}
    for i in range(args.repeats):
        times["sinkserve"].append(timed(SINKSERVE.format(model=args.model)))
        print(f"run {i}: sinkserve {times['sinkserve'][-1]:.2f} s", flush=True)
        times["server_ready"].append(server_ready(args.model))
        print(f"run {i}: python -m server to /health 200 {times['server_ready'][-1]:.2f} s", flush=True)
        out = subprocess.run([sys.executable, "-c", BREAKDOWN.format(model=args.model)], capture_output=True,
                             text=True, check=True)
        for stage, seconds in json.loads(out.stdout.strip().splitlines()[-1]).items():
            stages.setdefault(stage, []).append(seconds)
        if not args.skip_transformers:
            times["transformers"].append(timed(TRANSFORMERS.format(model=args.model)))
            print(f"run {i}: transformers {times['transformers'][-1]:.2f} s", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items() if t}
    for name, median in medians.items():
        print(f"{name}: median {median:.2f} s over {len(times[name])} runs")
    stage_medians = {stage: statistics.median(t) for stage, t in stages.items()}
    print("sinkserve's load, by stage (medians, s): "
          + ", ".join(f"{stage} {median:.2f}" for stage, median in stage_medians.items()))
    if "transformers" in medians:
        print(f"transformers / sinkserve: {medians['transformers'] / medians['sinkserve']:.1f}x")
    if args.result_json:
        args.result_json.write_text(json.dumps({"model": args.model, "times_s": times, "median_s": medians,
                                                "stages_s": stages, "stage_median_s": stage_medians}, indent=2))
        print(f"wrote {args.result_json}")


if __name__ == "__main__":
    main()
