"""The outbox relay: publishes what the store committed, exactly once per event id.

A committed label batch (or dataset registration) has one outbox row, written in the same
transaction. The relay takes unpublished rows oldest first and, for each:

1. for ``labels.committed``: writes the consensus label snapshot of that label version to
   ``labels/<project>/v<version>.json`` — or reuses it if an earlier attempt that crashed
   wrote it already (the snapshot only reads events up to that version, so it is the
   same either way) — and fills in ``n_labelled_spots``, ``embeddings_uris`` and
   ``n_trainable_classes`` (the classes labelled in the datasets with embeddings, counted
   from the consensus in memory, so that acquisition need not read the snapshot);
2. publishes the event with the event id fixed at commit time;
3. marks the row published.

A crash anywhere in between leaves the row unpublished, and the relay of the restarted
process publishes it again: consumers, which deduplicate on event id, see it once.
Rows of one project are published in commit order: a failing row holds back the later
rows of its project (not of other projects) until it succeeds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from sqlalchemy.exc import SQLAlchemyError

from histoloop import events
from histoloop.annotation_store.repository import AnnotationRepository, OutboxRow
from histoloop.annotation_store.snapshot import SnapshotBuilder, snapshot_key
from histoloop.artifacts.base import ArtifactExists, ArtifactStore
from histoloop.bus.base import EventBus
from histoloop.errors import HistoloopError, Unavailable
from histoloop.labelsets import LabelSnapshot
from histoloop.v1 import events_pb2

__all__ = ["OutboxRelay"]

log = logging.getLogger(__name__)
_MAX_BACKOFF = 30.0


class OutboxRelay:
    """Background loop (the :class:`histoloop.runtime.Background` protocol) draining the outbox."""

    def __init__(
        self,
        repo: AnnotationRepository,
        bus: EventBus,
        artifacts: ArtifactStore,
        *,
        poll_interval: float = 0.5,
        batch_size: int = 100,
        after_snapshot: Callable[[OutboxRow], None] | None = None,
        after_publish: Callable[[OutboxRow], None] | None = None,
    ) -> None:
        """Create the relay (not started).

        Args:
            repo: the store's repository (outbox rows, snapshots).
            bus: where events go.
            artifacts: where label snapshots go.
            poll_interval: seconds between polls when nothing wakes the relay.
            batch_size: rows read per poll.
            after_snapshot: test hook, called after the snapshot is written, before publishing.
            after_publish: test hook, called after publishing, before the row is marked.
        """
        self._repo = repo
        self._bus = bus
        self._artifacts = artifacts
        self._poll_interval = poll_interval
        self._batch_size = batch_size
        self._after_snapshot = after_snapshot
        self._after_publish = after_publish
        self._snapshots = SnapshotBuilder(repo)
        self._embeddings: dict[str, dict[str, str]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._failing_since: float | None = None
        self.published = 0
        """Events published by this relay (for tests and logs)."""

    # Background protocol -----------------------------------------------------------------
    def start(self) -> None:
        """Start the relay thread (no-op if running)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
            self._thread.start()

    def stop(self, timeout: float) -> None:
        """Finish the row in hand (up to ``timeout`` s) and stop; safe to call twice."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning(
                    "outbox relay still busy after %.1fs; unpublished rows wait for the next start",
                    timeout,
                )

    def notify(self) -> None:
        """Wake the relay now (called after a commit that wrote outbox rows)."""
        self._wake.set()

    def check(self) -> None:
        """Health probe: raise :class:`Unavailable` if the relay thread died."""
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._stop.is_set():
            raise Unavailable("the outbox relay thread has stopped; events are not being published")

    # the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self._poll_interval
        while not self._stop.is_set():
            self._wake.clear()
            try:
                ok = self.run_once()
            except (HistoloopError, SQLAlchemyError, OSError) as exc:
                log.warning("outbox relay cannot read the outbox: %s", exc)
                ok = False
            if ok:
                backoff = self._poll_interval
                self._wake.wait(self._poll_interval)
            else:
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)

    def run_once(self) -> bool:
        """Publish every pending row once (in order per project).

        Returns:
            False if some row failed (it stays pending and is retried).
        """
        with self._repo.relay_lock() as mine:
            if not mine:  # another replica relays; we stand by
                return True
            return self._drain()

    def _drain(self) -> bool:
        all_ok = True
        while not self._stop.is_set():
            rows = self._repo.pending_outbox(self._batch_size)
            if not rows:
                return all_ok
            blocked: set[str] = set()
            done: list[int] = []
            self._embeddings = {}  # read once per project per pass
            try:
                for row in rows:
                    if self._stop.is_set():
                        return all_ok
                    if row.project_id in blocked:
                        continue
                    try:
                        self._relay(row)
                        done.append(row.id)
                    except (HistoloopError, SQLAlchemyError, OSError, ValueError) as exc:
                        all_ok = False
                        blocked.add(row.project_id)
                        log.warning(
                            "outbox row %d (%s, event %s) not published: %s",
                            row.id,
                            row.topic,
                            row.event_id,
                            exc,
                        )
                        try:
                            self._repo.record_outbox_failure(row.id, str(exc))
                        except (HistoloopError, SQLAlchemyError) as again:
                            log.warning(
                                "cannot record the failure of outbox row %d: %s", row.id, again
                            )
            finally:
                # published rows are marked together; a crash before this republishes them
                # (same event ids: consumers drop the repeats)
                self._repo.mark_published(done)
                self.published += len(done)
            if not done or len(rows) < self._batch_size:
                return all_ok
        return all_ok

    def _relay(self, row: OutboxRow) -> None:
        message_type = events.TOPICS[row.topic]
        message = message_type()
        message.ParseFromString(row.payload)
        if isinstance(message, events_pb2.LabelsCommitted):
            assert row.label_version is not None
            message.n_labelled_spots, classes_in = self._ensure_snapshot(
                row.project_id, row.label_version
            )
            # the embeddings after the snapshot: the later they are read, the likelier the store
            # has recorded embeddings.ready of a dataset labelled right after its first query set
            if row.project_id not in self._embeddings:
                self._embeddings[row.project_id] = self._repo.embeddings_uris(row.project_id)
            embeddings = self._embeddings[row.project_id]
            message.n_trainable_classes = classes_in(list(embeddings))
            message.labels_uri = self._artifacts.uri(
                snapshot_key(row.project_id, row.label_version)
            )
            message.embeddings_uris[:] = list(embeddings.values())
        if self._after_snapshot is not None:
            self._after_snapshot(row)
        events.publish(self._bus, message)
        if self._after_publish is not None:
            self._after_publish(row)
        log.debug("published %s %s (outbox row %d)", row.topic, row.event_id, row.id)

    def _ensure_snapshot(
        self, project_id: str, label_version: int
    ) -> tuple[int, Callable[[Iterable[str]], int]]:
        """Write (or reuse) the label snapshot of a version.

        Returns:
            Its labelled-spot count, and a function that counts its classes labelled in the
            datasets it is given.
        """
        key = snapshot_key(project_id, label_version)
        if self._artifacts.exists(key):
            return _counts(self._artifacts.get(key))
        data, n_labelled = self._snapshots.build(project_id, label_version)
        try:
            self._artifacts.put(
                key,
                data,
                content_type="application/json",
                metadata={"project": project_id, "label_version": str(label_version)},
            )
        except ArtifactExists:
            # another relay (replica) wrote it meanwhile: the same content by construction
            return _counts(self._artifacts.get(key))
        return n_labelled, lambda datasets: len(
            self._snapshots.trainable_classes(project_id, label_version, datasets)
        )


def _counts(snapshot: bytes) -> tuple[int, Callable[[Iterable[str]], int]]:
    """Labelled spots of a snapshot written before, and its class count in given datasets."""
    parsed = LabelSnapshot.from_json(snapshot)
    return parsed.n_labelled, lambda datasets: len(parsed.labelled_classes(datasets))
