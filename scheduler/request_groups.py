"""A request's n completions: the parent and, once its prompt is computed, the n - 1 it forks.

The engine answers to a request id (the group id) for all of its completions at once: an abort
or a failure ends every one, and the id is free again only when every one has finished.
"""

from __future__ import annotations

from scheduler.request import Request


class RequestGroups(dict[str, list[Request]]):
    """Group id -> its completions, the parent first."""

    def add(self, request: Request) -> None:
        self[request.group_id] = [request]

    def add_fork(self, child: Request) -> None:
        self[child.group_id].append(child)

    def drop_fork(self, child: Request) -> None:
        self[child.group_id].remove(child)

    def drop_finished(self, group_ids: set[str]) -> None:
        """Forget the groups among these whose completions have all finished."""
        for group_id in group_ids:
            if all(r.is_finished for r in self.get(group_id, [])):
                self.pop(group_id, None)
