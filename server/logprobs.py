"""Logprobs as the API writes them: the legacy completions object, chat's `logprobs.content`,
vLLM's `prompt_logprobs`, and the bound on how many one request may hold."""

from __future__ import annotations

import dataclasses

from model.sampling_params import SamplingParams
from model.tokenizers.tokenizer import Tokenizer
from scheduler.output_processor import TokenLogprob
from server.errors import APIError

# Logprob entries (the token's and each alternative) one request may hold, prompt and output
# together: about 100 bytes each in memory and in the JSON, so 25-50 MB at most per request.
MAX_LOGPROB_ENTRIES = 2**18


def check_logprob_volume(max_model_len: int, params: SamplingParams, prompt_lengths: list[int]) -> None:
    """Bound the logprobs one request may hold: (k + 1) entries per scored token, the prompt's
    counted once per choice (each of the n choices repeats them)."""
    entries = 0
    if params.prompt_logprobs is not None:
        entries += sum(prompt_lengths) * params.n * (params.prompt_logprobs + 1)
    if params.logprobs is not None:
        longest = max(max_model_len - min(prompt_lengths), 1)
        max_tokens = params.max_tokens if params.max_tokens is not None else min(
            longest, max(params.default_max_tokens or longest, params.min_tokens))
        entries += len(prompt_lengths) * params.n * max_tokens * (params.logprobs + 1)
    if entries > MAX_LOGPROB_ENTRIES:
        raise APIError(400, f"This request asks for {entries} logprobs (tokens x (logprobs + 1), prompt and output "
                            f"together), more than the limit of {MAX_LOGPROB_ENTRIES}: lower max_tokens, n, "
                            "the number of logprobs, or the prompt's length.", param="logprobs")


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """A token's own text; bytes that are not UTF-8 on their own are shown as OpenAI does."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"bytes:\\x{b:02x}" for b in raw)


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[TokenLogprob | None],
                        text_offset: int) -> dict:
    """The legacy completions `logprobs` object for a run of tokens (None: an unscored first
    prompt token)."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    offset = text_offset
    for token_id, entry in zip(token_ids, entries):
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        token_logprobs.append(entry.logprob if entry else None)
        top.append({token_text(tokenizer, t): lp for t, lp in entry.top} if entry else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def with_top(entries: list[TokenLogprob | None], k: int) -> list[TokenLogprob | None]:
    """The entries with their k most likely alternatives only (the engine computed the most any
    part of the request asked for)."""
    return [entry and dataclasses.replace(entry, top=entry.top[:k]) for entry in entries]


def prompt_logprobs_list(tokenizer: Tokenizer, entries: list[TokenLogprob | None] | None, k: int) -> list | None:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first, else {token id: {logprob,
    rank, decoded_token}} for the prompt token and its k most likely alternatives."""
    if entries is None:
        return None

    def position(entry: TokenLogprob | None) -> dict | None:
        if entry is None:
            return None
        ranked = {entry.token_id: (entry.logprob, entry.rank)}
        for rank, (token_id, logprob) in enumerate(entry.top[:k], start=1):
            ranked.setdefault(token_id, (logprob, rank))
        return {str(t): {"logprob": lp, "rank": r, "decoded_token": token_text(tokenizer, t)}
                for t, (lp, r) in ranked.items()}

    return [position(entry) for entry in entries]


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict:
    def item(token_id: int, logprob: float) -> dict:
        return {"token": token_text(tokenizer, token_id), "logprob": logprob,
                "bytes": list(tokenizer.token_bytes(token_id))}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def logprobs_of_text(tokenizer: Tokenizer, entries: list[TokenLogprob], text: str) -> list[TokenLogprob]:
    """The leading entries whose tokens make up `text`: for a reply cut by a stop string, the
    tokens that hold only stop-string text are dropped, so that the logprob tokens join back into
    the content (a token holding both the end of the content and the start of the stop string
    stays). Counted in UTF-8 bytes, which tokens split exactly."""
    kept, size, target = [], 0, len(text.encode("utf-8", "surrogatepass"))
    for entry in entries:
        if size >= target:
            break
        kept.append(entry)
        size += len(tokenizer.token_bytes(entry.token_id))
    return kept
