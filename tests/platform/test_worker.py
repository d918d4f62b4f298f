"""The event worker: idempotent by event id, retries without dropping, coalesces, stops cleanly."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from histoloop import events
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.embedded import EmbeddedBus
from histoloop.v1 import events_pb2
from histoloop.worker import EventWorker


def _labels(project: str, version: int, event_id: str | None = None) -> events_pb2.LabelsCommitted:
    return events_pb2.LabelsCommitted(
        meta=events.new_meta(project=project, producer="test", event_id=event_id),
        label_version=version,
    )


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _worker(tmp_path: Path, handler, **kwargs) -> tuple[EventWorker, EmbeddedBus]:
    bus = EmbeddedBus(tmp_path / "events.sqlite")
    store = LocalArtifactStore(tmp_path / "artifacts")
    worker = EventWorker(
        group="training",
        bus=bus,
        store=store,
        handlers={events.LABELS_COMMITTED: handler},
        poll_timeout=0.05,
        **kwargs,
    )
    return worker, bus


def test_duplicate_event_ids_are_handled_once(tmp_path: Path) -> None:
    seen: list[int] = []
    worker, bus = _worker(tmp_path, lambda msg, rec: seen.append(msg.label_version))
    worker.start()
    for version in (1, 2):
        events.publish(bus, _labels("p", version, event_id=f"e{version}"))
    events.publish(bus, _labels("p", 1, event_id="e1"))  # redelivery of the first
    _wait(lambda: len(seen) >= 2)
    time.sleep(0.3)
    worker.stop(5)
    assert seen == [1, 2]


def test_failing_handler_is_retried_not_dropped(tmp_path: Path) -> None:
    attempts: list[int] = []

    def flaky(msg, rec) -> None:
        attempts.append(msg.label_version)
        if len(attempts) < 3:
            raise RuntimeError("artifact store unreachable")

    worker, bus = _worker(tmp_path, flaky)
    worker.start()
    events.publish(bus, _labels("p", 7))
    _wait(lambda: len(attempts) >= 3, timeout=20)
    worker.stop(5)
    assert attempts == [7, 7, 7]
    assert bus.consumer("training", [events.LABELS_COMMITTED]).lag() == {events.LABELS_COMMITTED: 0}


def test_stop_mid_retry_commits_nothing_and_restart_redelivers(tmp_path: Path) -> None:
    from histoloop.errors import Unavailable

    def always_fails(msg, rec) -> None:
        raise Unavailable("artifact store down")  # transient: retried in place, never committed

    worker, bus = _worker(tmp_path, always_fails)
    worker.start()
    events.publish(bus, _labels("p", 1))
    time.sleep(0.3)
    worker.stop(5)
    assert bus.consumer("training", [events.LABELS_COMMITTED]).lag() == {events.LABELS_COMMITTED: 1}
    seen: list[int] = []
    again, _ = _worker(tmp_path, lambda msg, rec: seen.append(msg.label_version))
    again.start()
    _wait(lambda: seen == [1])
    again.stop(5)


def test_coalesced_topic_handles_only_the_newest_per_project(tmp_path: Path) -> None:
    gate = threading.Event()
    seen: list[tuple[str, int]] = []

    def slow(msg, rec) -> None:
        gate.wait(5)
        seen.append((msg.meta.project, msg.label_version))

    worker, bus = _worker(tmp_path, slow, coalesce=[events.LABELS_COMMITTED])
    events.publish(bus, _labels("a", 1))
    worker.start()
    _wait(lambda: worker.busy.is_set())
    for version in (2, 3, 4):  # arrive while the first run is busy
        events.publish(bus, _labels("a", version))
    events.publish(bus, _labels("b", 1))
    gate.set()
    _wait(lambda: len(seen) >= 3)
    time.sleep(0.3)
    worker.stop(5)
    assert seen == [("a", 1), ("a", 4), ("b", 1)]
    assert bus.consumer("training", [events.LABELS_COMMITTED]).lag() == {events.LABELS_COMMITTED: 0}


def test_unparseable_event_is_skipped_not_blocking(tmp_path: Path) -> None:
    seen: list[int] = []
    worker, bus = _worker(tmp_path, lambda msg, rec: seen.append(msg.label_version))
    bus.publish(events.LABELS_COMMITTED, "p", b"\xff\xff\xff", event_id="garbage")
    events.publish(bus, _labels("p", 5))
    worker.start()
    _wait(lambda: seen == [5])
    worker.stop(5)


def test_event_rejected_as_bad_data_becomes_a_dead_letter(tmp_path: Path) -> None:
    import json

    from histoloop.errors import InvalidArgument

    seen: list[int] = []

    def handler(msg, rec) -> None:
        if msg.label_version == 1:
            raise InvalidArgument("labels name a class the schema does not have")
        seen.append(msg.label_version)

    worker, bus = _worker(tmp_path, handler)
    bad = events.publish(bus, _labels("p", 1))
    events.publish(bus, _labels("p", 2))
    worker.start()
    _wait(lambda: seen == [2])  # the partition is not blocked behind the bad event
    worker.stop(5)
    store = LocalArtifactStore(tmp_path / "artifacts")
    parked = json.loads(store.get(f"_deadletter/training/p/{bad}.json"))
    assert parked["topic"] == events.LABELS_COMMITTED and "schema" in parked["error"]
