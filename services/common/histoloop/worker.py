"""The event worker: one consumer group per service, idempotent handling, at-least-once.

For each polled record: skip it if its event id was handled before (the processed-event
ledger lives in the artifact store, so it is shared by every replica and survives
restarts); otherwise run the handler, then record the event id and commit the offset.

Failures are classified (:func:`is_transient`). A dependency that is down (broker,
artifact store, database, Triton: :class:`histoloop.errors.Unavailable`, timeouts) is
retried in place with backoff for as long as it lasts — a worker stopped meanwhile
commits nothing, so the event is redelivered after restart. Any other error is one failed
attempt of that event: it is *deferred* (persisted under ``_retry/<group>/`` so its offset
can be committed) and the consumer moves on to other events — one project's broken input
never delays another project. Deferred events are attempted again with backoff and, after
``max_attempts`` (``HISTOLOOP_MAX_ATTEMPTS``), parked as a dead letter of that project and
stage (:func:`histoloop.stages.dead_letter_key`) with the error. An event no retry can fix
— it does not parse, or its handler rejects it with :class:`histoloop.errors.InvalidArgument`
— is parked at once. Each state change of an event is recorded per project, dataset and
stage (:mod:`histoloop.stages`) for ``GetStatus``; metrics count failures and dead letters
and report the oldest unhandled event; :meth:`EventWorker.check_stalled` turns readiness
NOT_SERVING when an event in hand has not progressed for ``stall_seconds``.

Coalescing: on the topics a service names, of several events of one project that are ready
at once only the newest is handled (a burst of label batches → one training run). "Ready at
once" is what one poll returns plus whatever further polls return immediately, because some
brokers (librdkafka's mock cluster among them) return a single record batch per fetch.
A deferred older event is superseded when a newer one of its project succeeds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from histoloop import events
from histoloop.artifacts.base import ArtifactExists, ArtifactStore
from histoloop.bus.base import Consumer, EventBus, Record
from histoloop.errors import HistoloopError, InvalidArgument, Unavailable
from histoloop.metrics import (
    CONSUMER_LAG,
    DEAD_LETTERS,
    EVENTS_CONSUMED,
    EVENTS_FAILED,
    OLDEST_UNHANDLED,
    STAGE_FAILURES,
)
from histoloop.runtime import Handler
from histoloop.stages import STAGE_OF_GROUP, StageRecord, key_part, park_event, write_state

__all__ = ["EventWorker", "is_transient"]

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
        max_attempts: int = 5,
        backoff: float = 0.5,
        max_backoff: float = _MAX_BACKOFF,
        stall_seconds: float = 900.0,
    ) -> None:
        """Create a worker (nothing runs until :meth:`start`).

        Args:
            group: consumer group (the service's short name; also its stage).
            bus: the event bus.
            store: the artifact store (ledger, deferred events, dead letters, stage state).
            handlers: topic → handler.
            coalesce: topics where only the newest ready event of a project is handled.
            stopping: the server's shutdown flag.
            poll_timeout: longest wait of one poll (s).
            max_attempts: failed attempts (non-transient errors) before an event is parked.
            backoff: first retry delay (s), doubled per attempt up to ``max_backoff``.
            max_backoff: longest retry delay (s).
            stall_seconds: readiness turns NOT_SERVING when an event in hand has not
                progressed for this long.
        """
        if max_attempts < 1:
            raise InvalidArgument(f"max_attempts: {max_attempts} must be at least 1")
        self.group = group
        self.stage = STAGE_OF_GROUP.get(group, group)
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._max_backoff = max(max_backoff, backoff)
        self._stall_seconds = stall_seconds
        for metric in (DEAD_LETTERS, STAGE_FAILURES):
            metric.labels(
                stage=self.stage
            )  # exported (as 0) from the start: alerts need the series
        # computed at each scrape, so a handler that hangs still shows its event ageing
        OLDEST_UNHANDLED.labels(stage=self.stage).set_function(self.oldest_unhandled_age)
        self._deferred: dict[str, _Deferred] = {}
        self._in_hand: dict[str, int] = {}
        self._last_progress = time.monotonic()
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
                log.warning(
                    "worker %s still busy after %.1fs; its event will be redelivered",
                    self.group,
                    timeout,
                )
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
        if not self._retrying("read its deferred events", self._restore_deferred)[0]:
            return
        while not self._stopping():
            if not self._retry_due():
                break
            try:
                records = consumer.poll(self._next_due_in())
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
            self._in_hand = {r.event_id: r.timestamp_ms for r in records}
            self._last_progress = time.monotonic()
            for record, superseded in plan:
                if self._stopping():
                    break
                if superseded:
                    done, _ = self._retrying(
                        f"record superseded event {record.event_id}",
                        partial(self._mark_done, record),
                    )
                else:
                    done = self._handle_with_retry(record)
                if not done:
                    break  # stopping mid-retry: commit what is done, redeliver the rest
                handled.append(record)
                self._in_hand.pop(record.event_id, None)
                self._last_progress = time.monotonic()
            self._in_hand = {}
            if handled:
                try:
                    consumer.commit(handled)
                except HistoloopError as exc:
                    # handled events are in the ledger: their redelivery is skipped
                    log.warning(
                        "worker %s cannot commit offsets (%s); events will be redelivered",
                        self.group,
                        exc,
                    )
            self._report_lag(consumer)

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
        An event that does not parse is never superseded: it is handled, i.e. parked where
        operators see it, instead of vanishing behind a newer event of its key.
        """
        groups: dict[tuple[str, str], list[int]] = {}
        created: dict[int, int] = {}
        for i, rec in enumerate(records):
            if rec.topic in self._coalesce:
                when = _created_ms(rec)
                if when is not None:
                    created[i] = when
                    groups.setdefault((rec.topic, rec.key), []).append(i)
        superseded: set[int] = set()
        for members in groups.values():
            if len(members) < 2:
                continue
            ranked = sorted(members, key=lambda i: (created[i], i), reverse=True)
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
                log.warning(
                    "worker %s cannot %s (%s); retrying in %.1fs", self.group, what, exc, backoff
                )
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
        return False, None

    def _handle_with_retry(self, record: Record) -> bool:
        """True once handled, parked, deferred (or known handled); False if stopping first.

        A record already waiting for its next attempt (a redelivery of a deferred event) is
        left to :meth:`_retry_due`.
        """
        if record.event_id in self._deferred:
            return True
        return self._attempt(record, prior=0)

    def _attempt(self, record: Record, *, prior: int) -> bool:
        """One attempt at ``record`` (``prior`` failed attempts before), retried while transient.

        Transient errors (:func:`is_transient`: a dependency down) are retried here with
        backoff for as long as they last: the outage delays every project alike. Any other
        error counts as one failed attempt: the event is deferred (persisted under
        ``_retry/``, so its offset can be committed and the consumer moves on) until it is
        due again, and parked as a dead letter after ``max_attempts``. The ledger check
        and entry are retried with the handler: a store that cannot be reached fails the
        attempt as a transient error, never the worker thread.
        """
        backoff = self._backoff
        message: Message | None = None
        while not self._stopping():
            self.busy.set()
            try:
                if self._already_done(record):
                    log.info(
                        "worker %s skips duplicate event %s on %s",
                        self.group,
                        record.event_id,
                        record.topic,
                    )
                    self._deferred.pop(record.event_id, None)
                    return True
                if message is None:
                    message = events.decode(record)
                self._state(record, message, "running", attempts=prior)
                self._handlers[record.topic](message, record)
                self._mark_done(record)
            except InvalidArgument as exc:
                # bad data that no retry can fix (an unparseable event, a handler rejecting its
                # input): park it at once where operators see it
                return self._give_up(record, message, exc, prior + 1)
            except Exception as exc:  # noqa: BLE001 - classified: transient, or one failed attempt
                EVENTS_FAILED.labels(topic=record.topic, group=self.group).inc()
                if not is_transient(exc):
                    return self._failed(record, message, exc, prior + 1)
                log.warning(
                    "worker %s: a dependency is down handling event %s (%s): %s; retrying in %.1fs",
                    self.group,
                    record.event_id,
                    record.topic,
                    exc,
                    backoff,
                )
                if self._consumer is not None:
                    self._report_lag(self._consumer)  # the lag shows what waits behind it
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            finally:
                self.busy.clear()
            EVENTS_CONSUMED.labels(topic=record.topic, group=self.group).inc()
            self._deferred.pop(record.event_id, None)
            self._state(record, message, "done", attempts=prior, progress=1.0)
            self._drop_superseded(record, message)
            return True
        return False

    def _failed(
        self, record: Record, message: Message | None, exc: Exception, attempts: int
    ) -> bool:
        """Count a failed attempt: defer the event, or park it once attempts run out."""
        STAGE_FAILURES.labels(stage=self.stage).inc()
        if attempts >= self._max_attempts:
            return self._give_up(record, message, exc, attempts)
        delay = min(self._backoff * 2 ** (attempts - 1), self._max_backoff)
        log.warning(
            "worker %s: attempt %d of %d at event %s (%s, project %s) failed; next in %.1fs: %s",
            self.group,
            attempts,
            self._max_attempts,
            record.event_id,
            record.topic,
            record.key,
            delay,
            exc,
            exc_info=attempts == 1,
        )
        done, _ = self._retrying(
            f"defer event {record.event_id}",
            partial(self._persist_retry, record, attempts, str(exc)),
        )
        if not done:
            return False
        self._deferred[record.event_id] = _Deferred(record, attempts, time.monotonic() + delay)
        self._state(record, message, "failed", attempts=attempts, error=str(exc))
        return True

    def _give_up(
        self, record: Record, message: Message | None, exc: Exception, attempts: int
    ) -> bool:
        done, _ = self._retrying(
            f"park dead letter {record.event_id}", partial(self._dead_letter, record, exc, attempts)
        )
        if done:
            self._deferred.pop(record.event_id, None)
            self._state(record, message, "parked", attempts=attempts, error=str(exc))
        return done

    def _dead_letter(self, record: Record, exc: Exception, attempts: int) -> None:
        DEAD_LETTERS.labels(stage=self.stage).inc()
        log.error(
            "worker %s parks event %s (%s, project %s) as a dead letter after %d attempt(s): %s",
            self.group,
            record.event_id,
            record.topic,
            record.key,
            attempts,
            exc,
        )
        park_event(self._store, self.stage, record, str(exc), attempts)
        self._mark_done(record)

    # deferred events -------------------------------------------------------------------
    def _retry_key(self, event_id: str, attempts: int) -> str:
        return f"_retry/{self.group}/{key_part(event_id)}/{attempts:04d}.json"

    def _persist_retry(self, record: Record, attempts: int, error: str) -> None:
        body = json.dumps({**asdict(record), "value": record.value.hex(), "error": error})
        try:
            self._store.put(
                self._retry_key(record.event_id, attempts),
                body.encode(),
                content_type="application/json",
            )
        except ArtifactExists:
            pass

    def _restore_deferred(self) -> None:
        """Deferred events of this group left by an earlier run (not handled or parked since)."""
        latest: dict[str, tuple[int, str]] = {}
        for info in self._store.list(f"_retry/{self.group}/"):
            parts = info.key.split("/")
            attempts = int(parts[-1].split(".")[0])
            if attempts >= latest.get(parts[-2], (0, ""))[0]:
                latest[parts[-2]] = (attempts, info.key)
        for attempts, key in latest.values():
            try:
                body = json.loads(self._store.get(key))
                body.pop("error", None)
                record = Record(**{**body, "value": bytes.fromhex(body["value"])})
            except (ValueError, TypeError, KeyError) as exc:
                log.error(
                    "worker %s cannot read deferred event %s (%s); skipped", self.group, key, exc
                )
                continue
            if not self._already_done(record):
                self._deferred[record.event_id] = _Deferred(record, attempts, time.monotonic())
        if self._deferred:
            log.info("worker %s resumes %d deferred event(s)", self.group, len(self._deferred))

    def _retry_due(self) -> bool:
        """Attempt the deferred events that are due; False if stopping meanwhile."""
        now = time.monotonic()
        for item in sorted(self._deferred.values(), key=lambda d: d.due):
            if item.due > now:
                break
            if self._stopping() or not self._attempt(item.record, prior=item.attempts):
                return False
            self._last_progress = time.monotonic()
        return True

    def _next_due_in(self) -> float:
        if not self._deferred:
            return self._poll_timeout
        wait = min(d.due for d in self._deferred.values()) - time.monotonic()
        return max(0.0, min(self._poll_timeout, wait))

    def _drop_superseded(self, record: Record, message: Message | None) -> None:
        """On a coalesced topic, deferred older events of the project are superseded now."""
        if record.topic not in self._coalesce:
            return
        created = _created_ms(record)
        if created is None:
            return
        for item in list(self._deferred.values()):
            old = item.record
            old_created = _created_ms(old)
            if (
                (old.topic, old.key) == (record.topic, record.key)
                and old_created is not None
                and old_created <= created
            ):
                done, _ = self._retrying(
                    f"record superseded event {old.event_id}", partial(self._mark_done, old)
                )
                if done:
                    self._deferred.pop(old.event_id, None)
                    self._state(
                        old,
                        None,
                        "done",
                        attempts=item.attempts,
                        progress=1.0,
                        error=f"superseded by {record.event_id}",
                    )

    # visible state -----------------------------------------------------------------------
    def _state(
        self,
        record: Record,
        message: Message | None,
        state: str,
        *,
        attempts: int = 0,
        error: str = "",
        progress: float = 0.0,
    ) -> None:
        """Write the stage record; best effort (the event's own handling decides its fate)."""
        meta = getattr(message, "meta", None)
        try:
            write_state(
                self._store,
                StageRecord(
                    project=(meta.project if meta is not None and meta.project else record.key),
                    dataset=meta.dataset if meta is not None else "",
                    stage=self.stage,
                    state=state,
                    event_id=record.event_id,
                    topic=record.topic,
                    attempts=attempts,
                    error=error[:2000],
                    progress=progress,
                ),
            )
        except HistoloopError as exc:
            log.warning(
                "worker %s cannot record %s state of event %s: %s",
                self.group,
                state,
                record.event_id,
                exc,
            )

    def oldest_unhandled_age(self) -> float:
        """Seconds since the oldest event this worker holds (in hand or deferred) was published."""
        stamps = list(self._in_hand.values()) + [
            d.record.timestamp_ms for d in list(self._deferred.values())
        ]
        return max(0.0, time.time() - min(stamps) / 1000) if stamps else 0.0

    def check_stalled(self) -> None:
        """Readiness: raise Unavailable if an event in hand has not progressed for too long.

        Raises:
            Unavailable: naming the stage, the event and for how long.
        """
        in_hand = dict(self._in_hand)
        idle = time.monotonic() - self._last_progress
        if in_hand and idle > self._stall_seconds:
            event_id = next(iter(in_hand))
            raise Unavailable(
                f"stage {self.stage} has not progressed past event {event_id} for "
                f"{idle:.0f}s (threshold {self._stall_seconds:.0f}s)"
            )

    # idempotency ledger -----------------------------------------------------------------
    def _ledger_key(self, record: Record) -> str:
        return f"_consumers/{self.group}/{record.event_id}"

    def _already_done(self, record: Record) -> bool:
        return self._store.exists(self._ledger_key(record))

    def _mark_done(self, record: Record) -> None:
        try:
            self._store.put(
                self._ledger_key(record), record.topic.encode(), content_type="text/plain"
            )
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


def _created_ms(record: Record) -> int | None:
    """When the event was created (its header's ``created_at``; 0 without one), None if it
    does not parse."""
    try:
        message = events.decode(record)
    except InvalidArgument:
        return None
    meta = getattr(message, "meta", None)
    return int(meta.created_at.ToMilliseconds()) if meta is not None else 0


@dataclass
class _Deferred:
    """An event waiting for its next attempt after ``attempts`` failed ones."""

    record: Record
    attempts: int
    due: float
    """``time.monotonic()`` of the next attempt."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means a dependency is down (retry without limit), not a bad event.

    Transient: :class:`histoloop.errors.Unavailable` (broker, artifact store, database,
    Triton unreachable), timeouts, refused or reset connections, and gRPC calls that failed
    with UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED.
    """
    if isinstance(exc, Unavailable | TimeoutError | ConnectionError):
        return True
    code = getattr(exc, "code", None)
    if isinstance(exc, grpc.RpcError) and callable(code):
        return code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    return False
