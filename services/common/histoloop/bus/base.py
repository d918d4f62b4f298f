"""The event bus interface: durable, ordered per key, at-least-once, consumer groups.

Two backends share this contract (tests in ``tests/platform/test_bus_contract.py``):
Kafka (kafka-python) for the distributed mode and an embedded durable log in a SQLite
file. Values are opaque bytes here; ``histoloop.events`` maps topics to protobuf types.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from histoloop.errors import InvalidArgument

__all__ = ["Consumer", "EventBus", "Record", "validate_topic"]

_TOPIC = re.compile(r"^[a-z][a-z0-9._-]{0,200}$")


def validate_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid logical topic name, else raise InvalidArgument."""
    if not isinstance(topic, str) or not _TOPIC.match(topic):
        raise InvalidArgument(
            f"invalid topic name {topic!r}: lower-case letters, digits, '.', '_', '-'"
        )
    return topic


@dataclass(frozen=True)
class Record:
    """One event as delivered to a consumer."""

    topic: str
    """Logical topic (without the deployment's prefix), e.g. ``labels.committed``."""
    key: str
    value: bytes
    event_id: str
    partition: int
    offset: int
    timestamp_ms: int


class Consumer(ABC):
    """A member of a consumer group reading some topics.

    ``poll`` advances an in-memory position; ``commit`` stores the group's offset so that a
    restarted consumer resumes after the last committed record (at-least-once delivery).
    """

    @abstractmethod
    def poll(self, timeout: float = 1.0, max_records: int = 100) -> list[Record]:
        """Records after the current position, in order per (topic, partition); may be empty."""

    @abstractmethod
    def commit(self, records: Sequence[Record]) -> None:
        """Mark these records (and everything before them in their partitions) as handled."""

    @abstractmethod
    def lag(self) -> Mapping[str, int]:
        """Records per topic on the bus after the group's committed offset."""

    @abstractmethod
    def seek_to_committed(self) -> None:
        """Rewind the position to the group's committed offsets (redeliver what is uncommitted)."""

    @abstractmethod
    def close(self) -> None:
        """Leave the group; safe to call twice. Uncommitted records are redelivered later."""


class EventBus(ABC):
    """Publish events and create consumers."""

    @abstractmethod
    def publish(self, topic: str, key: str, value: bytes, *, event_id: str) -> None:
        """Append one event durably; returns once the bus has acknowledged it.

        Raises:
            InvalidArgument: bad topic, empty key or event id.
            Unavailable: the bus cannot be reached (after the backend's own retries).
        """

    @abstractmethod
    def consumer(self, group: str, topics: Sequence[str]) -> Consumer:
        """A consumer in ``group`` reading ``topics`` from the group's committed offsets."""

    @abstractmethod
    def ping(self) -> None:
        """Raise :class:`histoloop.errors.Unavailable` if the bus cannot be reached."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release connections; safe to call twice."""


def check_publish_args(topic: str, key: str, event_id: str) -> None:
    """Shared argument checks of :meth:`EventBus.publish`."""
    validate_topic(topic)
    if not key:
        raise InvalidArgument("event key (the project) must not be empty")
    if not event_id:
        raise InvalidArgument("event_id must not be empty")
