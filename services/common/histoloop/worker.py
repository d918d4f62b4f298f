"""The event worker: one consumer group per service, idempotent handling, at-least-once.

For each polled record: skip it if its event id was handled before (the processed-event
ledger lives in the artifact store, so it is shared by every replica and survives
restarts); otherwise run the handler, retrying with backoff while it raises, then record
the event id and commit the offset. A worker stopped mid-retry commits nothing, so the
event is redelivered after restart — nothing is dropped. The ledger's own reads and writes
are retried like handlers, so an unreachable artifact store delays events, never drops them.
An event that no retry can fix — it does not parse, or its handler rejects it with
:class:`histoloop.errors.InvalidArgument` — is parked as a dead letter under
``_deadletter/<group>/<event id>.json`` with the error, instead of blocking its partition.

Coalescing: on the topics a service names, of several events of one project that are ready
at once only the newest is handled (a burst of label batches → one training run). "Ready at
once" is what one poll returns plus whatever further polls return immediately, because some
brokers (librdkafka's mock cluster among them) return a single record batch per fetch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TypeVar

from google.protobuf.message import Message

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
_TOP_UP_TIMEOUT = 0.02
"""How long each extra poll waits when gathering a burst for coalescing."""
_MAX_BATCH = 500
T = TypeVar("T")


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
            if self._coalesce:
                records = self._top_up(consumer, records)
            planned, plan = self._retrying("read its ledger", partial(self._plan, records))
            if not planned or plan is None:
                break  # stopping: nothing committed, the batch is redelivered
            handled: list[Record] = []
            for record, superseded in plan:
                if self._stopping():
                    break
                if superseded:
                    done, _ = self._retrying(f"record superseded event {record.event_id}",
                                             partial(self._mark_done, record))
                else:
                    done = self._handle_with_retry(record)
                if not done:
                    break  # stopping mid-retry: commit what is done, redeliver the rest
                handled.append(record)
            if handled:
                try:
                    consumer.commit(handled)
                except HistoloopError as exc:
                    # handled events are in the ledger: their redelivery is skipped
                    log.warning("worker %s cannot commit offsets (%s); events will be redelivered",
                                self.group, exc)

    def _top_up(self, consumer: Consumer, records: list[Record]) -> list[Record]:
        """``records`` plus what further polls return at once (up to ``_MAX_BATCH``)."""
        while len(records) < _MAX_BATCH and not self._stopping():
            try:
                more = consumer.poll(_TOP_UP_TIMEOUT)
            except HistoloopError:
                break  # the next regular poll reports it
            if not more:
                break
            records = records + more
        return records

    def _plan(self, records: list[Record]) -> list[tuple[Record, bool]]:
        """Order of work: each record, and whether a newer event of its project supersedes it.

        On a coalesced topic, of the events of one project in the batch only the newest that
        is not handled yet (by creation time, then position) is handled; the others are
        recorded as done without running the handler. An old event delivered again behind a
        new one (a redelivery, a duplicate) is in the ledger already, so it cannot hide the
        new one. Ledger reads: one per project and topic, unless the newest are duplicates.
        """
        groups: dict[tuple[str, str], list[int]] = {}
        for i, rec in enumerate(records):
            if rec.topic in self._coalesce:
                groups.setdefault((rec.topic, rec.key), []).append(i)
        superseded: set[int] = set()
        for members in groups.values():
            if len(members) < 2:
                continue
            ranked = sorted(members, key=lambda i: (_created_ms(records[i]), i), reverse=True)
            chosen = next((i for i in ranked if not self._already_done(records[i])), None)
            # copies of the chosen event (a producer retry, a redelivery) are not superseded:
            # recording them as done would record the chosen one as done before it runs
            keep = records[chosen].event_id if chosen is not None else None
            superseded.update(i for i in members if records[i].event_id != keep)
        return [(rec, i in superseded) for i, rec in enumerate(records)]

    def _retrying(self, what: str, step: Callable[[], T]) -> tuple[bool, T | None]:
        """Run ``step`` until it succeeds (True, its result) or the worker stops (False, None).

        For the worker's own bookkeeping in the artifact store (the ledger), which fails
        while the store is unreachable; the event stays uncommitted meanwhile.
        """
        backoff = 0.5
        while not self._stopping():
            try:
                return True, step()
            except HistoloopError as exc:
                log.warning("worker %s cannot %s (%s); retrying in %.1fs", self.group, what, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
        return False, None

    def _handle_with_retry(self, record: Record) -> bool:
        """True once handled (or known handled); False if stopping before success.

        The ledger check and entry are retried with the handler: a store that cannot be
        reached fails the attempt (logged, retried with backoff), never the worker thread.
        """
        backoff = 0.5
        message: Message | None = None
        while not self._stopping():
            self.busy.set()
            try:
                if self._already_done(record):
                    log.info("worker %s skips duplicate event %s on %s", self.group, record.event_id,
                             record.topic)
                    return True
                if message is None:
                    message = events.decode(record)
                self._handlers[record.topic](message, record)
                self._mark_done(record)
            except InvalidArgument as exc:
                # bad data that no retry can fix (an unparseable event, a handler rejecting its
                # input) would block the partition forever: park it where operators see it
                done, _ = self._retrying(f"park dead letter {record.event_id}",
                                         partial(self._dead_letter, record, exc))
                return done
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
            EVENTS_CONSUMED.labels(topic=record.topic, group=self.group).inc()
            return True
        return False

    def _dead_letter(self, record: Record, exc: InvalidArgument) -> None:
        EVENTS_FAILED.labels(topic=record.topic, group=self.group).inc()
        log.error("worker %s parks event %s (%s) as a dead letter: %s", self.group, record.event_id,
                  record.topic, exc)
        key = f"_deadletter/{self.group}/{record.event_id}.json"
        if not self._store.exists(key):
            body = json.dumps({"topic": record.topic, "key": record.key, "event_id": record.event_id,
                               "offset": record.offset, "error": str(exc), "value_hex": record.value.hex()})
            self._store.put(key, body.encode(), content_type="application/json")
        self._mark_done(record)

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


def _created_ms(record: Record) -> int:
    """When the event was created (its header's ``created_at``), 0 if it does not parse."""
    try:
        message = events.decode(record)
    except InvalidArgument:
        return 0
    meta = getattr(message, "meta", None)
    return int(meta.created_at.ToMilliseconds()) if meta is not None else 0
