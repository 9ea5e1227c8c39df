"""Stop strings: the automaton against a brute-force search, its work per character whatever the
number of stop strings, the output processor built on it, and the caps on stop lists."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams, SamplingParamsError
from scheduler.output_processor import OutputProcessor
from scheduler.request import Request
from scheduler.stop_strings import StopStringAutomaton, StopStringMatcher, automaton_for

checked = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))

# A small alphabet, so that stop strings overlap, share prefixes and occur often.
CHARS = st.sampled_from("ab\u00e9\U0001f389")
STOPS = st.lists(st.text(CHARS, min_size=1, max_size=6), min_size=1, max_size=8, unique=True)
CHUNKS = st.lists(st.text(CHARS, max_size=5), max_size=25)


def brute_force_match(stops, text: str, chunk_start: int) -> tuple[str, int] | None:
    """The occurrence ending past `chunk_start` that starts earliest (then the shortest), as
    (stop, end) with `end` counted from `chunk_start`."""
    found = [(start, len(stop), stop) for stop in stops for start in range(len(text) - len(stop) + 1)
             if text.startswith(stop, start) and start + len(stop) > chunk_start]
    if not found:
        return None
    start, length, stop = min(found)
    return stop, start + length - chunk_start


def brute_force_held_length(stops, text: str) -> int:
    """The longest suffix of `text` that is a prefix of a stop string."""
    return max((k for k in range(len(text) + 1) if any(stop.startswith(text[len(text) - k:]) for stop in stops)),
               default=0)


@checked
@given(stops=STOPS, chunks=CHUNKS)
def test_matcher_agrees_with_brute_force(stops, chunks):
    matcher = StopStringMatcher(StopStringAutomaton(tuple(stops)))
    text = ""
    for chunk in chunks:
        chunk_start, text = len(text), text + chunk
        match = matcher.feed(chunk)
        assert (None if match is None else (match.stop, match.end)) == brute_force_match(stops, text, chunk_start)
        assert matcher.held_length == brute_force_held_length(stops, text)


def test_matcher_on_long_seeded_texts():
    rng = random.Random(0)
    for _ in range(30):
        alphabet = "abc"[:rng.randint(1, 3)]
        stops = list({"".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 20))})
        matcher = StopStringMatcher(StopStringAutomaton(tuple(stops)))
        text = ""
        while len(text) < 400:
            chunk = "".join(rng.choices(alphabet, k=rng.randint(0, 7)))
            chunk_start, text = len(text), text + chunk
            match = matcher.feed(chunk)
            assert (None if match is None else (match.stop, match.end)) == brute_force_match(stops, text, chunk_start)
            assert matcher.held_length == brute_force_held_length(stops, text)


def _steps_per_character(stops, text: str) -> float:
    """Trie and failure steps the matcher takes, per character of `text` (fed in chunks of 3)."""
    automaton = StopStringAutomaton(tuple(stops))
    steps = 0

    class CountingFail(list):
        def __getitem__(self, node):
            nonlocal steps
            steps += 1
            return super().__getitem__(node)

    step = automaton.step

    def counting_step(node, char):
        nonlocal steps
        steps += 1
        return step(node, char)

    automaton.fail = CountingFail(automaton.fail)
    automaton.step = counting_step
    matcher = StopStringMatcher(automaton)
    for i in range(0, len(text), 3):
        matcher.feed(text[i:i + 3])
    return steps / len(text)


def test_work_per_character_does_not_grow_with_the_number_of_stop_strings():
    rng = random.Random(1)
    text = "".join(rng.choices("ab", k=5000))
    one = ["".join(rng.choices("ab", k=MAX_STOP_STRING_CHARS))]
    many = one + ["".join(rng.choices("ab", k=rng.randint(1, MAX_STOP_STRING_CHARS)))
                  for _ in range(MAX_STOP_STRINGS - 1)]
    # Long runs of one character that keep matching almost to the end, then fail back.
    runs = [("a" * (MAX_STOP_STRING_CHARS - 1 - i)) + "b" for i in range(MAX_STOP_STRINGS)]
    run_text = ("a" * (MAX_STOP_STRING_CHARS - 2) + "c") * 20
    for stops, sample in [(one, text), (many, text), (runs[:1], run_text), (runs, run_text)]:
        # One trie step per character, and no more failure steps than trie steps before them.
        assert _steps_per_character(stops, sample) <= 2.0


def test_automaton_is_shared_by_requests_with_the_same_stop_strings():
    assert automaton_for(("a", "b")) is automaton_for(("a", "b"))


class _CharTokenizer:
    """Token id i is the text PIECES[i]; a piece of None is a byte-fallback token whose text
    comes out with the next token (as a detokenizer does with a character split over bytes)."""

    def __init__(self, pieces: list[str | None]):
        self.pieces = pieces

    def detokenizer(self, prompt_ids, skip_special_tokens=True):
        return _CharDetokenizer(self.pieces)


class _CharDetokenizer:
    def __init__(self, pieces):
        self.pieces, self.pending = pieces, 0

    def push(self, token_ids):
        text = ""
        for token_id in token_ids:
            if self.pieces[token_id] is None:
                self.pending += 1
            else:
                text += "?" * self.pending + self.pieces[token_id]
                self.pending = 0
        return text

    def flush(self):
        text, self.pending = "?" * self.pending, 0
        return text


def _run(pieces, token_ids, params):
    processor = OutputProcessor(_CharTokenizer(pieces), eos_token_ids=(), max_model_len=10_000)
    request = Request("r", [0], params)
    processor.add(request)
    outputs = []
    for token_id in token_ids:
        outputs.append(processor.process_token(request, token_id, None))
        if outputs[-1].finished:
            break
    return outputs


PIECES = ["a", "b", "ab", "ba", "?", None, "\u00e9"]


@checked
@given(stops=st.lists(st.text(st.sampled_from("ab?\u00e9"), min_size=1, max_size=5), min_size=1, max_size=6,
                      unique=True),
       token_ids=st.lists(st.integers(0, len(PIECES) - 1), min_size=1, max_size=30),
       min_tokens=st.integers(0, 4), include=st.booleans())
def test_output_processor_stops_at_the_earliest_stop_string(stops, token_ids, min_tokens, include):
    params = SamplingParams(max_tokens=len(token_ids), min_tokens=min(min_tokens, len(token_ids)), stop=stops,
                            include_stop_str_in_output=include)
    outputs = _run(PIECES, token_ids, params)
    detok, text = _CharDetokenizer(PIECES), ""
    expected_text, stop = None, None
    for count, token_id in enumerate(token_ids, start=1):
        chunk_start = len(text)
        text += detok.push([token_id])
        match = brute_force_match(stops, text, chunk_start)
        if match is not None and count >= params.min_tokens:
            stop, end = match
            end += chunk_start
            expected_text = text[:end] if include else text[:end - len(stop)]
            break
        # Before it finishes, the client has all but the tail that could begin a stop string.
        assert count <= len(outputs)
        if not outputs[count - 1].finished:
            emitted = "".join(out.text for out in outputs[:count])
            assert emitted == text[:len(text) - brute_force_held_length(stops, text)]
    if stop is None:
        expected_text = text + detok.flush()
    assert "".join(out.text for out in outputs) == expected_text
    assert outputs[-1].finished
    if stop is not None:
        assert (outputs[-1].finish_reason, outputs[-1].stop_reason) == ("stop", stop)
    else:
        assert (outputs[-1].finish_reason, outputs[-1].stop_reason) == ("length", None)


def test_stop_string_spanning_tokens_and_byte_fallback():
    # "é" arrives a token late (byte fallback); the stop string spans three tokens.
    outputs = _run(PIECES, [0, 5, 6, 1, 0, 2], SamplingParams(max_tokens=10, stop=["?\u00e9ba"]))
    assert [out.text for out in outputs] == ["a", "", "", "", ""]
    assert outputs[-1].finished and outputs[-1].stop_reason == "?\u00e9ba"


def test_text_with_no_stop_prefix_is_not_held_back():
    outputs = _run(PIECES, [0, 0, 1], SamplingParams(max_tokens=10, stop=["b" * MAX_STOP_STRING_CHARS]))
    assert [out.text for out in outputs[:2]] == ["a", "a"]  # not held back len(stop) - 1 characters


def test_stop_caps():
    SamplingParams(stop=["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS)  # just under the caps
    with pytest.raises(SamplingParamsError, match=f"at most {MAX_STOP_STRINGS} strings") as too_many:
        SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(SamplingParamsError, match=f"at most {MAX_STOP_STRING_CHARS} characters") as too_long:
        SamplingParams(stop=["x" * (MAX_STOP_STRING_CHARS + 1)])
    assert too_many.value.param == too_long.value.param == "stop"
    assert len(str(too_many.value)) < 200  # the message does not repeat the list
