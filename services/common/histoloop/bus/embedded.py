"""The embedded event bus: a durable, append-only log in a local SQLite file.

Events survive a restart; each consumer group keeps its own committed offset per topic;
delivery is at-least-once (a consumer that dies before committing sees its records again).
One global sequence orders the log, so order per key holds trivially. Consumers in the
same process wake up at once on publish; others notice within the poll interval.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from histoloop.bus.base import Consumer, EventBus, Record, check_publish_args, validate_topic
from histoloop.errors import InvalidArgument, Unavailable
from histoloop.metrics import EVENTS_PRODUCED

__all__ = ["EmbeddedBus"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    key TEXT NOT NULL,
    event_id TEXT NOT NULL,
    value BLOB NOT NULL,
    ts_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_topic_seq ON events (topic, seq);
CREATE TABLE IF NOT EXISTS offsets (
    grp TEXT NOT NULL,
    topic TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (grp, topic)
);
"""
_IDLE_POLL = 0.05


class EmbeddedBus(EventBus):
    """Durable event log in ``path`` (a SQLite file, WAL mode)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._published = threading.Condition()
        self._closed = False
        with self._conn() as conn:
            conn.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise Unavailable("the embedded bus is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    def publish(self, topic: str, key: str, value: bytes, *, event_id: str) -> None:
        check_publish_args(topic, key, event_id)
        try:
            self._conn().execute(
                "INSERT INTO events (topic, key, event_id, value, ts_ms) VALUES (?, ?, ?, ?, ?)",
                (topic, key, event_id, bytes(value), int(time.time() * 1000)),
            )
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot append to the event log {self.path}: {exc}") from exc
        EVENTS_PRODUCED.labels(topic=topic).inc()
        with self._published:
            self._published.notify_all()

    def consumer(self, group: str, topics: Sequence[str]) -> Consumer:
        if not group:
            raise InvalidArgument("consumer group must not be empty")
        if not topics:
            raise InvalidArgument("a consumer needs at least one topic")
        return _EmbeddedConsumer(self, group, [validate_topic(t) for t in topics])

    def ping(self) -> None:
        try:
            self._conn().execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise Unavailable(f"event log {self.path} unreadable: {exc}") from exc

    def wait_for_publish(self, timeout: float) -> None:
        """Block until something is published in this process or ``timeout`` passes."""
        with self._published:
            self._published.wait(timeout)

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        self._closed = True


class _EmbeddedConsumer(Consumer):
    def __init__(self, bus: EmbeddedBus, group: str, topics: list[str]) -> None:
        self._bus = bus
        self._group = group
        self._topics = topics
        self._lock = threading.Lock()
        self._position: dict[str, int] = {}
        self._closed = False
        self.seek_to_committed()

    def poll(self, timeout: float = 1.0, max_records: int = 100) -> list[Record]:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            records = self._fetch(max_records)
            remaining = deadline - time.monotonic()
            if records or remaining <= 0 or self._closed:
                return records
            self._bus.wait_for_publish(min(remaining, _IDLE_POLL))

    def _fetch(self, max_records: int) -> list[Record]:
        with self._lock:
            clauses = " OR ".join("(topic = ? AND seq > ?)" for _ in self._topics)
            params: list[object] = []
            for topic in self._topics:
                params += [topic, self._position[topic]]
            rows = (
                self._bus._conn()
                .execute(
                    f"SELECT seq, topic, key, event_id, value, ts_ms FROM events WHERE {clauses} "
                    "ORDER BY seq LIMIT ?",
                    (*params, max_records),
                )
                .fetchall()
            )
            records = [
                Record(
                    topic=t,
                    key=k,
                    value=bytes(v),
                    event_id=e,
                    partition=0,
                    offset=s,
                    timestamp_ms=ts,
                )
                for s, t, k, e, v, ts in rows
            ]
            for rec in records:
                self._position[rec.topic] = rec.offset
            return records

    def commit(self, records: Sequence[Record]) -> None:
        latest: dict[str, int] = {}
        for rec in records:
            latest[rec.topic] = max(latest.get(rec.topic, 0), rec.offset)
        conn = self._bus._conn()
        for topic, seq in latest.items():
            conn.execute(
                "INSERT INTO offsets (grp, topic, seq) VALUES (?, ?, ?) "
                "ON CONFLICT (grp, topic) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                (self._group, topic, seq),
            )

    def lag(self) -> Mapping[str, int]:
        conn = self._bus._conn()
        result = {}
        for topic in self._topics:
            row = conn.execute(
                "SELECT COUNT(*) FROM events WHERE topic = ? AND seq > "
                "COALESCE((SELECT seq FROM offsets WHERE grp = ? AND topic = ?), 0)",
                (topic, self._group, topic),
            ).fetchone()
            result[topic] = int(row[0])
        return result

    def seek_to_committed(self) -> None:
        """Rewind the in-memory position to the committed offsets (redeliver uncommitted)."""
        with self._lock:
            rows = (
                self._bus._conn()
                .execute(
                    f"SELECT topic, seq FROM offsets WHERE grp = ? AND topic IN ({_marks(self._topics)})",
                    (self._group, *self._topics),
                )
                .fetchall()
            )
            committed = dict(rows)
            self._position = {t: committed.get(t, 0) for t in self._topics}

    def close(self) -> None:
        self._closed = True


def _marks(items: Sequence[object]) -> str:
    return ", ".join("?" for _ in items)
