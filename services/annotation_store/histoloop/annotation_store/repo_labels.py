"""The repository's labels room: label commit, Loupe import, consensus and snapshots.

A batch is validated (deduplicated, classes and barcodes checked) before its single
transaction writes the label events, the version bump and the ``labels.committed``
outbox row; the same batch id again returns the first result. Consensus and the label
snapshots are computed from the append-only label events.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from histoloop import events
from histoloop.annotation_store import models as m
from histoloop.annotation_store.consensus import ConsensusResult, Vote, compute_consensus
from histoloop.annotation_store.convert import loop_settings_to_proto
from histoloop.annotation_store.domain import (
    HELP_LABEL,
    BatchResult,
    ClassSpec,
    SpotLabelInput,
    check_id,
)
from histoloop.annotation_store.history import label_batches
from histoloop.annotation_store.loupe import parse_loupe_csv
from histoloop.annotation_store.repo_base import PRODUCER, ROLES, RepositoryBase, _now
from histoloop.annotation_store.snapshot import snapshot_document, snapshot_key
from histoloop.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from histoloop.metrics import LABELS_COMMITTED
from histoloop.v1 import events_pb2

__all__ = ["MAX_LABELS_PER_BATCH", "LabelsMixin"]

log = logging.getLogger(__name__)

MAX_LABELS_PER_BATCH = 1_000_000


class LabelsMixin(RepositoryBase):
    """Label batches (gRPC, Loupe CSV), consensus and the label snapshots."""

    def submit_labels(
        self,
        project_id: str,
        dataset_id: str,
        batch_id: str,
        labels: Sequence[SpotLabelInput],
        *,
        annotator: str,
        annotator_role: str = "annotator",
        source: str = "grpc",
        add_missing_classes: bool = False,
        queryset_id: str = "",
        n_placeholders: int = 0,
        create_annotator: bool = True,
    ) -> BatchResult:
        """Commit a batch of labels atomically, with its ``labels.committed`` outbox row.

        ``annotator`` is recorded as the labels' author; without a row yet (the local user,
        a service or admin token) one is created with ``annotator_role`` in the same
        transaction, unless ``create_annotator`` is False (labels given on someone's behalf).

        The same ``batch_id`` again (in this project) returns the first result with
        ``duplicate=True`` and changes nothing. A batch of placeholders only (a re-imported
        query-set export) is recorded without labels, version bump or event.

        Raises:
            InvalidArgument: empty batch, empty/``help`` label, a barcode twice with
                different labels, a barcode not in the dataset, a class not in the schema
                (unless ``add_missing_classes``) — naming the row.
            NotFound: the project, dataset or (on-behalf) annotator does not exist.
        """
        check_id(batch_id, "batch_id")
        if source not in ("grpc", "loupe_csv", "correction", "geojson"):
            raise InvalidArgument(
                f"source: {source!r} is not grpc, loupe_csv, correction or geojson"
            )
        if not labels and not n_placeholders:
            raise InvalidArgument("labels: the batch is empty")
        if len(labels) > MAX_LABELS_PER_BATCH:
            raise InvalidArgument(
                f"labels: {len(labels)} labels; at most {MAX_LABELS_PER_BATCH} per batch"
            )
        unique = _dedupe(labels)
        create_role = (
            annotator_role if create_annotator and annotator not in self._known_annotators else None
        )
        for _attempt in range(3):
            try:
                result = self._commit_batch(
                    project_id,
                    dataset_id,
                    batch_id,
                    unique,
                    annotator=annotator,
                    source=source,
                    add_missing_classes=add_missing_classes,
                    queryset_id=queryset_id,
                    n_placeholders=n_placeholders,
                    create_role=create_role,
                )
            except IntegrityError as exc:
                # a concurrent commit of the same batch id or class: the retry sees it
                log.info(
                    "batch %s/%s raced another commit (%s); retrying",
                    project_id,
                    batch_id,
                    exc.orig,
                )
                continue
            self._known_annotators.add(annotator)
            if result.event_id and not result.duplicate:
                LABELS_COMMITTED.labels(project=project_id).inc(result.n_labels)
                self.on_commit()
            return result
        raise FailedPrecondition(
            f"batch {batch_id!r} kept conflicting with concurrent commits; retry it"
        )

    def _commit_batch(
        self,
        project_id: str,
        dataset_id: str,
        batch_id: str,
        labels: Mapping[str, SpotLabelInput],
        *,
        annotator: str,
        source: str,
        add_missing_classes: bool,
        queryset_id: str,
        n_placeholders: int,
        create_role: str | None,
    ) -> BatchResult:
        # project, classes and spots come from caches (immutable or append-only data); the
        # transaction itself is a handful of prebuilt Core statements
        meta = self._project_meta(project_id)
        dataset = self._dataset_ref(project_id, dataset_id)
        if dataset.removed:
            raise FailedPrecondition(
                f"dataset_id: {dataset_id!r} was removed from project {project_id!r} (RemoveDataset); "
                "its labels are kept but it takes no new ones"
            )
        if any(item.label not in meta.classes for item in labels.values()):
            meta = self._project_meta(project_id, refresh=True)  # added by another call?
        classes = meta.classes
        missing: dict[str, str] = {}
        for item in labels.values():
            if item.label not in classes and item.label not in missing:
                missing[item.label] = item.row
        for label, where in missing.items():
            near = _near_class(label, classes)
            if near is not None:
                raise InvalidArgument(
                    f"{where}: class {label!r} is not in the schema of project {project_id!r}; did you "
                    f"mean {near!r}? (it differs only in case or spaces; add_missing_classes does not "
                    "create such near-duplicates)"
                )
        if missing and not add_missing_classes:
            label, where = next(iter(missing.items()))
            known = ", ".join(classes) or "no classes yet"
            raise InvalidArgument(
                f"{where}: class {label!r} is not in the schema of project {project_id!r} ({known}); "
                "add it with AddClasses or pass add_missing_classes"
            )
        new_classes = [
            ClassSpec(label).validated(f"{where}: label", len(classes) + i)
            for i, (label, where) in enumerate(missing.items())
        ]
        unknown = [b for b in labels if b not in dataset.spots]
        if unknown:  # a WSI's tiles may have arrived (tiles.ready) since the units were cached
            dataset = self._dataset_ref(project_id, dataset_id, refresh=True)
            unknown = [b for b in labels if b not in dataset.spots]
        if unknown:
            raise InvalidArgument(
                self._unknown_barcode_message(project_id, dataset_id, unknown, labels)
            )
        if queryset_id:
            self._check_queryset_id(project_id, queryset_id)

        st = self._statements
        now = _now()
        n_labels = len(labels)
        with self.db.write_conn() as c:
            if create_role is not None:
                self._ensure_annotator(c, annotator, create_role)
            # the author's role and, if this batch id was committed before, its first result
            row = c.execute(
                st.role_and_batch,
                {"annotator": annotator, "project": project_id, "batch": batch_id},
            ).first()
            if row is None:
                raise NotFound(f"annotator_id: annotator {annotator!r} not found")
            if row.label_version is not None:
                self._check_same_batch(c, project_id, batch_id, dataset.pk, labels, n_placeholders)
                return BatchResult(
                    batch_id=batch_id,
                    n_labels=row.n_labels,
                    label_version=row.label_version,
                    duplicate=True,
                    event_id=row.event_id,
                    n_placeholders=row.n_placeholders,
                )
            batch_row = {
                "project_id": project_id,
                "batch_id": batch_id,
                "dataset_pk": dataset.pk,
                "annotator_id": annotator,
                "source": source,
                "queryset_id": queryset_id,
                "n_labels": n_labels,
                "n_placeholders": n_placeholders,
                "created_at": now,
            }
            if n_labels == 0:  # placeholders only: record the batch for idempotency, nothing else
                version = c.execute(st.current_version, {"project": project_id}).scalar_one()
                c.execute(st.insert_batch, {**batch_row, "label_version": version, "event_id": ""})
                return BatchResult(
                    batch_id=batch_id,
                    n_labels=0,
                    label_version=version,
                    duplicate=False,
                    event_id="",
                    n_placeholders=n_placeholders,
                )

            # the project row lock: versions are handed out (and committed) in order
            version = c.execute(st.bump_version, {"project": project_id}).scalar_one()
            class_ids = {name: ref.id for name, ref in classes.items()}
            for position, spec in enumerate(new_classes, start=len(classes)):
                class_ids[spec.name] = c.execute(
                    st.insert_class,
                    {
                        "project_id": project_id,
                        "position": position,
                        "name": spec.name,
                        "color": spec.color,
                        "since_version": version,
                        "created_at": now,
                    },
                ).scalar_one()
            event_id = str(uuid.uuid4())
            batch_pk = c.execute(
                st.insert_batch, {**batch_row, "label_version": version, "event_id": event_id}
            ).scalar_one()
            st.insert_events(
                c,
                {
                    "project_id": project_id,
                    "batch_pk": batch_pk,
                    "annotator_id": annotator,
                    "annotator_role": row.role,
                    "source": source,
                    "label_version": version,
                    "created_at": now,
                },
                [dataset.spots[b] for b in labels],
                [class_ids[item.label] for item in labels.values()],
            )
            ordered = sorted(classes.values(), key=lambda ref: ref.position)
            schema = [ref.name for ref in ordered if ref.since_version <= version]
            message = events_pb2.LabelsCommitted(
                meta=events.new_meta(
                    project=project_id,
                    dataset=dataset_id,
                    producer=PRODUCER,
                    event_id=event_id,
                    source_versions={"labels": str(version)},
                    trace_id=event_id,
                ),
                batch_id=batch_id,
                label_version=version,
                labels_uri=self.artifacts.uri(snapshot_key(project_id, version)),
                n_labels=n_labels,
                classes=schema + [spec.name for spec in new_classes],
                config=loop_settings_to_proto(meta.settings),
            )  # n_labelled_spots, n_trainable_classes and embeddings_uris: filled in by the relay
            c.execute(
                st.insert_outbox,
                {
                    "project_id": project_id,
                    "topic": events.LABELS_COMMITTED,
                    "event_id": event_id,
                    "payload": message.SerializeToString(),
                    "label_version": version,
                    "created_at": now,
                    "published_at": None,
                    "attempts": 0,
                    "last_error": "",
                },
            )
        if new_classes:
            self._project_meta_cache.pop(project_id, None)
        return BatchResult(
            batch_id=batch_id,
            n_labels=n_labels,
            label_version=version,
            duplicate=False,
            event_id=event_id,
            n_placeholders=n_placeholders,
        )

    def _check_queryset_id(self, project_id: str, queryset_id: str) -> None:
        """Raise NotFound unless ``queryset_id`` is a query set of the project."""
        with self.db.read() as s:
            found = s.scalar(
                select(func.count())
                .select_from(m.QuerySet)
                .where(m.QuerySet.project_id == project_id, m.QuerySet.queryset_id == queryset_id)
            )
        if not found:
            raise NotFound(
                f"queryset_id: {queryset_id!r} is not a query set of project {project_id!r} "
                "(GetQuerySet/ListQuerySets list them; leave it empty for labels not asked for)"
            )

    def _check_same_batch(
        self,
        c: Connection,
        project_id: str,
        batch_id: str,
        dataset_pk: int,
        labels: Mapping[str, SpotLabelInput],
        n_placeholders: int,
    ) -> None:
        """A batch id sent again must carry what it carried the first time.

        Raises:
            AlreadyExists: the batch id was committed with other labels, another dataset or
                other placeholders (a reused id would otherwise drop the new labels silently).
        """
        B, E, S, C = (
            m.LabelBatch.__table__,
            m.LabelEvent.__table__,
            m.Spot.__table__,
            m.ProjectClass.__table__,
        )
        first = c.execute(
            select(B.c.id, B.c.dataset_pk, B.c.n_placeholders).where(
                B.c.project_id == project_id, B.c.batch_id == batch_id
            )
        ).one()
        given = c.execute(
            select(S.c.barcode, C.c.name)
            .select_from(E.join(S, E.c.spot_id == S.c.id).join(C, E.c.class_id == C.c.id))
            .where(E.c.batch_pk == first.id)
        ).all()
        before = dict((str(b), str(n)) for b, n in given)
        now = {b: item.label for b, item in labels.items()}
        if (
            first.dataset_pk != dataset_pk
            or before != now
            or first.n_placeholders != n_placeholders
        ):
            changed = sorted(b for b in set(before) | set(now) if before.get(b) != now.get(b))
            detail = (
                f"{len(changed)} spot(s) differ, e.g. {changed[0]!r}: "
                f"{before.get(changed[0], 'absent')!r} then, {now.get(changed[0], 'absent')!r} now"
                if changed
                else "another dataset or other placeholders"
            )
            raise AlreadyExists(
                f"batch_id: {batch_id!r} was committed before with different content ({detail}); "
                "a batch id is sent again only to retry the same batch — use a new batch_id"
            )

    def _unknown_barcode_message(
        self,
        project_id: str,
        dataset_id: str,
        unknown: Sequence[str],
        labels: Mapping[str, SpotLabelInput],
    ) -> str:
        first = unknown[0]
        with self.db.read() as s:
            others = s.scalars(
                select(m.Dataset.dataset_id)
                .join(m.Spot, m.Spot.dataset_pk == m.Dataset.id)
                .where(
                    m.Dataset.project_id == project_id,
                    m.Dataset.dataset_id != dataset_id,
                    m.Spot.barcode == first,
                )
                .order_by(m.Dataset.dataset_id)
            ).all()
        where = f" (it is a spot of dataset {', '.join(others)})" if others else ""
        more = f"; {len(unknown) - 1} more unknown barcodes" if len(unknown) > 1 else ""
        return f"{labels[first].row}: barcode {first!r} is not a spot of dataset {dataset_id!r}{where}{more}"

    def import_loupe_csv(
        self,
        project_id: str,
        dataset_id: str,
        batch_id: str,
        data: bytes,
        *,
        annotator: str,
        annotator_role: str = "annotator",
        add_missing_classes: bool = False,
        queryset_id: str = "",
        create_annotator: bool = True,
    ) -> BatchResult:
        """Import a Loupe category CSV as one label batch (``help`` rows are placeholders).

        Raises:
            InvalidArgument: see :func:`loupe.parse_loupe_csv` and :meth:`submit_labels`.
            NotFound: unknown project or dataset.
        """
        parsed = parse_loupe_csv(data)
        if parsed.n_empty:
            log.info(
                "Loupe import %s/%s batch %s: %d row(s) with an empty label skipped",
                project_id,
                dataset_id,
                batch_id,
                parsed.n_empty,
            )
        result = self.submit_labels(
            project_id,
            dataset_id,
            batch_id,
            parsed.labels,
            annotator=annotator,
            annotator_role=annotator_role,
            source="loupe_csv",
            add_missing_classes=add_missing_classes,
            queryset_id=queryset_id,
            n_placeholders=len(parsed.placeholders),
            create_annotator=create_annotator,
        )
        return dataclasses.replace(result, n_empty=parsed.n_empty)

    def _ensure_annotator(self, c: Connection, annotator_id: str, role: str) -> None:
        """Create the annotator row of a caller without one (the local user, service tokens)."""
        check_id(annotator_id, "annotator")
        c.execute(
            self._statements.ensure_annotator,
            {
                "id": annotator_id,
                "display_name": annotator_id,
                "role": role if role in ROLES else "annotator",
                "created_at": _now(),
            },
        )

    # consensus, snapshots ----------------------------------------------------------------------
    def consensus(self, project_id: str, *, dataset_id: str = "") -> ConsensusResult:
        """The current consensus labels (items are ``(dataset, barcode)``)."""
        with self.db.read() as s:
            project = self._project(s, project_id)
            if dataset_id:
                self._dataset(s, project_id, dataset_id)
            votes = self._votes(s, project_id, dataset_id=dataset_id)
        return compute_consensus(votes, project.consensus)

    def labels_snapshot(self, project_id: str, label_version: int) -> dict[str, Any]:
        """The consensus training labels as of ``label_version``, computed from scratch.

        Only label events up to that version count, so the result never changes. See
        :func:`snapshot.snapshot_document` for the format; the relay builds the same
        document incrementally (:class:`snapshot.SnapshotBuilder`).
        """
        with self.db.read() as s:
            project = self._project(s, project_id)
            votes = self._votes(s, project_id, max_version=label_version)
        result = compute_consensus(votes, project.consensus)
        return snapshot_document(
            project_id,
            label_version,
            project.consensus,
            self.classes_at(project_id, label_version),
            result,
            label_batches(self.db, project_id, label_version),
        )

    # what the snapshot builder reads
    def consensus_rule(self, project_id: str) -> str:
        """The project's consensus rule."""
        with self.db.read() as s:
            return self._project(s, project_id).consensus

    def snapshot_inputs(
        self, project_id: str, after_version: int, up_to_version: int
    ) -> tuple[list[Vote], list[tuple[str, str]]]:
        """Label events with ``after_version < label_version <= up_to_version`` (commit order),
        and the class schema as of ``up_to_version`` — what a snapshot builder needs."""
        with self.db.read() as s:
            votes = (
                self._votes(s, project_id, min_version=after_version, max_version=up_to_version)
                if up_to_version > after_version
                else []
            )
            return votes, self._classes_at(s, project_id, up_to_version)

    def snapshot_batches(
        self, project_id: str, after_version: int, up_to_version: int
    ) -> list[tuple[int, str]]:
        """The label batches in ``(after_version, up_to_version]`` (see :mod:`.history`)."""
        return label_batches(self.db, project_id, up_to_version, after_version=after_version)

    def classes_at(self, project_id: str, label_version: int) -> list[tuple[str, str]]:
        """``(name, colour)`` of the class schema as of a label version, in order."""
        with self.db.read() as s:
            return self._classes_at(s, project_id, label_version)

    def _classes_at(self, s: Session, project_id: str, label_version: int) -> list[tuple[str, str]]:
        C = m.ProjectClass.__table__
        return [
            (name, color)
            for name, color in s.execute(
                select(C.c.name, C.c.color)
                .where(C.c.project_id == project_id, C.c.since_version <= label_version)
                .order_by(C.c.position)
            )
        ]


def _near_class(label: str, classes: Iterable[str]) -> str | None:
    """An existing class ``label`` differs from only in case or spacing, if any."""
    key = " ".join(label.split()).casefold()
    return next((c for c in classes if c != label and " ".join(c.split()).casefold() == key), None)


def _dedupe(labels: Iterable[SpotLabelInput]) -> dict[str, SpotLabelInput]:
    """Barcode → label of a batch; the same label twice is fine, two different ones are not."""
    unique: dict[str, SpotLabelInput] = {}
    for item in labels:
        barcode, label = item.barcode.strip(), item.label.strip()
        if not barcode:
            raise InvalidArgument(f"{item.row}: empty barcode")
        if not label:
            raise InvalidArgument(f"{item.row}: empty label for barcode {barcode!r}")
        if label.lower() == HELP_LABEL:
            raise InvalidArgument(f"{item.row}: {HELP_LABEL!r} is Loupe's placeholder, not a label")
        held = unique.get(barcode)
        if held is not None:
            if held.label != label:
                raise InvalidArgument(
                    f"{item.row}: barcode {barcode!r} is labelled {label!r} here but {held.label!r} at {held.row}"
                )
            continue
        unique[barcode] = SpotLabelInput(barcode=barcode, label=label, row=item.row)
    return unique
