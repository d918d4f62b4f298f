"""The label history: every label ever given, read back filtered and paged.

Labels are append-only (``label_events``); this module reads them for the
``ListLabelEvents`` RPC — by dataset, unit (barcode), annotator, batch and time, oldest
first — and lists the label batches behind a label version (what a model was trained
on). Pages are cut by the events' commit sequence, so a page token stays valid while
new labels arrive: the next page simply continues after the last event returned.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select

from histoloop.annotation_store import models as m
from histoloop.annotation_store.db import Database
from histoloop.errors import InvalidArgument, NotFound

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "LabelHistoryEntry",
    "LabelHistoryPage",
    "LabelHistoryQuery",
    "label_batches",
    "list_label_events",
]

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_TOKEN_PREFIX = "after:"


@dataclass(frozen=True)
class LabelHistoryQuery:
    """Which label events to list.

    Attributes:
        project_id: The project.
        dataset_id: One dataset, or "" for all.
        barcode: One unit (spot barcode or tile id), or "" for all.
        annotator_id: One annotator, or "" for all.
        since: Given at or after this instant (None: from the start).
        until: Given before this instant (None: up to now).
        batch_id: One label batch, or "" for all.
        page_size: Events per page (0 = :data:`DEFAULT_PAGE_SIZE`, at most
            :data:`MAX_PAGE_SIZE`).
        page_token: ``next_page_token`` of the previous page, or "" for the first.
    """

    project_id: str
    dataset_id: str = ""
    barcode: str = ""
    annotator_id: str = ""
    since: datetime | None = None
    until: datetime | None = None
    batch_id: str = ""
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class LabelHistoryEntry:
    """One label one annotator gave one unit."""

    sequence: int
    dataset_id: str
    barcode: str
    label: str
    annotator_id: str
    annotator_role: str
    source: str
    batch_id: str
    label_version: int
    created_at: datetime
    queryset_id: str


@dataclass(frozen=True)
class LabelHistoryPage:
    """A page of :class:`LabelHistoryEntry`, oldest first, and the token of the next."""

    entries: tuple[LabelHistoryEntry, ...]
    next_page_token: str


def _token(sequence: int) -> str:
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{sequence}".encode()).decode().rstrip("=")


def _after(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        if not text.startswith(_TOKEN_PREFIX):
            raise ValueError(text)
        after = int(text[len(_TOKEN_PREFIX) :])
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidArgument(f"page_token: {token!r} is not a token this RPC returned") from None
    if after < 0:
        raise InvalidArgument(f"page_token: {token!r} is not a token this RPC returned")
    return after


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


def _check(query: LabelHistoryQuery) -> tuple[int, int]:
    if not query.project_id:
        raise InvalidArgument("project_id is required")
    size = query.page_size or DEFAULT_PAGE_SIZE
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size: {query.page_size} is not in 0..{MAX_PAGE_SIZE}")
    if (
        query.since is not None
        and query.until is not None
        and _utc(query.until) <= _utc(query.since)
    ):
        raise InvalidArgument("until: must be later than since")
    return size, _after(query.page_token)


def list_label_events(db: Database, query: LabelHistoryQuery) -> LabelHistoryPage:
    """A page of the project's label events matching ``query``, oldest first.

    Args:
        db: The annotation store's database.
        query: Filters and paging.

    Returns:
        The page; ``next_page_token`` is empty on the last page.

    Raises:
        InvalidArgument: A bad page size, page token or time range (the field is named).
        NotFound: The project, or a dataset given as a filter, does not exist.
    """
    size, after = _check(query)
    E, B, S, D, C = (
        m.LabelEvent.__table__,
        m.LabelBatch.__table__,
        m.Spot.__table__,
        m.Dataset.__table__,
        m.ProjectClass.__table__,
    )
    stmt = (
        select(
            E.c.id,
            D.c.dataset_id,
            S.c.barcode,
            C.c.name,
            E.c.annotator_id,
            E.c.annotator_role,
            E.c.source,
            B.c.batch_id,
            E.c.label_version,
            E.c.created_at,
            B.c.queryset_id,
        )
        .select_from(
            E.join(B, B.c.id == E.c.batch_pk)
            .join(S, S.c.id == E.c.spot_id)
            .join(D, D.c.id == S.c.dataset_pk)
            .join(C, C.c.id == E.c.class_id)
        )
        .where(E.c.project_id == query.project_id, E.c.id > after)
        .order_by(E.c.id)
        .limit(size + 1)
    )
    if query.dataset_id:
        stmt = stmt.where(D.c.dataset_id == query.dataset_id)
    if query.barcode:
        stmt = stmt.where(S.c.barcode == query.barcode)
    if query.annotator_id:
        stmt = stmt.where(E.c.annotator_id == query.annotator_id)
    if query.batch_id:
        stmt = stmt.where(B.c.batch_id == query.batch_id)
    if query.since is not None:
        stmt = stmt.where(E.c.created_at >= _utc(query.since))
    if query.until is not None:
        stmt = stmt.where(E.c.created_at < _utc(query.until))
    with db.read() as s:
        if s.get(m.Project, query.project_id) is None:
            raise NotFound(f"project {query.project_id!r} not found")
        if (
            query.dataset_id
            and s.scalars(
                select(m.Dataset.id).where(
                    m.Dataset.project_id == query.project_id,
                    m.Dataset.dataset_id == query.dataset_id,
                )
            ).first()
            is None
        ):
            raise NotFound(
                f"dataset {query.dataset_id!r} not found in project {query.project_id!r}"
            )
        rows = s.execute(stmt).all()
    entries = tuple(
        LabelHistoryEntry(
            sequence=int(r[0]),
            dataset_id=r[1],
            barcode=r[2],
            label=r[3],
            annotator_id=r[4],
            annotator_role=r[5],
            source=r[6],
            batch_id=r[7],
            label_version=int(r[8]),
            created_at=_utc(r[9]),
            queryset_id=r[10] or "",
        )
        for r in rows[:size]
    )
    more = len(rows) > size
    return LabelHistoryPage(
        entries=entries, next_page_token=_token(entries[-1].sequence) if more else ""
    )


def label_batches(
    db: Database, project_id: str, up_to_version: int, *, after_version: int = 0
) -> list[tuple[int, str]]:
    """The project's committed label batches with ``after_version < label_version <= up_to_version``.

    Args:
        db: The annotation store's database.
        project_id: The project.
        up_to_version: Newest label version included.
        after_version: Versions up to this one are left out.

    Returns:
        ``(label_version, batch_id)`` in commit order.
    """
    B = m.LabelBatch.__table__
    stmt = (
        select(B.c.label_version, B.c.batch_id)
        .where(
            B.c.project_id == project_id,
            B.c.label_version > after_version,
            B.c.label_version <= up_to_version,
        )
        .order_by(B.c.label_version, B.c.id)
    )
    with db.read() as s:
        return [(int(v), str(b)) for v, b in s.execute(stmt).all()]
