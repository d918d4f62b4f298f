"""The event bus contract, run against both backends: the embedded log and Kafka.

Kafka runs as librdkafka's mock cluster in a helper process (``tests/fixtures``); the
consumer group timing is tuned for it (its coordinator delays every join by ~3 s, so
each test keeps the number of joins small).
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from histoloop.bus.base import Consumer, EventBus, Record
from histoloop.bus.embedded import EmbeddedBus
from histoloop.bus.kafka import KafkaBus
from histoloop.errors import InvalidArgument, Unavailable

pytestmark = pytest.mark.timeout(120)

# Faster group membership than Kafka's defaults; the mock's first join takes 3 s and a
# rejoin takes session_timeout - 1 s, and a session below ~3.5 s times out the first join.
FAST_GROUPS = {
    "session_timeout_ms": 4_000,
    "heartbeat_interval_ms": 400,
    "max_poll_interval_ms": 30_000,
}


@dataclass
class Backend:
    """One bus backend under test: new bus instances on the same log/cluster."""

    kind: str
    new_bus: Callable[[], EventBus]
    buses: list[EventBus] = field(default_factory=list)

    def bus(self) -> EventBus:
        bus = self.new_bus()
        self.buses.append(bus)
        return bus


@pytest.fixture(params=["embedded", "kafka"], ids=["embedded", "kafka"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "embedded":
        path = tmp_path / "events.sqlite"
        backend = Backend("embedded", lambda: EmbeddedBus(path))
    else:
        broker = request.getfixturevalue("kafka_broker")
        prefix = f"t{uuid.uuid4().hex[:8]}."  # one namespace per test on the shared broker
        backend = Backend(
            "kafka",
            lambda: KafkaBus(
                broker.bootstrap,
                topic_prefix=prefix,
                client_id="contract-test",
                api_version=broker.api_version,
                publish_timeout=10,
                **FAST_GROUPS,
            ),
        )
    yield backend
    for bus in backend.buses:
        bus.close()


@pytest.fixture
def names() -> Callable[[str], str]:
    """Unique topic/group names per test (valid logical topic names)."""
    suffix = uuid.uuid4().hex[:8]
    return lambda base: f"{base}-{suffix}"


def drain(
    consumer: Consumer, count: int, *, timeout: float = 30.0, settle: float = 0.0
) -> list[Record]:
    """Poll until ``count`` records arrived (then ``settle`` s more, to catch extras)."""
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(records) < count:
        assert time.monotonic() < deadline, f"got {len(records)} of {count} records in {timeout}s"
        records += consumer.poll(0.2, max_records=500)
    settle_until = time.monotonic() + settle
    while time.monotonic() < settle_until:
        records += consumer.poll(0.2, max_records=500)
    return records


def publish_all(
    bus: EventBus, topic: str, items: Sequence[tuple[str, bytes]], tag: str = "e"
) -> list[str]:
    ids = []
    for i, (key, value) in enumerate(items):
        event_id = f"{tag}{i}-{uuid.uuid4().hex[:6]}"
        bus.publish(topic, key, value, event_id=event_id)
        ids.append(event_id)
    return ids


def produced_count(topic: str) -> float:
    return REGISTRY.get_sample_value("histoloop_events_produced_total", {"topic": topic}) or 0.0


# --------------------------------------------------------------------------------------
def test_round_trip(backend: Backend, names: Callable[[str], str]) -> None:
    bus = backend.bus()
    topic = names("labels.committed")
    bus.ping()
    before = produced_count(topic)
    bus.publish(topic, "project-1", b"\x00payload\xff", event_id="ev-1")
    assert produced_count(topic) == before + 1

    consumer = bus.consumer(names("g"), [topic])
    (record,) = drain(consumer, 1, settle=0.3)
    assert (record.topic, record.key, record.value, record.event_id) == (
        topic,
        "project-1",
        b"\x00payload\xff",
        "ev-1",
    )
    assert record.offset >= 0 and record.timestamp_ms > 0
    consumer.commit([record])
    assert consumer.lag() == {topic: 0}
    consumer.close()
    consumer.close()  # safe twice
    bus.close()
    bus.close()


def test_order_per_key_with_interleaved_keys(backend: Backend, names: Callable[[str], str]) -> None:
    bus = backend.bus()
    topic = names("tiles.ready")
    keys = [f"project-{k}" for k in range(6)]
    items = [(keys[i % len(keys)], str(i).encode()) for i in range(240)]
    publish_all(bus, topic, items)

    records = drain(bus.consumer(names("g"), [topic]), len(items), settle=0.3)
    by_key: dict[str, list[int]] = defaultdict(list)
    for rec in records:
        by_key[rec.key].append(int(rec.value))
    assert sorted(by_key) == keys
    for key, values in by_key.items():
        expected = [int(v) for k, v in items if k == key]
        assert values == expected, f"order broken for {key}"
    # offsets never go backwards within a partition
    last: dict[tuple[str, int], int] = {}
    for rec in records:
        assert rec.offset > last.get((rec.topic, rec.partition), -1)
        last[(rec.topic, rec.partition)] = rec.offset


def test_restart_resumes_after_committed_offset(
    backend: Backend, names: Callable[[str], str]
) -> None:
    topic, group = names("model.trained"), names("training")
    bus = backend.bus()
    first = publish_all(bus, topic, [(f"p{i % 3}", b"a") for i in range(9)], tag="a")
    consumer = bus.consumer(group, [topic])
    handled = drain(consumer, 9)
    assert sorted(r.event_id for r in handled) == sorted(first)
    consumer.commit(handled)
    consumer.close()

    second = publish_all(bus, topic, [(f"p{i % 3}", b"b") for i in range(5)], tag="b")
    restarted = backend.bus().consumer(group, [topic])  # a new process, in effect
    again = drain(restarted, 5, settle=1.0)
    assert sorted(r.event_id for r in again) == sorted(second), "lost or re-applied events"
    restarted.commit(again)
    assert restarted.lag() == {topic: 0}
    restarted.close()


def test_uncommitted_records_are_redelivered(backend: Backend, names: Callable[[str], str]) -> None:
    topic, group = names("predictions.ready"), names("acquisition")
    bus = backend.bus()
    ids = publish_all(bus, topic, [(f"p{i % 4}", str(i).encode()) for i in range(12)])
    consumer = bus.consumer(group, [topic])
    polled = drain(consumer, 12)
    done, crashed = polled[:5], polled[5:]  # handled the first five, then "crashed"
    consumer.commit(done)
    consumer.close()

    restarted = backend.bus().consumer(group, [topic])
    redelivered = drain(restarted, len(crashed), settle=1.0)
    assert sorted(r.event_id for r in redelivered) == sorted(r.event_id for r in crashed)
    assert {r.event_id for r in done}.isdisjoint(r.event_id for r in redelivered)
    assert sorted(r.event_id for r in done + redelivered) == sorted(ids)
    restarted.close()


def test_two_groups_each_get_everything(backend: Backend, names: Callable[[str], str]) -> None:
    topic = names("embeddings.ready")
    bus = backend.bus()
    ids = publish_all(bus, topic, [(f"p{i % 3}", b"x") for i in range(20)])
    group_a, group_b = names("acq"), names("audit")
    a, b = bus.consumer(group_a, [topic]), bus.consumer(group_b, [topic])
    got_a: list[Record] = []
    got_b: list[Record] = []
    deadline = time.monotonic() + 30
    while (len(got_a) < 20 or len(got_b) < 20) and time.monotonic() < deadline:
        got_a += a.poll(0.1)  # alternate so both groups join at the same time
        got_b += b.poll(0.1)
    assert sorted(r.event_id for r in got_a) == sorted(ids)
    assert sorted(r.event_id for r in got_b) == sorted(ids)
    a.commit(got_a)
    assert a.lag() == {topic: 0}
    assert b.lag() == {topic: 20}  # b's progress is its own
    a.close()
    b.close()


def test_many_events_all_arrive(backend: Backend, names: Callable[[str], str]) -> None:
    topic = names("dataset.registered")
    bus = backend.bus()
    n = 2_000
    ids = publish_all(bus, topic, [(f"project-{i % 10}", i.to_bytes(4, "big")) for i in range(n)])
    consumer = bus.consumer(names("tiling"), [topic])
    records = drain(consumer, n, timeout=60, settle=0.5)
    assert len(records) == n
    assert sorted(r.event_id for r in records) == sorted(ids)
    for key in {r.key for r in records}:
        values = [int.from_bytes(r.value, "big") for r in records if r.key == key]
        assert values == sorted(values)
    consumer.commit(records)
    assert consumer.lag() == {topic: 0}
    consumer.close()


def test_lag_counts_uncommitted_events(backend: Backend, names: Callable[[str], str]) -> None:
    topic, other, group = names("queryset.ready"), names("labels.committed"), names("store")
    bus = backend.bus()
    publish_all(bus, topic, [(f"p{i % 2}", b"q") for i in range(7)])
    consumer = bus.consumer(group, [topic, other])
    assert consumer.lag() == {topic: 7, other: 0}  # nothing committed yet; other is empty
    records = drain(consumer, 7)
    assert consumer.lag() == {topic: 7, other: 0}  # polling is not handling
    consumer.commit(records[:3])
    assert consumer.lag() == {topic: 4, other: 0}
    consumer.commit(records)
    assert consumer.lag() == {topic: 0, other: 0}
    if backend.kind == "kafka":
        gauge = REGISTRY.get_sample_value(
            "histoloop_consumer_lag", {"topic": topic, "group": group}
        )
        assert gauge == 0
    consumer.close()


def test_consumer_created_before_the_first_publish_receives_later_events(
    backend: Backend, names: Callable[[str], str]
) -> None:
    topic = names("labels.committed")
    bus = backend.bus()
    consumer = bus.consumer(names("training"), [topic])  # the topic does not exist yet
    assert consumer.poll(0.5) == []
    ids = publish_all(bus, topic, [("p1", b"1"), ("p2", b"2"), ("p1", b"3")])
    records = drain(consumer, 3, settle=0.3)
    assert [r.event_id for r in records if r.key == "p1"] == [ids[0], ids[2]]
    assert sorted(r.event_id for r in records) == sorted(ids)
    consumer.close()


@pytest.mark.parametrize(
    ("topic", "key", "event_id"),
    [
        ("labels.committed", "", "e1"),
        ("labels.committed", "p1", ""),
        ("", "p1", "e1"),
        ("Bad Topic", "p1", "e1"),
        ("../labels", "p1", "e1"),
    ],
    ids=["empty-key", "empty-event-id", "empty-topic", "bad-topic", "path-topic"],
)
def test_bad_publish_arguments(backend: Backend, topic: str, key: str, event_id: str) -> None:
    with pytest.raises(InvalidArgument):
        backend.bus().publish(topic, key, b"v", event_id=event_id)


def test_bad_consumer_arguments(backend: Backend) -> None:
    bus = backend.bus()
    with pytest.raises(InvalidArgument):
        bus.consumer("", ["labels.committed"])
    with pytest.raises(InvalidArgument):
        bus.consumer("g", [])
    with pytest.raises(InvalidArgument):
        bus.consumer("g", ["Not/A/Topic"])


def test_a_stopped_bus_is_unavailable_quickly(
    backend: Backend, request: pytest.FixtureRequest, names: Callable[[str], str]
) -> None:
    """Publish, ping and lag raise Unavailable within seconds once the bus is gone."""
    topic = names("labels.committed")
    if backend.kind == "embedded":
        bus = backend.bus()
        stop: Callable[[], None] = bus.close
    else:
        broker = request.getfixturevalue("private_kafka_broker")
        bus = KafkaBus(
            broker.bootstrap,
            api_version=broker.api_version,
            publish_timeout=3,
            operation_timeout_ms=2_000,
            **FAST_GROUPS,
        )
        backend.buses.append(bus)
        stop = lambda: broker.stop(kill=True)  # noqa: E731 - the broker dies
    bus.publish(topic, "p1", b"v", event_id="e1")
    consumer = bus.consumer(names("g"), [topic])
    assert consumer.lag() == {topic: 1}
    stop()

    started = time.monotonic()
    with pytest.raises(Unavailable) as info:
        bus.publish(topic, "p1", b"v", event_id="e2")
    assert time.monotonic() - started < 8
    if backend.kind == "kafka":
        assert bus.bootstrap in str(info.value)
    for call in (bus.ping, consumer.lag):
        started = time.monotonic()
        with pytest.raises(Unavailable):
            call()
        assert time.monotonic() - started < 5, call
    started = time.monotonic()
    consumer.close()
    consumer.close()
    assert time.monotonic() - started < 5


def test_kafka_publish_recovers_after_a_broker_outage(
    private_kafka_broker, names: Callable[[str], str]
) -> None:
    """A frozen broker: publish fails within its timeout, then works again; nothing acked is lost."""
    broker = private_kafka_broker
    bus = KafkaBus(
        broker.bootstrap, api_version=broker.api_version, publish_timeout=3, **FAST_GROUPS
    )
    topic = names("labels.committed")
    bus.publish(topic, "p1", b"before", event_id="before")
    broker.pause()
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            bus.publish(topic, "p1", b"during", event_id="during")
        assert time.monotonic() - started < 8
        with pytest.raises(Unavailable):
            bus.ping(timeout=1)
    finally:
        broker.resume()
    bus.ping()
    bus.publish(topic, "p1", b"after", event_id="after")
    consumer = bus.consumer(names("g"), [topic])
    records = drain(consumer, 2, settle=1.0)
    ids = [r.event_id for r in records]
    # "during" was never acknowledged; it may or may not have been written (at-least-once)
    assert ids in (["before", "after"], ["before", "during", "after"])
    bus.close()


def test_kafka_unreachable_at_start_is_unavailable() -> None:
    """No broker at all: creating the bus works, ping and publish fail fast."""
    from tests.fixtures.s3 import free_port

    bus = KafkaBus(f"127.0.0.1:{free_port()}", publish_timeout=1)
    started = time.monotonic()
    with pytest.raises(Unavailable, match="127.0.0.1"):
        bus.ping()
    with pytest.raises(Unavailable):
        bus.publish("labels.committed", "p1", b"v", event_id="e1")
    with pytest.raises(Unavailable):
        bus.consumer("g", ["labels.committed"])
    assert time.monotonic() - started < 15
    bus.close()
    bus.close()


def test_kafka_wire_format(kafka_broker, names: Callable[[str], str]) -> None:
    """Prefix on the wire, project as the key, event id as a header; same key, same partition."""
    from kafka import KafkaConsumer

    prefix = f"w{uuid.uuid4().hex[:6]}."
    bus = KafkaBus(
        kafka_broker.bootstrap, topic_prefix=prefix, api_version=kafka_broker.api_version
    )
    topic = names("labels.committed")
    for i in range(6):
        bus.publish(topic, "project-9", str(i).encode(), event_id=f"id-{i}")
    bus.close()
    raw = KafkaConsumer(
        prefix + topic,
        bootstrap_servers=kafka_broker.bootstrap,
        api_version=kafka_broker.api_version,
        auto_offset_reset="earliest",
        consumer_timeout_ms=5_000,
    )
    messages = []
    for msg in raw:
        messages.append(msg)
        if len(messages) == 6:
            break
    raw.close()
    assert [m.key for m in messages] == [b"project-9"] * 6
    assert [dict(m.headers)["event_id"] for m in messages] == [f"id-{i}".encode() for i in range(6)]
    assert len({m.partition for m in messages}) == 1
    assert [m.value for m in messages] == [str(i).encode() for i in range(6)]
