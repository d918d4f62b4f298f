"""The Kafka backend of the event bus (kafka-python).

Wire format: topic ``topic_prefix + topic`` (``histoloop.labels.committed``), key = the
project (UTF-8), value = the event bytes, header ``event_id``. Kafka's default
partitioner hashes the key, so one project's events land in one partition and stay in
order; different projects spread over partitions.

Producer: ``acks="all"`` and, by default, the idempotent producer, so broker-side
retries never duplicate or reorder a record. :meth:`KafkaBus.publish` blocks until the
broker has acknowledged the record; when it gives up (``publish_timeout``) it raises
:class:`~histoloop.errors.Unavailable`. A record that timed out may still have been
written — delivery is at-least-once and consumers drop repeats by event id.

Consumers join a group with auto-commit off and ``auto_offset_reset="earliest"``: a new
group reads each topic from its beginning, a restarted member resumes after the group's
committed offsets, and anything polled but not committed is delivered again.

Topics are created on first use by the broker's auto-create (a metadata request for an
unknown topic, sent by both the producer and a subscribing consumer, creates it); no
admin API is needed, which also keeps librdkafka's mock cluster usable in tests. In
production, create the topics ahead (partitions, replication) and leave auto-create as
a fallback.

A :class:`Consumer` is not thread-safe in kafka-python; ours serialise calls with a
lock, but the intended use is one consumer per worker thread.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka import errors as kafka_errors
from kafka.structs import OffsetAndMetadata, TopicPartition

from histoloop.bus.base import Consumer, EventBus, Record, check_publish_args, validate_topic
from histoloop.errors import InvalidArgument, Unavailable
from histoloop.metrics import CONSUMER_LAG, EVENTS_PRODUCED

__all__ = ["KafkaBus"]

log = logging.getLogger(__name__)

_PREFIX = re.compile(r"^[A-Za-z0-9._-]{0,40}$")
_EVENT_ID_HEADER = "event_id"


class KafkaBus(EventBus):
    """The event bus on a Kafka cluster.

    Nothing connects in the constructor: the producer is created on the first
    :meth:`publish` or :meth:`ping`, so a service can start before the broker and wait
    for it with :meth:`ping` (which raises :class:`~histoloop.errors.Unavailable`).

    Args:
        bootstrap: bootstrap servers, ``host:port[,host:port…]``.
        topic_prefix: prepended to every logical topic on the wire (deployment namespace).
        client_id: the client id brokers log and quota by (the service name).
        api_version: the broker protocol version kafka-python assumes, e.g. ``(2, 3)`` or
            ``"2.3"``; ``None`` probes the broker at connect. Pinning skips the probe (so
            creating a client never blocks on a down broker) and caps the request versions
            used. librdkafka's mock cluster needs ``(2, 3)``: it advertises LeaveGroup v4
            but mis-parses v3, so with the probed version a leaving consumer is not
            removed and the next member waits a whole session timeout to join.
        publish_timeout: seconds :meth:`publish` waits for the acknowledgement (metadata
            for a new topic included) before raising Unavailable.
        idempotent: use the idempotent producer (needs brokers >= 0.11; librdkafka's mock
            cluster supports it).
        session_timeout_ms: a consumer that sends no heartbeat for this long is
            considered dead and its partitions are reassigned.
        heartbeat_interval_ms: how often consumers heartbeat (about a third of the session).
        max_poll_interval_ms: the longest a consumer may take between two polls (i.e. to
            handle one batch) before it is removed from its group.
        request_timeout_ms: how long a consumer waits for any broker response; must
            exceed ``max_poll_interval_ms`` because the coordinator may hold a JoinGroup
            that long (default: ``max_poll_interval_ms + 5000``, as kafka-python does).
        operation_timeout_ms: the bound on :meth:`Consumer.commit`, :meth:`Consumer.lag`
            and leaving the group, so an outage surfaces as Unavailable in seconds.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        topic_prefix: str = "histoloop.",
        client_id: str = "histoloop",
        api_version: tuple[int, ...] | str | None = None,
        publish_timeout: float = 30.0,
        idempotent: bool = True,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        max_poll_interval_ms: int = 300_000,
        request_timeout_ms: int | None = None,
        operation_timeout_ms: int = 10_000,
    ) -> None:
        servers = [s.strip() for s in bootstrap.split(",") if s.strip()]
        if not servers:
            raise InvalidArgument("Kafka bootstrap servers must not be empty")
        if not _PREFIX.match(topic_prefix):
            raise InvalidArgument(
                f"invalid Kafka topic prefix {topic_prefix!r}: use [A-Za-z0-9._-]"
            )
        if publish_timeout <= 0:
            raise InvalidArgument("publish_timeout must be positive")
        self.bootstrap = ",".join(servers)
        self.topic_prefix = topic_prefix
        self.client_id = client_id
        self.api_version = _parse_api_version(api_version)
        self.publish_timeout = publish_timeout
        self._servers = servers
        self._idempotent = idempotent
        self._consumer_timing = {
            "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": heartbeat_interval_ms,
            "max_poll_interval_ms": max_poll_interval_ms,
            "request_timeout_ms": request_timeout_ms
            or max(max_poll_interval_ms, session_timeout_ms) + 5_000,
        }
        # kafka-python refuses a consumer whose request timeout is not below the idle-connection
        # limit (default 9 min); long handlers (max_poll_interval_ms = 30 min) need it raised
        self._consumer_timing["connections_max_idle_ms"] = max(
            540_000, self._consumer_timing["request_timeout_ms"] + 60_000
        )
        self.operation_timeout_ms = operation_timeout_ms
        self._lock = threading.Lock()
        self._producer_instance: KafkaProducer | None = None
        self._consumers: weakref.WeakSet[_KafkaConsumer] = weakref.WeakSet()
        self._closed = False

    # helpers --------------------------------------------------------------------------
    def wire_topic(self, topic: str) -> str:
        """The topic name on the broker for a logical ``topic``."""
        return self.topic_prefix + validate_topic(topic)

    def logical_topic(self, wire_topic: str) -> str:
        """The logical topic of a broker topic name (the prefix removed)."""
        return (
            wire_topic[len(self.topic_prefix) :]
            if wire_topic.startswith(self.topic_prefix)
            else wire_topic
        )

    def _unavailable(self, what: str, exc: BaseException | str) -> Unavailable:
        return Unavailable(f"Kafka at {self.bootstrap}: {what}: {exc}")

    def _common_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "bootstrap_servers": self._servers,
            "client_id": self.client_id,
            "reconnect_backoff_ms": 50,
            "reconnect_backoff_max_ms": 1_000,
            "api_version_auto_timeout_ms": int(min(self.publish_timeout, 5.0) * 1000),
        }
        if self.api_version is not None:
            config["api_version"] = self.api_version
        return config

    def _producer(self) -> KafkaProducer:
        with self._lock:
            if self._closed:
                raise Unavailable(f"the Kafka bus ({self.bootstrap}) is closed")
            if self._producer_instance is None:
                timeout_ms = int(self.publish_timeout * 1000)
                request_timeout_ms = max(min(timeout_ms // 2, 30_000), 500)
                try:
                    self._producer_instance = KafkaProducer(
                        **self._common_config(),
                        acks="all",
                        enable_idempotence=self._idempotent,
                        linger_ms=0,
                        max_block_ms=timeout_ms,
                        request_timeout_ms=request_timeout_ms,
                        delivery_timeout_ms=max(timeout_ms, request_timeout_ms),
                    )
                except kafka_errors.KafkaError as exc:
                    raise self._unavailable("cannot connect the producer", exc) from exc
            return self._producer_instance

    # EventBus --------------------------------------------------------------------------
    def publish(self, topic: str, key: str, value: bytes, *, event_id: str) -> None:
        check_publish_args(topic, key, event_id)
        wire = self.wire_topic(topic)
        deadline = time.monotonic() + self.publish_timeout
        producer = self._producer()
        try:
            future = producer.send(
                wire,
                key=key.encode("utf-8"),
                value=bytes(value),
                headers=[(_EVENT_ID_HEADER, event_id.encode("utf-8"))],
            )
            future.get(timeout=max(deadline - time.monotonic(), 0.1) + 1.0)
        except kafka_errors.MessageSizeTooLargeError as exc:
            raise InvalidArgument(
                f"event {event_id} on {topic} is too large for Kafka: {exc}"
            ) from exc
        except kafka_errors.KafkaError as exc:
            raise self._unavailable(f"publishing event {event_id} to {wire} failed", exc) from exc
        EVENTS_PRODUCED.labels(topic=topic).inc()

    def consumer(self, group: str, topics: Sequence[str]) -> Consumer:
        if not group:
            raise InvalidArgument("consumer group must not be empty")
        if not topics:
            raise InvalidArgument("a consumer needs at least one topic")
        logical = [validate_topic(t) for t in topics]
        if self._closed:
            raise Unavailable(f"the Kafka bus ({self.bootstrap}) is closed")
        consumer = _KafkaConsumer(self, group, logical)
        self._consumers.add(consumer)
        return consumer

    def consumer_config(self, group: str) -> dict[str, Any]:
        """The kafka-python settings of a consumer in ``group`` (for tests and tooling)."""
        return {
            **self._common_config(),
            **self._consumer_timing,
            "group_id": group,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "allow_auto_create_topics": True,
            "fetch_max_wait_ms": 200,
            "retry_backoff_ms": 100,
            "metadata_max_age_ms": 30_000,
        }

    def ping(self, timeout: float = 2.0) -> None:
        """Refresh cluster metadata within ``timeout`` seconds or raise Unavailable."""
        producer = self._producer()
        done = threading.Event()
        # kafka-python's own pattern (KafkaProducer._wait_on_metadata): ask the sender
        # thread for a metadata refresh and wait for the response.
        future = producer._metadata.request_update()
        future.add_both(lambda *_: done.set())
        producer._sender.wakeup()
        if not done.wait(timeout):
            raise self._unavailable("no metadata response", f"within {timeout:.1f}s")
        if future.failed():
            raise self._unavailable("metadata request failed", future.exception)

    def close(self) -> None:
        """Close the consumers made by this bus (they leave their groups) and the producer."""
        with self._lock:
            producer, self._producer_instance = self._producer_instance, None
            consumers = list(self._consumers)
            self._closed = True
        for consumer in consumers:
            consumer.close()
        if producer is not None:
            try:
                producer.close(timeout=min(self.publish_timeout, 2.0))
            except kafka_errors.KafkaError as exc:
                log.warning("closing the Kafka producer (%s) failed: %s", self.bootstrap, exc)


def _parse_api_version(value: tuple[int, ...] | str | None) -> tuple[int, ...] | None:
    if value is None or value == "":
        return None
    try:
        parts = tuple(int(p) for p in value.split(".")) if isinstance(value, str) else tuple(value)
    except ValueError:
        raise InvalidArgument(f"invalid Kafka api_version {value!r}: use e.g. '2.3'") from None
    if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts):
        raise InvalidArgument(f"invalid Kafka api_version {value!r}: use e.g. '2.3'")
    return parts


class _KafkaConsumer(Consumer):
    def __init__(self, bus: KafkaBus, group: str, topics: list[str]) -> None:
        self._bus = bus
        self._group = group
        self._topics = topics
        self._lock = threading.RLock()
        self._closed = False
        self._timeout_ms = bus.operation_timeout_ms
        try:
            self._consumer = KafkaConsumer(**bus.consumer_config(group))
            self._consumer.subscribe([bus.wire_topic(t) for t in topics])
        except kafka_errors.KafkaError as exc:
            raise bus._unavailable(f"cannot start a consumer in group {group!r}", exc) from exc

    def poll(self, timeout: float = 1.0, max_records: int = 100) -> list[Record]:
        with self._lock:
            if self._closed:
                return []
            try:
                batches = self._consumer.poll(
                    timeout_ms=int(max(timeout, 0.0) * 1000), max_records=max_records
                )
            except kafka_errors.KafkaError as exc:
                raise self._bus._unavailable(f"poll in group {self._group!r} failed", exc) from exc
        records: list[Record] = []
        for tp, messages in batches.items():
            topic = self._bus.logical_topic(tp.topic)
            for msg in messages:
                headers = dict(msg.headers or [])
                raw_id = headers.get(_EVENT_ID_HEADER)
                records.append(
                    Record(
                        topic=topic,
                        key=msg.key.decode("utf-8", "replace") if msg.key is not None else "",
                        value=bytes(msg.value) if msg.value is not None else b"",
                        event_id=raw_id.decode("utf-8", "replace")
                        if raw_id
                        else f"{tp.topic}/{tp.partition}/{msg.offset}",
                        partition=tp.partition,
                        offset=msg.offset,
                        timestamp_ms=msg.timestamp,
                    )
                )
        return records

    def commit(self, records: Sequence[Record]) -> None:
        """Commit offset + 1 of the last record per partition (everything before it too).

        Raises:
            Unavailable: the commit did not reach the broker, or the group rebalanced
                and these partitions belong to another member now; either way the
                records will be delivered again.
        """
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for rec in records:
            tp = TopicPartition(self._bus.wire_topic(rec.topic), rec.partition)
            current = offsets.get(tp)
            if current is None or rec.offset + 1 > current.offset:
                offsets[tp] = OffsetAndMetadata(rec.offset + 1, "", -1)
        if not offsets:
            return
        with self._lock:
            if self._closed:
                raise Unavailable(f"consumer in group {self._group!r} is closed; cannot commit")
            try:
                self._consumer.commit(offsets, timeout_ms=self._timeout_ms)
            except kafka_errors.KafkaError as exc:
                raise self._bus._unavailable(
                    f"commit in group {self._group!r} failed (records will be redelivered)", exc
                ) from exc

    def lag(self) -> Mapping[str, int]:
        result: dict[str, int] = {}
        with self._lock:
            if self._closed:
                raise Unavailable(f"consumer in group {self._group!r} is closed")
            try:
                for topic in self._topics:
                    wire = self._bus.wire_topic(topic)
                    partitions = self._partitions(wire)
                    tps = [TopicPartition(wire, p) for p in sorted(partitions)]
                    ends = self._end_offsets(tps) if tps else {}
                    total = 0
                    for tp in tps:
                        committed = self._consumer.committed(tp, timeout_ms=self._timeout_ms)
                        total += max(ends.get(tp, 0) - (committed or 0), 0)
                    result[topic] = total
            except kafka_errors.KafkaError as exc:
                raise self._bus._unavailable(f"lag of group {self._group!r} unknown", exc) from exc
        for topic, value in result.items():
            CONSUMER_LAG.labels(topic=topic, group=self._group).set(value)
        return result

    def _partitions(self, wire: str) -> set[int]:
        # KafkaConsumer.partitions_for_topic blocks without a bound on a metadata miss
        # while the broker is down; this is the same lookup with operation_timeout_ms.
        client = self._consumer._client
        partitions = client.cluster.partitions_for_topic(wire)
        if partitions is None:
            future = client.cluster.request_update()
            client.poll(future=future, timeout_ms=self._timeout_ms)
            if not future.is_done:
                raise kafka_errors.KafkaTimeoutError(
                    f"no metadata for {wire} within {self._timeout_ms} ms"
                )
            partitions = client.cluster.partitions_for_topic(wire)
        return set(partitions or ())

    def _end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        # KafkaConsumer.end_offsets waits up to request_timeout_ms (minutes, see KafkaBus);
        # its fetcher takes an explicit bound.
        fetcher = getattr(self._consumer, "_fetcher", None)
        if fetcher is None:
            return dict(self._consumer.end_offsets(tps))
        return dict(fetcher.end_offsets(tps, self._timeout_ms))

    def seek_to_committed(self) -> None:
        """Rewind the assigned partitions to the committed offsets (redeliver uncommitted)."""
        with self._lock:
            try:
                for tp in self._consumer.assignment():
                    committed = self._consumer.committed(tp, timeout_ms=self._timeout_ms)
                    if committed is None:
                        self._consumer.seek_to_beginning(tp)
                    else:
                        self._consumer.seek(tp, committed)
            except kafka_errors.KafkaError as exc:
                raise self._bus._unavailable(f"seek in group {self._group!r} failed", exc) from exc

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._consumer.close(autocommit=False, timeout_ms=self._timeout_ms)
            except kafka_errors.KafkaError as exc:
                log.warning("closing a Kafka consumer in group %r failed: %s", self._group, exc)
