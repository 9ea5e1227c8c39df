"""Side-by-side microbenchmarks of the CPU choices the model makes, each against its alternative.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_levers.py [--model DIR] [--threads 1]

For one model shape (default: the 76M-parameter shape of benchmarks/compare_servers.py, random
weights; `--model` takes any checkpoint directory), at batch 1 and 64, interleaved, medians:

- `dtype`: a decoder layer's matmuls in float32 against bfloat16 (bf16 pays only where the CPU
  has native bf16 matmuls, AMX or AVX512-BF16);
- `compile`: the MLP block (norm, gate/up, SiLU, down, residual) eager against torch.compile
  (dynamic shapes), and what compiling cost;
- `gather`: reading a batch's cached keys slot by slot (advanced indexing) against whole blocks
  (index_select on the block dimension), what the CPU attention does;
- `attention`: decode attention as matmul + mask + softmax + matmul against PyTorch's
  scaled_dot_product_attention;
- `matmul`: every layer's projections (qkv, o, gate/up, down; distinct weights per layer, so
  they come from memory as in a forward) through `F.linear` (MKL's sgemm) against oneDNN's
  matmul on the same dense weights (`model/layers/linear.py`), at 1, 8, 64 and 256 rows;
- `matmul-small`: one small weight, which stays in the cache (stories260K's and the 15M
  shape's projections), at 64 rows, `F.linear` against oneDNN: why `model/layers/linear.py` keeps
  weights under 2^20 elements on MKL;
- `contention`: the 76M shape's gate/up matmul at 64 rows alone, then while another process
  keeps the other CPU busy in a Python loop (what an HTTP server's threads do to the engine,
  whichever process they live in);
- `mask`: prefill attention (16 chunks of 128 queries over 256 slots) with a boolean mask
  against the same mask made additive once (`scaled_dot_product_attention` converts a
  boolean one at every call);
- `ceiling`: the fastest decode any fp32 server can reach on this CPU at 64 streams, from the
  matmuls alone: every layer's projections and the LM head at 64 rows through `model.layers.linear.Linear`
  (what the forward runs), timed, the FLOPs per token counted, and 64 / that time printed as
  tokens per second with nothing else in the step (no attention, no sampling, no server);
- `bandwidth`: the same at one stream, where each matmul is one row and the step is a read of
  every weight from memory: the GB/s PyTorch's one-row matmuls reach, and the tokens per second
  that allows with nothing else in the step.

- `quantized`: each distinct projection shape and the LM head, at 1, 8, 64 and 256 rows, in
  every weight format `model/quantization/formats.py` has (float32, bfloat16, int8 weight-only,
  int8 W8A8, int4 in groups of 32 where the shape allows): what the quantized layers choose
  between (they measure this again for themselves when a model loads). `--model smollm2` for
  SmolLM2's shapes.

`--only NAME[,NAME]` runs the named levers only.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch
import torch.nn.functional as F

SHAPE_76M = dict(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048)


def timed(fn, repeats: int) -> float:
    """Median microseconds of fn() over `repeats` calls in 5 rounds."""
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        rounds.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(rounds)


def compare(name: str, batch: int, variants: dict, repeats: int) -> None:
    for fn in variants.values():  # warm-up
        fn()
    times = {label: [] for label in variants}
    for _ in range(3):  # interleaved
        for label, fn in variants.items():
            times[label].append(timed(fn, repeats))
    medians = {label: statistics.median(t) for label, t in times.items()}
    base = next(iter(medians.values()))
    cells = "  ".join(f"{label} {us:9.0f} us ({base / us:4.2f}x)" for label, us in medians.items())
    print(f"{name:10} batch {batch:3}  {cells}")


def spin(stop) -> None:
    while not stop.is_set():
        pass


def mlp_block(hidden: int, intermediate: int, dtype: torch.dtype):
    norm = torch.ones(hidden, dtype=dtype)
    gate_up = torch.randn(2 * intermediate, hidden, dtype=dtype) * 0.02
    down = torch.randn(hidden, intermediate, dtype=dtype) * 0.02

    def block(x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(F.rms_norm(x, (hidden,), norm, 1e-5), gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, down)

    return block


def onednn(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: the 76M shape)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", type=int, default=160, help="cached tokens per sequence (attention)")
    parser.add_argument("--vocab", type=int, default=32000, help="LM head rows (default: the 76M shape's)")
    parser.add_argument("--only", default=None, help="comma-separated levers to run (default: all)")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None

    def wanted(lever: str) -> bool:
        return only is None or lever in only

    torch.set_num_threads(args.threads)
    shape = dict(SHAPE_76M)
    if args.model:
        from model.checkpoints.loader import model_config
        from model.checkpoints.model_path import resolve_model_path

        cfg = model_config(resolve_model_path(args.model))
        args.vocab = cfg.vocab_size
        shape = dict(hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                     kv_heads=cfg.num_key_value_heads, intermediate=cfg.intermediate_size)
    hidden, inter = shape["hidden"], shape["intermediate"]
    head_dim = hidden // shape["heads"]
    block_size, kv_heads = 16, shape["kv_heads"]
    group = shape["heads"] // kv_heads
    q_size, kv_size = shape["heads"] * head_dim, kv_heads * head_dim
    layer_shapes = ((q_size + 2 * kv_size, hidden), (hidden, q_size), (2 * inter, hidden), (hidden, inter))
    print(f"shape {shape}, vocab {args.vocab}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    torch.manual_seed(0)
    with torch.inference_mode():
        if wanted('dtype'):
            for batch in (1, 64):
                x32 = torch.randn(batch, hidden)
                blocks = {dtype: mlp_block(hidden, inter, dtype) for dtype in (torch.float32, torch.bfloat16)}
                compare("dtype", batch, {"float32": lambda: blocks[torch.float32](x32),
                                         "bfloat16": lambda: blocks[torch.bfloat16](x32.bfloat16())}, 20)

        if wanted('compile'):
            eager = mlp_block(hidden, inter, torch.float32)
            start = time.perf_counter()
            compiled = torch.compile(eager, dynamic=True)
            for batch in (1, 64):
                compiled(torch.randn(batch, hidden))
            print(f"compile    torch.compile of the MLP block, batch 1 and 64: {time.perf_counter() - start:.1f} s")
            for batch in (1, 64):
                x = torch.randn(batch, hidden)
                compare("compile", batch, {"eager": lambda: eager(x), "compiled": lambda: compiled(x)}, 20)

        if wanted('gather') or wanted('attention'):
            num_blocks = -(-args.context // block_size)
            cache = torch.randn(4096, block_size, kv_heads, head_dim)
            for batch in (1, 64):
                tables = torch.randint(0, cache.shape[0], (batch, num_blocks))
                slots = (tables[:, :, None] * block_size + torch.arange(block_size)).view(batch, -1)
                compare("gather", batch, {
                    "by slot": lambda: cache.view(-1, kv_heads, head_dim)[slots],
                    "by block": lambda: cache.index_select(0, tables.flatten()),
                }, 20)
                length = num_blocks * block_size
                q = torch.randn(batch, kv_heads, group, head_dim)
                k = torch.randn(batch, kv_heads, length, head_dim)
                v = torch.randn(batch, kv_heads, length, head_dim)
                mask = (torch.arange(length) < args.context)[None, None, None, :].expand(batch, 1, 1, -1)

                def manual():
                    scores = torch.matmul(q, k.transpose(-1, -2)) * head_dim ** -0.5
                    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
                    return torch.matmul(probs, v)

                compare("attention", batch, {
                    "matmul+softmax": manual,
                    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                }, 20)

        if wanted('quantized'):
            from model.quantization.formats import Dense, Int4Groups, Int8Channels, Int8Dynamic

            for rows_out, cols in layer_shapes + ((args.vocab, hidden),):
                weight = torch.randn(rows_out, cols) * 0.02
                formats = {"float32": Dense(weight), "bfloat16": Dense(weight.bfloat16()),
                           "int8-weight": Int8Channels.from_float(weight), "int8 w8a8": Int8Dynamic.from_float(weight)}
                if Int4Groups.takes((rows_out, cols), 32):
                    formats["int4 g32"] = Int4Groups.from_float(weight, 32)
                for batch in (1, 8, 64, 256):
                    x = torch.randn(batch, cols)
                    xb = x.bfloat16()
                    compare(f"{rows_out}x{cols}", batch, {
                        name: (lambda f=fmt: f.matmul(x)) if name == "float32" else (lambda f=fmt: f.matmul(xb))
                        for name, fmt in formats.items()}, 10)

        if wanted('matmul'):
            weights = [[torch.randn(rows, cols) * 0.02 for rows, cols in layer_shapes]
                       for _ in range(shape["layers"])]

            def projections(matmul, inputs):
                for layer in weights:
                    for weight in layer:
                        matmul(inputs[weight.shape[1]], weight)

            for batch in (1, 8, 64, 256):
                inputs = {cols: torch.randn(batch, cols) for cols in {hidden, q_size, inter}}
                compare("matmul", batch, {"F.linear (MKL)": lambda: projections(F.linear, inputs),
                                          "oneDNN": lambda: projections(onednn, inputs)}, 2)

        if wanted('matmul-small'):
            for rows, cols in ((192, 64), (480, 288), (1536, 288)):
                x, weight = torch.randn(64, cols), torch.randn(rows, cols)
                compare("matmul-small", 64, {f"{rows}x{cols} F.linear": lambda: F.linear(x, weight),
                                             "oneDNN": lambda: onednn(x, weight)}, 200)

        if wanted('contention'):
            x, weight = torch.randn(64, hidden), torch.randn(2 * inter, hidden)
            alone = timed(lambda: F.linear(x, weight), 20)
            stop = multiprocessing.Event()
            busy = multiprocessing.Process(target=spin, args=(stop,), daemon=True)
            busy.start()
            time.sleep(0.5)
            contended = timed(lambda: F.linear(x, weight), 20)
            stop.set()
            busy.join()
            print(f"contention batch  64  alone {alone:9.0f} us (1.00x)  other CPU busy {contended:9.0f} us "
                  f"({alone / contended:4.2f}x)")

        if wanted('mask'):
            chunks, queries, slots = 16, 128, 256
            q = torch.randn(chunks, kv_heads, queries * group, head_dim)
            k = torch.randn(chunks, kv_heads, slots, head_dim)
            v = torch.randn(chunks, kv_heads, slots, head_dim)
            causal = (torch.arange(slots)[None, :] <= torch.arange(queries)[:, None] + slots - queries)
            allowed = causal.repeat_interleave(group, dim=0)[None, None].expand(chunks, 1, -1, -1).contiguous()
            additive = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
            compare("mask", chunks, {
                "boolean": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=allowed),
                "additive": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive),
            }, 5)

        if wanted('ceiling') or wanted('bandwidth'):
            from model.layers.linear import Linear

            shapes = [shape for _ in range(shape["layers"]) for shape in layer_shapes] + [(args.vocab, hidden)]
            linears = [Linear(cols, rows, bias=False) for rows, cols in shapes]
            flops = 2 * sum(rows * cols for rows, cols in shapes)
            weight_bytes = 4 * sum(rows * cols for rows, cols in shapes)
            for streams, lever in ((64, "ceiling"), (1, "bandwidth")):
                if not wanted(lever):
                    continue
                inputs = {cols: torch.randn(streams, cols) for cols in {hidden, q_size, inter}}

                def matmuls():
                    for linear in linears:
                        linear(inputs[linear.in_features])

                matmuls()
                seconds = statistics.median(timed(matmuls, 2) for _ in range(3)) / 1e6
                print(f"{lever:10} batch {streams:3}  {flops / 1e6:.0f} MFLOP and {weight_bytes / 1e6:.0f} MB of "
                      f"weights per step, {seconds * 1e3:.1f} ms per step ({streams * flops / seconds / 1e9:.1f} "
                      f"GFLOP/s, {weight_bytes / seconds / 1e9:.1f} GB/s): at most {streams / seconds:.0f} tok/s "
                      f"with nothing else in the step")


if __name__ == "__main__":
    main()
