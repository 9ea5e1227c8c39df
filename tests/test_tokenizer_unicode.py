"""Unicode edge cases of the tokenizer, drawn by hypothesis over all of Unicode.

Every property runs on the bundled SentencePiece model (byte fallback, remove_extra_whitespaces)
with a fixed seed; `SINKSERVE_UNICODE_EXAMPLES` (default 300) sets how many texts each draws.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.checkpoints.model_path import BUNDLED_MODEL_DIR
from model.sampling_params import SamplingParams
from model.tokenizers.sentencepiece_tokenizer import SentencePieceDetokenizer, SentencePieceTokenizer
from scheduler.output_processor import OutputProcessor
from scheduler.request import Request

EXAMPLES = int(os.environ.get("SINKSERVE_UNICODE_EXAMPLES", "300"))
checked = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))

TOK = SentencePieceTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
META = "\u2581"  # SentencePiece's word-boundary symbol: in input text it reads as a space

# Any character but surrogates (not text; see the surrogate test), including controls, NUL,
# format characters (ZWJ, bidi overrides, BOM), combining marks, private use, noncharacters and
# the astral planes.
CHAR = st.characters(blacklist_categories=("Cs",))
WORD = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters=" " + META),
               min_size=1, max_size=8)
EDGES = ["\x00", "\ufeff", "\u200d", "\u202e", "\u2028", "\ufffd", "\uffff", "\U0010ffff", "\U0001f469\u200d\U0001f4bb",
         "e\u0301", "\u0627\u0644", "\t", "\r\n", "\x7f", "\x1b[31m", "\U000e0041"]


def normalise(text: str) -> str:
    """What SentencePiece keeps of a text here: "▁" is a space, runs of spaces become one,
    leading and trailing spaces go."""
    return " ".join(word for word in text.replace(META, " ").split(" ") if word)


@checked
@given(st.lists(WORD | st.sampled_from(EDGES), min_size=1, max_size=6))
def test_text_without_space_runs_round_trips(words):
    text = " ".join(words)
    assert TOK.decode(TOK.encode(text)) == text


@checked
@given(st.text(alphabet=CHAR, max_size=40))
def test_any_text_decodes_to_its_normalised_form(text):
    assert TOK.decode(TOK.encode(text)) == normalise(text)


@checked
@given(st.lists(st.text(alphabet=CHAR, max_size=6) | st.sampled_from(["\ud800", "\udfff", "\udc00\ud83d"]),
                max_size=8))
def test_lone_surrogates_read_as_replacement_characters(parts):
    """JSON may carry lone surrogates ("\\ud800"): they are read as U+FFFD, never an error."""
    text = "".join(parts)
    ids = TOK.encode(text)
    replaced = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    assert TOK.decode(ids) == normalise(replaced)


@checked
@given(st.lists(WORD | st.sampled_from(EDGES), min_size=1, max_size=8), st.data())
def test_streaming_any_text_in_any_chunks_equals_the_full_decode(words, data):
    """Prompt/output split and chunk sizes drawn at random: the deltas add up to the full
    decode's new text, and no delta shows a half character (U+FFFD) the text does not have."""
    ids = TOK.encode(" ".join(words))
    split = data.draw(st.integers(0, len(ids)), label="prompt length")
    prompt, output = ids[:split], ids[split:]
    detok = SentencePieceDetokenizer(TOK, prompt)
    deltas, i = [], 0
    while i < len(output):
        size = data.draw(st.integers(1, 4), label="chunk")
        deltas.append(detok.push(output[i:i + size]))
        i += size
    deltas.append(detok.flush())
    full, before = TOK.decode(ids), TOK.decode(prompt)
    if full.startswith(before):
        assert "".join(deltas) == full[len(before):]
    if "\ufffd" not in full:
        assert all("\ufffd" not in delta for delta in deltas)


@checked
@given(st.lists(WORD | st.sampled_from(EDGES), min_size=2, max_size=8), st.data())
def test_unicode_stop_strings_cut_the_output_at_their_first_occurrence(words, data):
    """A stop string of any characters (emoji, combining marks, controls), wherever tokens
    split it: the output is exactly the text before its first occurrence."""
    ids = TOK.encode(" ".join(words), add_bos=False)
    full = TOK.decode(ids)
    start = data.draw(st.integers(0, len(full) - 1), label="stop start")
    stop = full[start:start + data.draw(st.integers(1, 4), label="stop length")]
    params = SamplingParams(max_tokens=len(ids), stop=[stop], ignore_eos=True)
    request = Request("r", [TOK.bos_token_id], params)
    processor = OutputProcessor(TOK, (TOK.eos_token_id,), max_model_len=4096)
    processor.add(request)
    text = ""
    for token_id in ids:
        out = processor.process_token(request, token_id, None)
        text += out.text
        if out.finished:
            break
    assert out.finished and out.finish_reason == "stop" and out.stop_reason == stop
    assert text == full[:full.find(stop)]


@pytest.mark.parametrize("edge", EDGES)
def test_edge_characters_stream_whole(edge):
    """Each edge character alone and between words, streamed a token at a time."""
    for text in (edge, f"Once {edge} upon", f"{edge}{edge}"):
        ids = TOK.encode(text)
        detok = SentencePieceDetokenizer(TOK, ids[:1])
        streamed = "".join(detok.push([t]) for t in ids[1:]) + detok.flush()
        assert streamed == TOK.decode(ids) == normalise(text)
