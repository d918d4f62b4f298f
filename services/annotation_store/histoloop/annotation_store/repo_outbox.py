"""The repository's outbox room: the rows the relay publishes, and the relay lock.

Rows are written by the other rooms in the transaction of the change they announce
(:meth:`~.repo_base.RepositoryBase._add_outbox`, the label commit's prebuilt statement);
the relay (:mod:`.outbox`) reads them here, oldest first, and marks them published.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import func, select, text, update

from histoloop.annotation_store import models as m
from histoloop.annotation_store.repo_base import RepositoryBase, _now

__all__ = ["OutboxMixin", "OutboxRow"]

_RELAY_LOCK = 0x68697375  # PostgreSQL advisory lock key of the outbox relay


@dataclass(frozen=True)
class OutboxRow:
    """An unpublished outbox row."""

    id: int
    project_id: str
    topic: str
    event_id: str
    payload: bytes
    label_version: int | None
    attempts: int


class OutboxMixin(RepositoryBase):
    """The unpublished outbox rows and the relay's lock."""

    def pending_outbox(self, limit: int = 100) -> list[OutboxRow]:
        """Unpublished outbox rows, oldest first."""
        ob = m.Outbox.__table__
        with self.db.read() as s:
            rows = s.execute(
                select(
                    ob.c.id,
                    ob.c.project_id,
                    ob.c.topic,
                    ob.c.event_id,
                    ob.c.payload,
                    ob.c.label_version,
                    ob.c.attempts,
                )
                .where(ob.c.published_at.is_(None))
                .order_by(ob.c.id)
                .limit(limit)
            ).all()
        return [
            OutboxRow(
                id=r.id,
                project_id=r.project_id,
                topic=r.topic,
                event_id=r.event_id,
                payload=bytes(r.payload),
                label_version=r.label_version,
                attempts=r.attempts,
            )
            for r in rows
        ]

    def mark_published(self, row_ids: Sequence[int]) -> None:
        """Mark outbox rows published (idempotent)."""
        if not row_ids:
            return
        ob = m.Outbox.__table__
        with self.db.write() as s:
            s.execute(
                update(ob)
                .where(ob.c.id.in_(list(row_ids)), ob.c.published_at.is_(None))
                .values(published_at=_now())
            )

    def record_outbox_failure(self, row_id: int, error: str) -> None:
        """Count a failed publish attempt and keep its error for operators."""
        ob = m.Outbox.__table__
        with self.db.write() as s:
            s.execute(
                update(ob)
                .where(ob.c.id == row_id)
                .values(attempts=ob.c.attempts + 1, last_error=error[:2000])
            )

    @contextmanager
    def relay_lock(self) -> Iterator[bool]:
        """Whether this process may relay now: on PostgreSQL one replica at a time (advisory lock)."""
        if self.db.dialect != "postgresql":
            yield True
            return
        with self.db.engine.connect() as conn:
            held = bool(
                conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _RELAY_LOCK}).scalar()
            )
            conn.commit()
            try:
                yield held
            finally:
                if held:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _RELAY_LOCK})
                    conn.commit()

    def pending_count(self) -> int:
        """Outbox rows not yet published (all projects)."""
        with self.db.read() as s:
            return int(
                s.scalar(
                    select(func.count())
                    .select_from(m.Outbox)
                    .where(m.Outbox.published_at.is_(None))
                )
                or 0
            )
