"""Offline generation for one prompt through the engine, on the CPU:
`python -m scheduler.generate TEXT`.

A chat model (one whose tokenizer has a chat template) gets TEXT as a user message in its chat
template and prints its reply; any other model (or `--no-chat`) continues TEXT and prints it with
its continuation. Either way without the stop token, then, on stderr, why it finished and the
token counts. `--quantization` (default auto) and `--dtype` as on the server."""

from __future__ import annotations

import argparse
import sys

from model.quantization.config import CHOICES as QUANTIZATION_CHOICES
from model.execution.threads import THREADS_HELP, default_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", nargs="?", default="Once upon a time")
    parser.add_argument("--model", default=None,
                        help="Hugging Face directory, .gguf file or installed model name "
                             "(default: bundled stories260K)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=default_threads(), help=THREADS_HELP)
    parser.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES,
                        help="how the linear layers are stored (as on the server; default: auto)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                        help="send the prompt as a user message in the model's chat template (default: when "
                             "the model has one)")
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
    chat = args.chat if args.chat is not None else engine.tokenizer.chat_template is not None
    prompt: str | list[int] = args.prompt
    if chat:
        from server.chat_template import ChatTemplate
        prompt = ChatTemplate(engine.tokenizer).encode([{"role": "user", "content": args.prompt}])
    params = SamplingParams(temperature=args.temperature, seed=args.seed, max_tokens=args.max_tokens)
    [result] = engine.generate([prompt], params, use_tqdm=False)
    completion = result.completions[0]
    token_ids = completion.token_ids[:-1] if completion.finish_reason == "stop" else completion.token_ids
    print(engine.tokenizer.decode(token_ids if chat else result.prompt_token_ids + token_ids))
    print(f"[finish_reason: {completion.finish_reason}, prompt tokens: {len(result.prompt_token_ids)}, "
          f"completion tokens: {len(completion.token_ids)}]", file=sys.stderr)

if __name__ == "__main__":
    main()
