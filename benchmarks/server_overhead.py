"""What the HTTP server costs over the engine alone: the same workload through sinkserve's server
and through its `Engine` in this process, interleaved, on one thread each.

    PYTHONPATH=. .venv/bin/python benchmarks/server_overhead.py [--models stories260K,15m,76m,smollm2] \\
        [--workloads c64,c1] [--runs 3]

The workloads, checkpoints, prompts and server flags are benchmarks/compare_servers.py's (its
`--work-dir` cache is reused); the server is driven by the same streaming HTTP client. The
engine run adds every prompt at once (one after another for `c1`) and steps until all are done;
a request's time to first token is when the step that sampled its first token returned. The
ratio server / engine is what the server's threads (asyncio, HTTP, SSE, the engine thread's
hand-offs) cost the engine, whose thread shares the interpreter with them: the most that moving
the engine into its own process could win back. While the server runs, the CPU time of its
engine thread, of its other threads (event loop, HTTP, SSE) and of this process's HTTP client
is read per output token (Linux /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.compare_servers import (DEFAULT_WORK_DIR, KV_BLOCK_SIZE, MODELS, WORKLOADS, Checkpoint,
                                        RequestRecord, SinkserveServer, Workload, comma_list, drive,
                                        make_prompts, prepare_checkpoint)
from model.sampling_params import SamplingParams
from scheduler.engine import Engine
from server.async_engine import ENGINE_THREAD_NAME

ENGINE_THREAD = ENGINE_THREAD_NAME[:15]  # the name as Linux keeps it


def engine_for(checkpoint: Checkpoint, workload: Workload) -> Engine:
    blocks_per_seq = -(-workload.context_per_request // KV_BLOCK_SIZE)
    return Engine(checkpoint.sinkserve_model, device="cpu", dtype="float32", block_size=KV_BLOCK_SIZE,
                  num_kv_blocks=(workload.concurrency + 1) * blocks_per_seq,
                  max_model_len=workload.context_per_request, max_num_seqs=workload.concurrency)


def run_engine(engine: Engine, prompts: list[list[int]], workload: Workload) -> tuple[list[RequestRecord], float]:
    params = SamplingParams(temperature=0.0, max_tokens=workload.output_len, ignore_eos=True)
    batches = [[p] for p in prompts] if workload.sequential else [prompts]
    records: list[RequestRecord] = []
    wall = time.perf_counter()
    for batch in batches:
        start = time.perf_counter()
        first: dict[str, float] = {}
        tokens: dict[str, int] = {}
        done: dict[str, float] = {}
        request_ids = [f"r{len(records) + i}" for i in range(len(batch))]
        for request_id, prompt in zip(request_ids, batch):
            engine.add_request(request_id, prompt, params)
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                if out.new_token_ids:
                    first.setdefault(out.request_id, now)
                    tokens[out.request_id] = tokens.get(out.request_id, 0) + len(out.new_token_ids)
                if out.finished:
                    done[out.request_id] = now
        records += [RequestRecord(len(p), tokens[rid], first[rid] - start, done[rid] - start)
                    for p, rid in zip(batch, request_ids)]
    return records, time.perf_counter() - wall


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process's threads by thread name, from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    by_name: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            stat = (task / "stat").read_text()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            by_name[name] = by_name.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return by_name


def throughput(records: list[RequestRecord], wall: float, workload: Workload) -> float:
    if workload.sequential:
        return statistics.median(r.output_tokens / r.e2e_s for r in records)
    return sum(r.output_tokens for r in records) / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=comma_list(MODELS), default=list(MODELS))
    p.add_argument("--workloads", type=comma_list(("c64", "c1")), default=["c64", "c1"])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    args = p.parse_args()
    torch.set_num_threads(1)
    repo = Path(__file__).resolve().parents[1]
    print("model        workload  server tok/s  engine tok/s  server/engine  TTFT server  TTFT engine")
    for model in args.models:
        checkpoint = prepare_checkpoint(model, args.work_dir.expanduser(), sys.executable)
        for name in args.workloads:
            workload = WORKLOADS[name]
            engine = engine_for(checkpoint, workload)
            server = SinkserveServer(checkpoint, workload, repo, sys.executable,
                                     args.work_dir.expanduser() / "logs" / f"overhead-{model}-{name}.log")
            try:
                server.wait_ready()
                warm = make_prompts(f"overhead-warm-{model}-{name}", workload.num_requests, workload.prompt_len,
                                    checkpoint.vocab_size)
                asyncio.run(drive(server, warm, 8, workload.sequential, 600))
                run_engine(engine, [p[:workload.prompt_len] for p in warm], Workload(
                    name, "", workload.concurrency, workload.num_requests, workload.prompt_len, 8, ()))
                served, alone, ttft_served, ttft_alone = [], [], [], []
                cpu_per_token: dict[str, list[float]] = {"engine thread": [], "rest of the server": [],
                                                         "HTTP client": []}
                for run in range(args.runs):
                    prompts = make_prompts(f"overhead-{model}-{name}-{run}", workload.num_requests,
                                           workload.prompt_len, checkpoint.vocab_size)
                    before, client_before = thread_cpu_s(server.process.pid), time.process_time()
                    records, wall = asyncio.run(drive(server, prompts, workload.output_len, workload.sequential,
                                                      1800))
                    after, client_after = thread_cpu_s(server.process.pid), time.process_time()
                    tokens = sum(r.output_tokens for r in records)
                    engine_cpu = after.get(ENGINE_THREAD, 0.0) - before.get(ENGINE_THREAD, 0.0)
                    cpu_per_token["engine thread"].append(engine_cpu / tokens)
                    cpu_per_token["rest of the server"].append(
                        (sum(after.values()) - sum(before.values()) - engine_cpu) / tokens)
                    cpu_per_token["HTTP client"].append((client_after - client_before) / tokens)
                    served.append(throughput(records, wall, workload))
                    ttft_served.append(statistics.median(r.ttft_s for r in records))
                    records, wall = run_engine(engine, prompts, workload)
                    alone.append(throughput(records, wall, workload))
                    ttft_alone.append(statistics.median(r.ttft_s for r in records))
            finally:
                server.stop()
            s, e = statistics.median(served), statistics.median(alone)
            print(f"{model:12} {name:8} {s:12.1f}  {e:12.1f}  {s / e:13.2f}  "
                  f"{1000 * statistics.median(ttft_served):8.1f} ms  {1000 * statistics.median(ttft_alone):8.1f} ms",
                  flush=True)
            print("    CPU per output token while served: " + ", ".join(
                f"{what} {1e6 * statistics.median(values):.0f} us" for what, values in cpu_per_token.items()),
                flush=True)


if __name__ == "__main__":
    main()
