"""Offline generation for one prompt through the engine, on the CPU:
`python -m scheduler.generate TEXT`. Prints the prompt and its completion, without the stop token.
`--quantization` (default auto) and `--dtype` as on the server."""

from __future__ import annotations

import argparse

from model.quantization.config import CHOICES as QUANTIZATION_CHOICES
from model.threads import THREADS_HELP, default_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", nargs="?", default="Once upon a time")
    parser.add_argument("--model", default=None,
                        help="Hugging Face directory, .gguf file or installed model name (default: bundled stories260K)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=default_threads(), help=THREADS_HELP)
    parser.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES,
                        help="how the linear layers are stored (as on the server; default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    return parser.parse_args(argv)


def set_threads(threads: int) -> None:
    """torch's CPU thread count: `threads`, or torch's own choice for 0 (the server's --threads too)."""
    import torch
    if threads:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)

    from model.sampling_params import SamplingParams
    from scheduler.engine import Engine

    engine = Engine(args.model, device="cpu", dtype=args.dtype, max_num_seqs=1,  # a pool for one sequence
                    quantization=args.quantization)
    params = SamplingParams(temperature=args.temperature, seed=args.seed, max_tokens=args.max_tokens)
    [result] = engine.generate([args.prompt], params, use_tqdm=False)
    completion = result.completions[0]
    token_ids = completion.token_ids[:-1] if completion.finish_reason == "stop" else completion.token_ids
    print(engine.tokenizer.decode(result.prompt_token_ids + token_ids))


if __name__ == "__main__":
    main()
