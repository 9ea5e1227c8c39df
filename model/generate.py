"""Offline generation for one prompt through the paged model: `python -m model.generate TEXT`."""

from __future__ import annotations

import argparse

import torch

from model.attention import AttentionMetadata
from model.loader import load_model
from model.model_path import resolve_model_path
from model.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("prompt", nargs="?", default="Once upon a time")
    parser.add_argument("--model", default=None,
                        help="Hugging Face directory, .gguf file or installed model name (default: bundled stories260K)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model_path = resolve_model_path(args.model)
    tokenizer = Tokenizer.from_pretrained(model_path)
    model = load_model(model_path)
    stop_ids = {*model.config.eos_token_ids, tokenizer.eos_token_id, *tokenizer.end_of_generation_ids}
    prompt = tokenizer.encode(args.prompt)
    block_size = 16
    total = len(prompt) + args.max_tokens
    num_blocks = -(-total // block_size)
    kv_caches = model.allocate_kv_cache(num_blocks, block_size)
    table = list(range(num_blocks))

    tokens, new = list(prompt), list(prompt)
    for _ in range(args.max_tokens):
        meta = AttentionMetadata.build([len(new)], [len(tokens)], [table], block_size)
        with torch.no_grad():
            logits = model.compute_logits(model(torch.tensor(new), meta, kv_caches)[-1:])[0]
        if args.temperature > 0:
            next_id = int(torch.multinomial(torch.softmax(logits / args.temperature, -1), 1))
        else:
            next_id = int(logits.argmax())
        if next_id in stop_ids:
            break
        tokens.append(next_id)
        new = [next_id]
    print(tokenizer.decode(tokens))


if __name__ == "__main__":
    main()
