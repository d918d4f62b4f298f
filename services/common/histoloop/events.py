"""The loop's events: one protobuf type per topic, ids, and typed publish/decode.

Handlers must be idempotent. Output ids are *derived* from the input event id
(:func:`derived_id`), so a handler that is re-run after a crash publishes the same
event id again and every downstream consumer drops the repeat.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from histoloop.bus.base import EventBus, Record
from histoloop.errors import InvalidArgument
from histoloop.v1 import common_pb2, events_pb2

__all__ = [
    "DATASET_REGISTERED",
    "EMBEDDINGS_READY",
    "LABELS_COMMITTED",
    "MODEL_TRAINED",
    "PREDICTIONS_READY",
    "QUERYSET_READY",
    "TILES_READY",
    "TOPICS",
    "decode",
    "derived_id",
    "new_meta",
    "publish",
    "topic_of",
]

DATASET_REGISTERED = "dataset.registered"
TILES_READY = "tiles.ready"
EMBEDDINGS_READY = "embeddings.ready"
LABELS_COMMITTED = "labels.committed"
MODEL_TRAINED = "model.trained"
PREDICTIONS_READY = "predictions.ready"
QUERYSET_READY = "queryset.ready"

TOPICS: Mapping[str, type[Message]] = {
    DATASET_REGISTERED: events_pb2.DatasetRegistered,
    TILES_READY: events_pb2.TilesReady,
    EMBEDDINGS_READY: events_pb2.EmbeddingsReady,
    LABELS_COMMITTED: events_pb2.LabelsCommitted,
    MODEL_TRAINED: events_pb2.ModelTrained,
    PREDICTIONS_READY: events_pb2.PredictionsReady,
    QUERYSET_READY: events_pb2.QuerySetReady,
}
_BY_TYPE = {cls.DESCRIPTOR.full_name: topic for topic, cls in TOPICS.items()}
_NAMESPACE = uuid.UUID("6f1c1f0e-5d43-4a8e-9a43-6b1f4f1f2d10")


def derived_id(parent_event_id: str, step: str) -> str:
    """A deterministic event id for what ``step`` produces from ``parent_event_id``."""
    return str(uuid.uuid5(_NAMESPACE, f"{parent_event_id}/{step}"))


def new_meta(
    *,
    project: str,
    dataset: str = "",
    producer: str,
    event_id: str | None = None,
    source_versions: Mapping[str, str] | None = None,
    trace_id: str = "",
) -> common_pb2.EventMeta:
    """An event header with a fresh (or the given derived) id and the current time."""
    created = Timestamp()
    created.GetCurrentTime()
    return common_pb2.EventMeta(
        event_id=event_id or str(uuid.uuid4()),
        project=project,
        dataset=dataset,
        source_versions=dict(source_versions or {}),
        created_at=created,
        producer=producer,
        trace_id=trace_id,
    )


def topic_of(message: Message) -> str:
    """The topic a message type travels on."""
    try:
        return _BY_TYPE[message.DESCRIPTOR.full_name]
    except KeyError:
        raise InvalidArgument(f"{message.DESCRIPTOR.full_name} is not an event type") from None


def publish(bus: EventBus, message: Message) -> str:
    """Publish an event on its topic, keyed by its project; returns its event id."""
    meta = message.meta  # type: ignore[attr-defined]
    if not meta.event_id or not meta.project:
        raise InvalidArgument("event meta needs event_id and project")
    bus.publish(
        topic_of(message), meta.project, message.SerializeToString(), event_id=meta.event_id
    )
    return str(meta.event_id)


def decode(record: Record) -> Message:
    """Parse a record's value into its topic's message type.

    Raises:
        InvalidArgument: unknown topic or bytes that do not parse.
    """
    cls = TOPICS.get(record.topic)
    if cls is None:
        raise InvalidArgument(f"no event type for topic {record.topic!r}")
    message = cls()
    try:
        message.ParseFromString(record.value)
    except DecodeError as exc:
        raise InvalidArgument(
            f"event {record.event_id} on {record.topic} does not parse: {exc}"
        ) from exc
    return message
