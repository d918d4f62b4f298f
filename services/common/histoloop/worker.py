"""The event worker: one consumer group per service, idempotent handling, at-least-once.

For each polled record: skip it if its event id was handled before (the processed-event
ledger lives in the artifact store, so it is shared by every replica and survives
restarts); otherwise run the handler, retrying with backoff while it raises, then record
the event id and commit the offset. A worker stopped mid-retry commits nothing, so the
event is redelivered after restart — nothing is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence

from histoloop import events
from histoloop.artifacts.base import ArtifactExists, ArtifactStore
from histoloop.bus.base import Consumer, EventBus, Record
from histoloop.errors import HistoloopError, InvalidArgument
from histoloop.metrics import CONSUMER_LAG, EVENTS_CONSUMED, EVENTS_FAILED
from histoloop.runtime import Handler

__all__ = ["EventWorker"]

log = logging.getLogger(__name__)
_MAX_BACKOFF = 30.0
_LAG_INTERVAL = 5.0


class EventWorker:
    """Runs a service's handlers over its topics in consumer group ``group``."""

    def __init__(
        self,
        *,
        group: str,
        bus: EventBus,
        store: ArtifactStore,
        handlers: Mapping[str, Handler],
        coalesce: Sequence[str] = (),
        stopping: threading.Event | None = None,
        poll_timeout: float = 0.5,
    ) -> None:
        self.group = group
        self._bus = bus
        self._store = store
        self._handlers = dict(handlers)
        self._coalesce = set(coalesce)
        self._stop = threading.Event()
        self._global_stop = stopping or threading.Event()
        self._poll_timeout = poll_timeout
        self._thread: threading.Thread | None = None
        self._consumer: Consumer | None = None
        self._lag_reported = 0.0
        self.busy = threading.Event()
        """Set while a handler runs (the health service and tests read it)."""

    # lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Subscribe and start the loop thread."""
        if self._thread is not None or not self._handlers:
            return
        self._consumer = self._bus.consumer(self.group, sorted(self._handlers))
        self._thread = threading.Thread(target=self._run, name=f"worker-{self.group}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Finish the event in hand (up to ``timeout`` s), then leave the group; safe twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("worker %s still busy after %.1fs; its event will be redelivered", self.group, timeout)
            self._thread = None
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _stopping(self) -> bool:
        return self._stop.is_set() or self._global_stop.is_set()

    # the loop ------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        while not self._stopping():
            try:
                records = consumer.poll(self._poll_timeout)
            except HistoloopError as exc:
                log.warning("worker %s cannot poll: %s", self.group, exc)
                self._stop.wait(1.0)
                continue
            if not records:
                self._report_lag(consumer)
                continue
            handled: list[Record] = []
            for record, superseded in self._plan(records):
                if self._stopping():
                    break
                if superseded or self._handle_with_retry(record):
                    if superseded:
                        self._mark_done(record)
                    handled.append(record)
                else:
                    break  # stopping mid-retry: commit what is done, redeliver the rest
            if handled:
                try:
                    consumer.commit(handled)
                except HistoloopError as exc:
                    # handled events are in the ledger: their redelivery is skipped
                    log.warning("worker %s cannot commit offsets (%s); events will be redelivered",
                                self.group, exc)

    def _plan(self, records: list[Record]) -> list[tuple[Record, bool]]:
        """Order of work; coalesced topics keep only the newest event per project."""
        newest: dict[tuple[str, str], int] = {}
        for i, rec in enumerate(records):
            if rec.topic in self._coalesce:
                newest[(rec.topic, rec.key)] = i
        return [
            (rec, rec.topic in self._coalesce and newest[(rec.topic, rec.key)] != i)
            for i, rec in enumerate(records)
        ]

    def _handle_with_retry(self, record: Record) -> bool:
        """True once handled (or known handled); False if stopping before success."""
        if self._already_done(record):
            log.info("worker %s skips duplicate event %s on %s", self.group, record.event_id, record.topic)
            return True
        try:
            message = events.decode(record)
        except InvalidArgument as exc:
            # a record that can never parse would block the partition forever: log and skip it
            log.error("worker %s drops unparseable event %s: %s", self.group, record.event_id, exc)
            EVENTS_FAILED.labels(topic=record.topic, group=self.group).inc()
            return True
        backoff = 0.5
        while not self._stopping():
            self.busy.set()
            try:
                self._handlers[record.topic](message, record)
            except Exception:
                EVENTS_FAILED.labels(topic=record.topic, group=self.group).inc()
                log.exception(
                    "worker %s failed on event %s (%s); retrying in %.1fs",
                    self.group, record.event_id, record.topic, backoff,
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            finally:
                self.busy.clear()
            self._mark_done(record)
            EVENTS_CONSUMED.labels(topic=record.topic, group=self.group).inc()
            return True
        return False

    # idempotency ledger -----------------------------------------------------------------
    def _ledger_key(self, record: Record) -> str:
        return f"_consumers/{self.group}/{record.event_id}"

    def _already_done(self, record: Record) -> bool:
        return self._store.exists(self._ledger_key(record))

    def _mark_done(self, record: Record) -> None:
        try:
            self._store.put(self._ledger_key(record), record.topic.encode(), content_type="text/plain")
        except ArtifactExists:
            pass

    def _report_lag(self, consumer: Consumer) -> None:
        if time.monotonic() - self._lag_reported < _LAG_INTERVAL:
            return
        self._lag_reported = time.monotonic()
        try:
            for topic, lag in consumer.lag().items():
                CONSUMER_LAG.labels(topic=topic, group=self.group).set(lag)
        except HistoloopError as exc:
            log.debug("worker %s cannot read lag: %s", self.group, exc)
