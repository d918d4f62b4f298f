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
            settings.kafka_bootstrap,
            topic_prefix=settings.kafka_topic_prefix,
            client_id=client_id,
            api_version=settings.kafka_api_version,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(100, settings.kafka_session_timeout_ms // 10),
            max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
        )
    from histoloop.bus.embedded import EmbeddedBus

    return EmbeddedBus(settings.data_dir / "events.sqlite")
