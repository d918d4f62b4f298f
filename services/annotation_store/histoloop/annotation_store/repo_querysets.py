"""The repository's query-sets room: query sets and rounds, status, agreement, exports.

Query sets arrive from ``queryset.ready`` and open their round; the status and the
agreement report summarise a project's labels; the Loupe CSV exports (labels, query set,
predictions) follow the dataset's positions-file order.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import and_, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from histoloop.annotation_store import models as m
from histoloop.annotation_store.agreement import fleiss_kappa, pairwise_cohen
from histoloop.annotation_store.consensus import compute_consensus, dawid_skene, latest_votes
from histoloop.annotation_store.domain import (
    AgreementReport,
    ProjectStatus,
    QuerySetRecord,
    QuerySpot,
)
from histoloop.annotation_store.loupe import (
    DEFAULT_GROUP,
    DEFAULT_PREDICTIONS_GROUP,
    labels_csv,
    predictions_csv,
    query_set_csv,
)
from histoloop.annotation_store.raters import rater_confusions
from histoloop.annotation_store.repo_base import RepositoryBase, _now, _utc
from histoloop.errors import FailedPrecondition, InvalidArgument, NotFound
from histoloop.labelsets import MIN_TRAINING_CLASSES

__all__ = ["QuerySetsMixin"]

log = logging.getLogger(__name__)


def _classes_notice(per_class: Mapping[str, int], asked: int | None) -> str:
    """GetStatus' notice while the labels cover too few classes for a model.

    ``asked``: the size of the query set chosen on the newest labels, None while it is
    still being chosen.
    """
    given = sum(1 for n in per_class.values() if n)
    if not 0 < given < MIN_TRAINING_CLASSES:
        return ""
    need = f"need labels of at least {MIN_TRAINING_CLASSES} classes"
    return f"{need}; choosing more spots" if asked is None else f"{need}; asking {asked} more spots"


@dataclass(frozen=True)
class _ConsensusCounts:
    """What GetStatus needs of the consensus at one label version."""

    per_class: Counter[str]
    n_labelled: int
    n_disputed: int


class QuerySetsMixin(RepositoryBase):
    """Query sets and rounds, project status and agreement, the Loupe CSV exports."""

    # query sets ------------------------------------------------------------------------------
    def record_query_set(self, record: QuerySetRecord, event_id: str) -> bool:
        """Store a query set from ``queryset.ready`` and open its round.

        Returns:
            False when it is a duplicate (same event id or query-set id) or the project is
            unknown (logged); True when stored.
        """
        now = _now()
        try:
            with self.db.write() as s:
                if s.get(m.Project, record.project_id) is None:
                    log.warning(
                        "query set %s for unknown project %s ignored",
                        record.queryset_id,
                        record.project_id,
                    )
                    return False
                seen = s.scalar(
                    select(m.QuerySet.id).where(
                        (m.QuerySet.event_id == event_id)
                        | and_(
                            m.QuerySet.project_id == record.project_id,
                            m.QuerySet.queryset_id == record.queryset_id,
                        )
                    )
                )
                if seen is not None:
                    return False
                qs = m.QuerySet(
                    project_id=record.project_id,
                    queryset_id=record.queryset_id,
                    event_id=event_id,
                    round=record.round,
                    strategy=record.strategy,
                    model_version=record.model_version,
                    label_version=record.label_version,
                    queryset_uri=record.queryset_uri,
                    predictions_uri=record.predictions_uri,
                    metrics=dict(record.metrics),
                    stopping=dict(record.stopping),
                    created_at=record.created_at or now,
                )
                s.add(qs)
                s.flush()
                if record.spots:
                    s.execute(
                        insert(m.QuerySetSpot.__table__),
                        [
                            {
                                "queryset_pk": qs.id,
                                "position": i,
                                "dataset_id": q.dataset,
                                "barcode": q.barcode,
                                "score": q.score,
                                "reason": q.reason,
                            }
                            for i, q in enumerate(record.spots)
                        ],
                    )
                held = s.get(m.Round, (record.project_id, record.round))
                if held is None:
                    s.add(
                        m.Round(
                            project_id=record.project_id,
                            round=record.round,
                            queryset_pk=qs.id,
                            label_version=record.label_version,
                            started_at=now,
                        )
                    )
                else:  # a re-issued query set for the same round replaces the round's query set
                    held.queryset_pk = qs.id
        except IntegrityError:
            return False
        return True

    def get_query_set(self, project_id: str, queryset_id: str = "") -> QuerySetRecord:
        """A query set (the latest if ``queryset_id`` is empty). Raises :class:`NotFound`."""
        with self.db.read() as s:
            self._project(s, project_id)
            query = select(m.QuerySet).where(m.QuerySet.project_id == project_id)
            if queryset_id:
                query = query.where(m.QuerySet.queryset_id == queryset_id)
            qs = s.scalars(query.order_by(m.QuerySet.id.desc()).limit(1)).first()
            if qs is None:
                what = f"query set {queryset_id!r} not found" if queryset_id else "no query set yet"
                raise NotFound(f"{what} in project {project_id!r}")
            return self._query_set_record(s, qs)

    def list_query_sets(
        self, project_id: str, *, after: int = 0
    ) -> list[tuple[int, QuerySetRecord]]:
        """``(sequence, query set)`` of a project in arrival order, those after ``after`` only."""
        with self.db.read() as s:
            self._project(s, project_id)
            rows = s.scalars(
                select(m.QuerySet)
                .where(m.QuerySet.project_id == project_id, m.QuerySet.id > after)
                .order_by(m.QuerySet.id)
            ).all()
            return [(qs.id, self._query_set_record(s, qs)) for qs in rows]

    def _query_set_record(self, s: Session, qs: m.QuerySet) -> QuerySetRecord:
        spots = s.execute(
            select(
                m.QuerySetSpot.barcode,
                m.QuerySetSpot.score,
                m.QuerySetSpot.dataset_id,
                m.QuerySetSpot.reason,
            )
            .where(m.QuerySetSpot.queryset_pk == qs.id)
            .order_by(m.QuerySetSpot.position)
        )
        return QuerySetRecord(
            queryset_id=qs.queryset_id,
            project_id=qs.project_id,
            round=qs.round,
            strategy=qs.strategy,
            model_version=qs.model_version,
            spots=tuple(
                QuerySpot(barcode=b, score=sc, dataset=d, reason=r) for b, sc, d, r in spots
            ),
            label_version=qs.label_version,
            queryset_uri=qs.queryset_uri,
            predictions_uri=qs.predictions_uri,
            metrics=qs.metrics or {},
            stopping=qs.stopping or {},
            created_at=_utc(qs.created_at),
        )

    # status, agreement ----------------------------------------------------------------------
    def status(self, project_id: str) -> ProjectStatus:
        """Round, labels per class, latest model metrics, stopping signal, pending events."""
        with self.db.read() as s:
            project = self._project(s, project_id)
            classes = [c.name for c in self._classes(s, project_id)]
            round_no = (
                s.scalar(select(func.max(m.Round.round)).where(m.Round.project_id == project_id))
                or 0
            )
            latest = s.scalars(
                select(m.QuerySet)
                .where(m.QuerySet.project_id == project_id)
                .order_by(m.QuerySet.id.desc())
                .limit(1)
            ).first()
            n_spots = (
                s.scalar(
                    select(func.coalesce(func.sum(m.Dataset.n_in_tissue), 0)).where(
                        m.Dataset.project_id == project_id, m.Dataset.removed_at.is_(None)
                    )
                )
                or 0
            )
            pending = (
                s.scalar(
                    select(func.count())
                    .select_from(m.Outbox)
                    .where(m.Outbox.project_id == project_id, m.Outbox.published_at.is_(None))
                )
                or 0
            )
            key = ("status", project_id, project.label_version, project.consensus)
            counts = self._summaries.get(key)
            if counts is None:  # the consensus of every label, once per label version
                result = compute_consensus(self._votes(s, project_id), project.consensus)
                counts = _ConsensusCounts(
                    Counter(c.label for c in result.labels.values()),
                    len(result.labels),
                    sum(1 for c in result.labels.values() if c.disputed),
                )
                self._summaries.put(key, counts)
            assert isinstance(counts, _ConsensusCounts)
            # the size of the newest query set, which only the too-few-classes notice reports
            asked = (
                s.scalar(
                    select(func.count())
                    .select_from(m.QuerySetSpot)
                    .where(m.QuerySetSpot.queryset_pk == latest.id)
                )
                if latest and 0 < len(counts.per_class) < MIN_TRAINING_CLASSES
                else 0
            )
        per_class = dict.fromkeys(classes, 0) | dict(counts.per_class)
        answered = latest is not None and latest.label_version == project.label_version
        return ProjectStatus(
            project_id=project_id,
            round=int(round_no),
            labelled_per_class=per_class,
            n_labelled=counts.n_labelled,
            n_spots=int(n_spots),
            label_version=project.label_version,
            latest_model_version=latest.model_version if latest else "",
            latest_metrics=(latest.metrics or {}) if latest else {},
            stopping=(latest.stopping or {}) if latest else {},
            n_disputed=counts.n_disputed,
            pending_events=int(pending),
            notice=_classes_notice(per_class, int(asked or 0) if answered else None),
        )

    def agreement(self, project_id: str, dataset_id: str = "") -> AgreementReport:
        """Fleiss' kappa, Cohen's kappa per annotator pair, disputed spots, DS reliabilities
        (computed once per label version, consensus rule and class schema)."""
        with self.db.read() as s:
            project = self._project(s, project_id)
            if dataset_id:
                self._dataset(s, project_id, dataset_id)
            rule = project.consensus
            class_names = tuple(c.name for c in self._classes(s, project_id))
            key = ("agreement", project_id, dataset_id, project.label_version, rule, class_names)
            cached = self._summaries.get(key)
            if isinstance(cached, AgreementReport):
                return cached
            votes = self._votes(s, project_id, dataset_id=dataset_id)
        per_item = latest_votes(votes)
        confusions = rater_confusions(per_item, compute_consensus(votes, rule).labels, class_names)
        fleiss, n_multi = fleiss_kappa(per_item)
        disputed = sorted(
            item for item, v in per_item.items() if len({x.label for x in v.values()}) > 1
        )
        _labels, reliability = dawid_skene(per_item)
        report = AgreementReport(
            fleiss_kappa=fleiss,
            cohen=tuple(pairwise_cohen(per_item)),
            n_spots_multi_rated=n_multi,
            n_disputed=len(disputed),
            disputed=tuple(
                barcode if dataset_id else f"{ds}/{barcode}" for ds, barcode in disputed
            ),
            reliability=reliability,
            rater_confusion=tuple(confusions),
            confusion_classes=class_names,
        )
        self._summaries.put(key, report)
        return report

    # exports ---------------------------------------------------------------------------------
    def export_labels(
        self, project_id: str, dataset_id: str, *, group: str = ""
    ) -> tuple[bytes, int]:
        """The consensus labels of a dataset as a Loupe CSV ``Barcode,<group>``."""
        with self.db.read() as s:
            project = self._project(s, project_id)
            votes = self._votes(s, project_id, dataset_id=dataset_id)
        result = compute_consensus(votes, project.consensus)
        labels = {barcode: c.label for (_ds, barcode), c in result.labels.items()}
        order = self.unit_order(project_id, dataset_id, including=labels)
        return labels_csv(labels, group=_group(group, DEFAULT_GROUP), order=order)

    def export_query_set(
        self, project_id: str, dataset_id: str, *, group: str = "", queryset_id: str = ""
    ) -> tuple[bytes, int]:
        """A query set's spots of a dataset, each marked ``help``, as a Loupe CSV."""
        record = self.get_query_set(project_id, queryset_id)
        barcodes = [q.barcode for q in record.spots if q.dataset in ("", dataset_id)]
        order = self.unit_order(project_id, dataset_id, including=barcodes)
        return query_set_csv(barcodes, group=_group(group, DEFAULT_GROUP), order=order)

    def export_predictions(
        self, project_id: str, dataset_id: str, *, group: str = "", queryset_id: str = ""
    ) -> tuple[bytes, int]:
        """Predicted classes of a dataset with the query spots marked ``help``.

        Raises:
            FailedPrecondition: no query set with predictions yet, or no predictions loader wired.
        """
        record = self.get_query_set(project_id, queryset_id)
        if not record.predictions_uri:
            raise FailedPrecondition(
                f"query set {record.queryset_id!r} carries no predictions (cold start?)"
            )
        if self.predictions_loader is None:
            raise FailedPrecondition(
                "the predictions export is not wired to a predictions reader yet"
            )
        predictions = self.predictions_loader(record.predictions_uri, dataset_id)
        barcodes = [q.barcode for q in record.spots if q.dataset in ("", dataset_id)]
        order = self.unit_order(project_id, dataset_id, including=[*predictions, *barcodes])
        return predictions_csv(
            predictions, barcodes, group=_group(group, DEFAULT_PREDICTIONS_GROUP), order=order
        )


def _group(given: str, default: str) -> str:
    group = (given or default).strip()
    if not group or not group.isprintable():
        raise InvalidArgument(f"group_name: {given!r} is not a printable name")
    return group
