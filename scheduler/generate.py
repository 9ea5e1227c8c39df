"""Offline generation for one prompt through the engine, on the CPU in float32:
`python -m scheduler.generate TEXT`. Prints the prompt and its completion, without the stop token."""

from __future__ import annotations

import argparse

from model.sampling_params import SamplingParams
from scheduler.engine import Engine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", nargs="?", default="Once upon a time")
    parser.add_argument("--model", default=None,
                        help="Hugging Face directory, .gguf file or installed model name (default: bundled stories260K)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    engine = Engine(args.model, device="cpu", dtype="float32", max_num_seqs=1)  # a pool for one sequence
    params = SamplingParams(temperature=args.temperature, seed=args.seed, max_tokens=args.max_tokens)
    [result] = engine.generate([args.prompt], params, use_tqdm=False)
    completion = result.completions[0]
    token_ids = completion.token_ids[:-1] if completion.finish_reason == "stop" else completion.token_ids
    print(engine.tokenizer.decode(result.prompt_token_ids + token_ids))


if __name__ == "__main__":
    main()
