"""In-process regression tests for the event-worker bugs the distributed fault tests found.

Each has an end-to-end counterpart in ``test_faults.py``; these pin the cause in seconds:

* the store unreachable while the worker reads or writes its ledger killed the worker's
  thread (the event then waited for a restart) — ``test_artifact_store_unreachable_during_prediction``;
* coalescing kept the *last* event of a project in a batch, so an old duplicate behind new
  labels hid them, and a second copy of the new event (a producer retry) made the worker
  record the event as done before running it — ``test_duplicate_and_out_of_order_events``
  and ``test_broker_paused_during_label_submission``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from histoloop import events
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.embedded import EmbeddedBus
from histoloop.errors import Unavailable
from histoloop.v1 import events_pb2
from histoloop.worker import EventWorker


class _FlakyStore(LocalArtifactStore):
    """A local store that is unreachable while ``down`` is set."""

    down = threading.Event()

    def exists(self, key: str) -> bool:
        if self.down.is_set():
            raise Unavailable("S3 unreachable (test)")
        return super().exists(key)

    def put(self, key: str, data: object, **kwargs: object):  # type: ignore[no-untyped-def]
        if self.down.is_set():
            raise Unavailable("S3 unreachable (test)")
        return super().put(key, data, **kwargs)  # type: ignore[arg-type]


def _labels(version: int, event_id: str) -> events_pb2.LabelsCommitted:
    return events_pb2.LabelsCommitted(
        meta=events.new_meta(project="p", producer="test", event_id=event_id), label_version=version
    )


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _worker(
    tmp_path: Path, seen: list[int], store: LocalArtifactStore | None = None
) -> tuple[EventWorker, EmbeddedBus]:
    bus = EmbeddedBus(tmp_path / "events.sqlite")
    worker = EventWorker(
        group="training",
        bus=bus,
        store=store or LocalArtifactStore(tmp_path / "artifacts"),
        handlers={events.LABELS_COMMITTED: lambda msg, rec: seen.append(msg.label_version)},
        coalesce=[events.LABELS_COMMITTED],
        poll_timeout=0.05,
    )
    return worker, bus


def test_unreachable_store_delays_events_without_killing_the_worker(tmp_path: Path) -> None:
    seen: list[int] = []
    store = _FlakyStore(tmp_path / "artifacts")
    worker, bus = _worker(tmp_path, seen, store)
    store.down.set()
    try:
        worker.start()
        events.publish(bus, _labels(1, "e1"))
        time.sleep(1.5)  # the ledger check fails, is retried
        assert seen == []
        assert worker._thread is not None and worker._thread.is_alive()
    finally:
        store.down.clear()
    _wait(lambda: seen == [1])
    events.publish(bus, _labels(2, "e2"))
    _wait(lambda: seen == [1, 2])
    worker.stop(5)


def test_old_duplicate_behind_new_labels_does_not_hide_them(tmp_path: Path) -> None:
    seen: list[int] = []
    worker, bus = _worker(tmp_path, seen)
    worker.start()
    events.publish(bus, _labels(1, "e1"))
    _wait(lambda: seen == [1])
    worker.stop(5)
    # while the worker is away: new labels, a copy of them, and the old event again
    for message in (_labels(2, "e2"), _labels(2, "e2"), _labels(1, "e1")):
        events.publish(bus, message)
    worker, _ = _worker(tmp_path, seen)
    worker.start()
    _wait(lambda: len(seen) >= 2)
    time.sleep(0.3)
    worker.stop(5)
    assert seen == [1, 2]


def test_burst_is_coalesced_to_the_newest(tmp_path: Path) -> None:
    seen: list[int] = []
    worker, bus = _worker(tmp_path, seen)
    for version in range(1, 6):
        events.publish(bus, _labels(version, f"e{version}"))
    worker.start()
    _wait(lambda: 5 in seen)
    time.sleep(0.3)
    worker.stop(5)
    assert seen == [5]
