"""Per-token stop-string check: 1 against MAX_STOP_STRINGS stop strings (each MAX_STOP_STRING_CHARS long),
the Aho-Corasick matcher of scheduler/stop_strings.py against a scan that searches every stop
string at every token; interleaved rounds, medians; and the time to build the largest automaton.

    PYTHONPATH=. .venv/bin/python benchmarks/stop_strings.py
"""
import random
import statistics
import time

from model.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from scheduler.stop_strings import StopStringAutomaton, StopStringMatcher

rng = random.Random(0)
words = "the a little girl named Lily wanted to play in the park with her dog and".split()
text = " ".join(rng.choice(words) for _ in range(20000))
tokens = [text[i:i + 4] for i in range(0, len(text), 4)][:4000]  # ~4 characters a token


def stops(k):  # realistic-looking but absent stop strings, each of the longest length
    return [(f"\n### stop {i} " + "x" * MAX_STOP_STRING_CHARS)[:MAX_STOP_STRING_CHARS] for i in range(k)]


def new_check(stop_list):
    matcher = StopStringMatcher(StopStringAutomaton(tuple(stop_list)))
    t0 = time.perf_counter()
    for token in tokens:
        matcher.feed(token)
    return (time.perf_counter() - t0) / len(tokens) * 1e6


def old_check(stop_list):
    keep, held = max(map(len, stop_list)) - 1, ""
    t0 = time.perf_counter()
    for token in tokens:
        held += token
        found = [(held.find(s), s) for s in stop_list]
        found = [f for f in found if f[0] >= 0]
        held = held[max(len(held) - keep, 0):]
    return (time.perf_counter() - t0) / len(tokens) * 1e6


results = {key: [] for key in ["new 1", f"new {MAX_STOP_STRINGS}", "old 1", f"old {MAX_STOP_STRINGS}"]}
build = []
for _ in range(15):
    for k in (1, MAX_STOP_STRINGS):
        results[f"new {k}"].append(new_check(stops(k)))
        results[f"old {k}"].append(old_check(stops(k)))
    distinct = ["".join(rng.choices("abcdefgh", k=MAX_STOP_STRING_CHARS)) for _ in range(MAX_STOP_STRINGS)]
    t0 = time.perf_counter()
    StopStringAutomaton(tuple(distinct))
    build.append((time.perf_counter() - t0) * 1e3)
for key, values in results.items():
    print(f"{key:>7} stop strings: median {statistics.median(values):6.2f} us per token")
print(f"automaton build, {MAX_STOP_STRINGS} x {MAX_STOP_STRING_CHARS} distinct characters: "
      f"median {statistics.median(build):.1f} ms")
