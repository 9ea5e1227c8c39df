"""Request deadlines: the requests whose time is up, soonest first, checked at each step."""

from __future__ import annotations

import heapq


class Deadlines:
    """A heap of (deadline, request id); a request that ended before its deadline is just
    aborted again when it comes up (a no-op)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []

    def add(self, deadline: float, request_id: str) -> None:
        heapq.heappush(self._heap, (deadline, request_id))

    def expired(self, now: float) -> list[str]:
        """The request ids whose deadline is `now` or earlier, taken off the heap."""
        expired = []
        while self._heap and self._heap[0][0] <= now:
            expired.append(heapq.heappop(self._heap)[1])
        return expired
