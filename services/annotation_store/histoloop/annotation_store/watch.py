"""In-process wake-ups for ``WatchQuerySets`` streams.

The event handler that records a query set calls :meth:`QuerySetHub.notify`; every open
stream wakes, reads the query sets it has not sent yet from the database and sends them.
Streams also re-read the database every few seconds, so a query set recorded by another
replica reaches them too.
"""

from __future__ import annotations

import threading

__all__ = ["QuerySetHub"]


class QuerySetHub:
    """A sequence counter with a condition: "something new may be in the database"."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seq = 0
        self._closed = False

    @property
    def seq(self) -> int:
        """The current notification sequence number."""
        with self._cond:
            return self._seq

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (streams end)."""
        return self._closed

    def notify(self, project_id: str = "") -> None:
        """Wake every waiting stream (``project_id`` is informational)."""
        del project_id
        with self._cond:
            self._seq += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        """Block until the sequence moves past ``seen``, the hub closes or ``timeout`` passes."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq != seen or self._closed, timeout)
            return self._seq

    def close(self) -> None:
        """Wake every stream for good (server shutdown); safe to call twice."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
