"""Per-stage state of the loop and its dead letters, kept in the shared artifact store.

The event worker of each service writes a small record whenever an event of a project
changes state in its stage (``pending`` → ``running`` → ``done``, or ``failed`` while it
is retried, or ``parked`` once no retry can fix it). Records are immutable objects under
``_stages/<project>/<stage>/<dataset or _>/``; the newest per (project, dataset, stage)
is the state. Because every service writes to the same artifact store (a local directory
embedded, MinIO distributed), the annotation store reads every stage's state for
``GetStatus`` whichever process wrote it.

Dead letters (events parked after their retries ran out) live under
``_deadletter/<stage>/<project>/<event id>.json`` with the error and the event's bytes;
:func:`retry_parked` publishes them again under a fresh event id (``RetryStage``) and
leaves a marker so that one parked event is retried once per request.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal

from google.protobuf.message import Message

from histoloop import events
from histoloop.artifacts.base import ArtifactExists, ArtifactStore
from histoloop.bus.base import EventBus, Record
from histoloop.errors import InvalidArgument

__all__ = [
    "STAGES",
    "STAGE_OF_GROUP",
    "STATES",
    "DeadLetter",
    "StageRecord",
    "dead_letter_key",
    "key_part",
    "latest_states",
    "list_dead_letters",
    "park_event",
    "read_states",
    "retry_parked",
    "write_state",
]

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("tiling", "embedding", "training", "prediction", "acquisition")
"""The loop's stages, in order (each is one service's event worker)."""
STAGE_OF_GROUP = {stage: stage for stage in STAGES} | {"annotation_store": "recording"}
"""Consumer group → stage name (the annotation store records query sets)."""
State = Literal["pending", "running", "done", "failed", "parked"]
STATES: tuple[str, ...] = ("pending", "running", "done", "failed", "parked")
_NO_DATASET = "_"
_seq = itertools.count()


@dataclass(frozen=True)
class StageRecord:
    """One state change of a project's stage (per dataset where the event names one)."""

    project: str
    dataset: str
    stage: str
    state: str
    event_id: str
    topic: str = ""
    at_ms: int = 0
    """When the state was entered (ms since the epoch)."""
    attempts: int = 0
    """Failed attempts so far (``failed``, ``parked``)."""
    error: str = ""
    progress: float = 0.0
    """0..1 (1 when done)."""


@dataclass(frozen=True)
class DeadLetter:
    """An event parked for a project and stage, with why."""

    stage: str
    project: str
    event_id: str
    topic: str
    error: str
    attempts: int
    at_ms: int
    retried: bool
    value: bytes

    @property
    def dataset(self) -> str:
        """The dataset the parked event names (empty: project-wide, or it does not parse)."""
        try:
            message = events.decode(
                Record(
                    topic=self.topic,
                    key=self.project,
                    value=self.value,
                    event_id=self.event_id,
                    partition=0,
                    offset=0,
                    timestamp_ms=0,
                )
            )
        except InvalidArgument:
            return ""
        return str(message.meta.dataset)  # type: ignore[attr-defined]


def key_part(part: str) -> str:
    """A key part made of the artifact key alphabet (ids are already; bus keys may not be)."""
    cleaned = "".join(c if c.isalnum() or c in "_.=+@-" else "_" for c in part)[:120]
    return cleaned if cleaned not in ("", ".", "..") else _NO_DATASET


def write_state(store: ArtifactStore, record: StageRecord) -> None:
    """Append ``record`` (its ``at_ms`` set to now if 0) under the project's stage prefix."""
    at = record.at_ms or int(time.time() * 1000)
    record = StageRecord(**{**asdict(record), "at_ms": at})
    key = (
        f"_stages/{key_part(record.project)}/{key_part(record.stage)}/{key_part(record.dataset or _NO_DATASET)}/"
        f"{at:013d}-{next(_seq):06d}-{key_part(record.event_id)}-{record.state}.json"
    )
    try:
        store.put(key, json.dumps(asdict(record)).encode(), content_type="application/json")
    except ArtifactExists:
        pass


def read_states(
    store: ArtifactStore, project: str, *, latest_only: bool = False
) -> Iterator[StageRecord]:
    """The stage records of ``project`` (oldest first per stage and dataset).

    With ``latest_only``, only the newest record of each (stage, dataset) is read: keys sort
    by time, so one listing finds them and only those objects are fetched (GetStatus).
    """
    keys = [info.key for info in store.list(f"_stages/{key_part(project)}/")]
    if latest_only:
        newest: dict[str, str] = {}
        for key in keys:
            folder = key.rsplit("/", 1)[0]
            if key > newest.get(folder, ""):
                newest[folder] = key
        keys = sorted(newest.values())
    for key in keys:
        try:
            yield StageRecord(**json.loads(store.get(key)))
        except (ValueError, TypeError) as exc:
            log.warning("ignoring unreadable stage record %s: %s", key, exc)


def latest_states(records: Iterable[StageRecord]) -> list[StageRecord]:
    """The newest record per (dataset, stage), in stage order then dataset."""
    latest: dict[tuple[str, str], StageRecord] = {}
    for rec in records:
        key = (rec.stage, rec.dataset)
        if key not in latest or rec.at_ms >= latest[key].at_ms:
            latest[key] = rec
    order = {s: i for i, s in enumerate((*STAGES, "recording"))}
    return sorted(latest.values(), key=lambda r: (order.get(r.stage, 99), r.dataset))


def dead_letter_key(stage: str, project: str, event_id: str) -> str:
    """Where a parked event of ``project`` in ``stage`` is kept."""
    return f"_deadletter/{key_part(stage)}/{key_part(project)}/{key_part(event_id)}.json"


def park_event(store: ArtifactStore, stage: str, record: Record, error: str, attempts: int) -> str:
    """Keep ``record`` as a dead letter of its project (the bus key) in ``stage``; its key.

    Writing it twice (a redelivery) keeps the first.
    """
    key = dead_letter_key(stage, record.key, record.event_id)
    if not store.exists(key):
        body = json.dumps(
            {
                "topic": record.topic,
                "key": record.key,
                "event_id": record.event_id,
                "offset": record.offset,
                "error": error,
                "attempts": attempts,
                "at_ms": int(time.time() * 1000),
                "value_hex": record.value.hex(),
            }
        )
        try:
            store.put(key, body.encode(), content_type="application/json")
        except ArtifactExists:
            pass
    return key


def _retried_key(stage: str, project: str, event_id: str) -> str:
    return f"_deadletter_retried/{key_part(stage)}/{key_part(project)}/{key_part(event_id)}"


def list_dead_letters(store: ArtifactStore, project: str, stage: str = "") -> list[DeadLetter]:
    """Parked events of ``project`` (in ``stage`` if given), oldest first."""
    stages = [stage] if stage else list(STAGE_OF_GROUP.values())
    found: list[DeadLetter] = []
    for name in stages:
        for info in store.list(f"_deadletter/{key_part(name)}/{key_part(project)}/"):
            body = json.loads(store.get(info.key))
            found.append(
                DeadLetter(
                    stage=name,
                    project=project,
                    event_id=body["event_id"],
                    topic=body["topic"],
                    error=body.get("error", ""),
                    attempts=int(body.get("attempts", 1)),
                    at_ms=int(body.get("at_ms", 0)),
                    retried=store.exists(_retried_key(name, project, body["event_id"])),
                    value=bytes.fromhex(body.get("value_hex", "")),
                )
            )
    return sorted(found, key=lambda d: d.at_ms)


def retry_parked(
    store: ArtifactStore,
    bus: EventBus,
    project: str,
    stage: str,
    *,
    dataset: str = "",
    producer: str = "annotation_store",
    config: Message | None = None,
) -> list[str]:
    """Publish the parked events of ``project`` in ``stage`` again; returns the new event ids.

    Each is republished once (a marker records it) under an id derived from the parked
    one, so its downstream outputs get fresh ids too, and with ``config`` (the project's
    loop config now, so that a fix made with UpdateProject applies). Events that do not
    parse (there is nothing to re-run) are left parked.

    Raises:
        InvalidArgument: ``stage`` is not a stage.
    """
    if stage not in STAGE_OF_GROUP.values():
        raise InvalidArgument(
            f"stage: {stage!r} is not one of {', '.join(STAGE_OF_GROUP.values())}"
        )
    republished: list[str] = []
    for letter in list_dead_letters(store, project, stage):
        if letter.retried:
            continue
        try:
            message = events.decode(
                Record(
                    topic=letter.topic,
                    key=project,
                    value=letter.value,
                    event_id=letter.event_id,
                    partition=0,
                    offset=0,
                    timestamp_ms=0,
                )
            )
        except InvalidArgument:
            log.info(
                "parked event %s of %s/%s does not parse; left parked",
                letter.event_id,
                project,
                stage,
            )
            continue
        meta = message.meta  # type: ignore[attr-defined]
        if dataset and meta.dataset != dataset:
            continue
        meta.event_id = events.derived_id(letter.event_id, "retry")
        meta.producer = producer
        if config is not None and "config" in message.DESCRIPTOR.fields_by_name:
            message.config.CopyFrom(config)  # type: ignore[attr-defined]
        events.publish(bus, message)  # a concurrent retry publishes the same id: consumers dedupe
        try:
            store.put(
                _retried_key(stage, project, letter.event_id),
                meta.event_id.encode(),
                content_type="text/plain",
            )
        except ArtifactExists:
            pass
        write_state(
            store,
            StageRecord(
                project=project,
                dataset=meta.dataset,
                stage=stage,
                state="pending",
                event_id=meta.event_id,
                topic=letter.topic,
            ),
        )
        republished.append(meta.event_id)
    return republished
