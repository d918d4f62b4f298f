"""Progress of long work per (project, dataset), for GetStatus RPCs and CLI bars."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from histoloop.v1 import common_pb2

__all__ = ["ProgressBoard"]


@dataclass
class _Entry:
    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    finished: bool = False
    error: str = ""


class ProgressBoard:
    """Thread-safe progress table; handlers write, status RPCs read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}

    def begin(self, project: str, dataset: str, stage: str) -> None:
        """Start (or restart) tracking a piece of work."""
        with self._lock:
            self._entries[(project, dataset)] = _Entry(stage=stage)

    def update(self, project: str, dataset: str, done: int, total: int, message: str = "") -> None:
        """Record how far the work is."""
        with self._lock:
            entry = self._entries.setdefault((project, dataset), _Entry(stage=""))
            entry.done, entry.total, entry.message = done, total, message or entry.message

    def finish(self, project: str, dataset: str, *, error: str = "") -> None:
        """Mark the work done (or failed with ``error``; it will be retried)."""
        with self._lock:
            entry = self._entries.setdefault((project, dataset), _Entry(stage=""))
            entry.finished, entry.error = not error, error

    def get(self, project: str, dataset: str) -> tuple[common_pb2.Progress, bool, str]:
        """``(progress, done, error)``; unknown work reads as not started."""
        with self._lock:
            entry = self._entries.get((project, dataset))
            if entry is None:
                return common_pb2.Progress(stage="not started"), False, ""
            return (
                common_pb2.Progress(
                    stage=entry.stage, done=entry.done, total=entry.total, message=entry.message
                ),
                entry.finished,
                entry.error,
            )
