"""Event bus: Kafka in distributed mode, a durable SQLite log in the embedded default."""

from __future__ import annotations

from histoloop.bus.base import Consumer, EventBus, Record, validate_topic
from histoloop.config import Settings

__all__ = ["Consumer", "EventBus", "Record", "make_bus", "validate_topic"]


def make_bus(settings: Settings, *, client_id: str = "histoloop") -> EventBus:
    """The bus backend the settings choose."""
    if settings.bus_backend == "kafka":
        from histoloop.bus.kafka import KafkaBus

        assert settings.kafka_bootstrap is not None  # checked by validate_for_start
        return KafkaBus(
            settings.kafka_bootstrap, topic_prefix=settings.kafka_topic_prefix, client_id=client_id
        )
    from histoloop.bus.embedded import EmbeddedBus

    return EmbeddedBus(settings.data_dir / "events.sqlite")
