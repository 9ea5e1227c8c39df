"""Finding a request's stop strings in its streamed text, at a cost per character that does not
depend on how many stop strings there are.

An Aho-Corasick automaton: a trie of the stop strings, with failure links to fall back along
when the next character does not extend the current node. The current node is the longest
suffix of the text read so far that is a prefix of some stop string: the text to hold back.
Reading a character takes one trie step plus failure steps; each failure step shortens that
suffix, which only trie steps lengthen, so the steps of a whole text are at most twice its
length, whatever the stop strings.

The automaton is built once for a set of stop strings and shared (the n completions of a
request, or requests with the same stop list); each completion keeps its own StopStringMatcher.
Pure Python: pyahocorasick, the well-kept C library, can go on searching chunk after chunk but
does not expose the current node's depth, the length to hold back; and at about a microsecond a
token this needs no compiled dependency.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class StopMatch:
    stop: str  # the stop string found
    end: int  # where it ends in the text just fed: text[end - len(stop):end], when it lies in it


class StopStringAutomaton:
    """The Aho-Corasick automaton of a set of stop strings (read-only once built).

    Node 0 is the root (the empty string); each other node is a prefix of some stop string.
    """

    def __init__(self, stops: tuple[str, ...]):
        if not stops or not all(stops):
            raise ValueError("stop strings must be non-empty, and at least one")
        self.children: list[dict[str, int]] = [{}]
        self.depth: list[int] = [0]  # the length of the node's prefix
        # match: the longest stop string that is a suffix of the node's prefix (None: none is).
        self.match: list[str | None] = [None]
        for stop in stops:
            node = 0
            for char in stop:
                child = self.children[node].get(char)
                if child is None:
                    child = len(self.children)
                    self.children[node][char] = child
                    self.children.append({})
                    self.depth.append(self.depth[node] + 1)
                    self.match.append(None)
                node = child
            self.match[node] = stop
        # fail: the node of the longest proper suffix of a node's prefix that is also a prefix.
        self.fail: list[int] = [0] * len(self.children)
        queue = deque([0])  # breadth first: a node's failure target is shallower, done before it
        while queue:
            node = queue.popleft()
            if self.match[node] is None:
                self.match[node] = self.match[self.fail[node]]
            for char, child in self.children[node].items():
                if node != 0:
                    self.fail[child] = self.step(self.fail[node], char)
                queue.append(child)

    def step(self, node: int, char: str) -> int:
        """The node after reading `char` at `node`."""
        while char not in self.children[node] and node != 0:
            node = self.fail[node]
        return self.children[node].get(char, 0)


@lru_cache(maxsize=8)
def automaton_for(stops: tuple[str, ...]) -> StopStringAutomaton:
    """The automaton of `stops`, built once for the n completions of a request."""
    return StopStringAutomaton(stops)


class StopStringMatcher:
    """One completion's place in its stop strings' automaton."""

    def __init__(self, automaton: StopStringAutomaton):
        self.automaton = automaton
        self.node = 0

    @property
    def held_length(self) -> int:
        """How many trailing characters of the text fed so far could begin a stop string: the
        longest suffix that is a prefix of one (a whole stop string counts)."""
        return self.automaton.depth[self.node]

    def feed(self, text: str) -> StopMatch | None:
        """Read the next text; the match ending in it that starts earliest (the shortest of
        those that start there), or None. A match may start in text fed before."""
        automaton, node = self.automaton, self.node
        best: StopMatch | None = None
        best_start = 0
        for end, char in enumerate(text, start=1):
            node = automaton.step(node, char)
            stop = automaton.match[node]
            if stop is not None and (best is None or end - len(stop) < best_start):
                best, best_start = StopMatch(stop, end), end - len(stop)
        self.node = node
        return best
