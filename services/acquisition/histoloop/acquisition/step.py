"""The acquisition step of the loop: cold start on embeddings, next query set on predictions.

Labels of fewer than :data:`~histoloop.labelsets.MIN_TRAINING_CLASSES` classes give no model
(training waits for more), so no predictions would ever come: on such a ``labels.committed``
the acquisition asks for more spots at once, chosen by
:data:`~histoloop.acquisition.round.MORE_CLASSES_STRATEGY` away from the labelled ones,
until a second class is labelled (an imbalanced section whose cold start hit one class
only never stalls).

Every query set is an immutable record ``querysets/<project>/r<round>-<id>.json`` whose id is
derived from the event that caused it, so a redelivered event finds its record and
re-announces the same query set instead of making a second one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from google.protobuf import json_format

from histoloop import events
from histoloop.acquisition.round import MORE_CLASSES_STRATEGY, select_query
from histoloop.acquisition.settings import stopping_options, stopping_rounds
from histoloop.acquisition.stopping import RoundPredictions, recommend_stop
from histoloop.acquisition.strategies import QueryContext, Selection
from histoloop.artifacts.base import ArtifactStore
from histoloop.bus.base import EventBus
from histoloop.datasets import Predictions, feature_matrix, read_anndata, read_predictions
from histoloop.errors import FailedPrecondition, InvalidArgument, NotFound
from histoloop.formats.embeddings import parse_embeddings_key
from histoloop.formats.querysets import queryset_key, querysets_prefix
from histoloop.formats.vocab import (
    DEFAULT_COLD_START,
    DEFAULT_QUERY_SIZE,
    DEFAULT_STRATEGY,
    MAX_QUERY_SIZE,
)
from histoloop.labelsets import MIN_TRAINING_CLASSES, LabelSnapshot, read_snapshot
from histoloop.metrics import LOOP_LATENCY, QUERYSETS, ROUND
from histoloop.v1 import common_pb2, events_pb2

__all__ = ["AcquisitionStep", "QueryRecord"]

log = logging.getLogger(__name__)
PRODUCER = "acquisition"


@dataclass(frozen=True)
class QueryRecord:
    """A stored query set (what the annotation store records and exports)."""

    queryset_id: str
    project: str
    round: int
    strategy: str
    model_version: str
    label_version: int
    spots: list[dict]
    predictions_uri: str = ""
    labels_uri: str = ""
    history: tuple[str, ...] = ()
    """URIs of the predictions of this and earlier rounds (newest last), for stopping."""
    stopping: dict | None = None
    config: dict = field(default_factory=dict)
    """The project's ``LoopConfig`` (proto JSON) the set was chosen with."""
    strategy_state: dict | None = None
    """What a stateful strategy (``bandit``) learnt up to this query set; the next round starts from it."""
    note: str = ""
    """Why the strategy chose otherwise than its name says (``Selection.note``), or empty."""


class AcquisitionStep:
    """Chooses query sets and announces them with ``queryset.ready``."""

    def __init__(self, store: ArtifactStore, bus: EventBus) -> None:
        self.store = store
        self.bus = bus

    # records -------------------------------------------------------------------------
    def records(self, project: str) -> list[QueryRecord]:
        """The project's query sets, oldest round first."""
        infos = self.store.list(querysets_prefix(project))
        out = [
            QueryRecord(**json.loads(self.store.get(i.key)))
            for i in infos
            if i.key.endswith(".json")
        ]
        return sorted(out, key=lambda r: r.round)

    @staticmethod
    def _find(records: list[QueryRecord], queryset_id: str) -> QueryRecord | None:
        return next((r for r in records if r.queryset_id == queryset_id), None)

    @staticmethod
    def _key(record: QueryRecord) -> str:
        return queryset_key(record.project, record.round, record.queryset_id)

    # handlers ------------------------------------------------------------------------
    def on_embeddings(self, msg: events_pb2.EmbeddingsReady, _record: object = None) -> None:
        """Cold start: the project's first query set, by diversity on the embeddings."""
        project = msg.meta.project
        queryset_id = events.derived_id(msg.meta.event_id, "cold-start")
        records = self.records(project)
        existing = self._find(records, queryset_id)
        if existing is None and records:
            log.info(
                "project %s has query sets already; no cold start for dataset %s",
                project,
                msg.meta.dataset,
            )
            return
        if existing is None:
            adata = read_anndata(self.store, msg.embeddings_uri)
            config = msg.config
            features = feature_matrix(adata, config.features, config.spatial_neighbours)
            positions = (
                adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.float64)
                if {"array_row", "array_col"} <= set(adata.obs.columns)
                else None
            )
            ctx = QueryContext(
                features=features, labelled=np.zeros(len(features), bool), positions=positions
            )
            name = config.cold_start_strategy or DEFAULT_COLD_START
            selection = self._select(name, config, ctx)
            spots = [
                {
                    "dataset": msg.meta.dataset,
                    "barcode": str(adata.obs_names[i]),
                    "score": float(s),
                    "reason": "cold_start",
                }
                for i, s in zip(selection.indices, selection.scores, strict=True)
            ]
            existing = QueryRecord(
                queryset_id=queryset_id,
                project=project,
                round=0,
                strategy=name,
                model_version="",
                label_version=0,
                spots=spots,
                config=_config_json(config),
            )
            self._save(existing)
        self._announce(existing, msg.meta, msg.config, None, None)

    def on_predictions(self, msg: events_pb2.PredictionsReady, _record: object = None) -> None:
        """The next round's query set from the new model's predictions."""
        project = msg.meta.project
        queryset_id = events.derived_id(msg.meta.event_id, "queryset")
        previous = self.records(project)
        record = self._find(previous, queryset_id)
        if record is None:
            record = self.compute(
                project,
                msg.predictions_uri,
                msg.labels_uri,
                msg.config,
                queryset_id=queryset_id,
                label_version=msg.label_version,
                previous=previous,
            )
            self._save(record)
        self._announce(record, msg.meta, msg.config, msg.metrics, msg.predictions_uri)

    def on_labels(self, msg: events_pb2.LabelsCommitted, _record: object = None) -> None:
        """Labels of too few classes for a model: ask for more spots now (else training's turn).

        The event's ``n_trainable_classes`` decides, so labels of enough classes (the usual
        case) cost no read of the label snapshot; it is read only to choose the spots. An
        event with no count — from a store older than the field, or with no label in a
        dataset with embeddings — is counted from the snapshot, as before the field.
        """
        if not msg.embeddings_uris:
            return
        n_classes = msg.n_trainable_classes
        snapshot = None
        if not n_classes:
            snapshot = read_snapshot(self.store, msg.labels_uri)
            if not snapshot.n_labelled:
                return
            datasets = [parse_embeddings_key(uri).dataset for uri in msg.embeddings_uris]
            n_classes = len(snapshot.labelled_classes(datasets))
        if n_classes >= MIN_TRAINING_CLASSES:
            return
        project = msg.meta.project
        queryset_id = events.derived_id(msg.meta.event_id, "more-classes")
        previous = self.records(project)
        record = self._find(previous, queryset_id)
        if record is None:
            if snapshot is None:
                snapshot = read_snapshot(self.store, msg.labels_uri)
            record = self._more_classes(project, msg, snapshot, queryset_id, previous)
            self._save(record)
        log.info(
            "project %s: labels of %d class(es), a model needs %d; asking %d more spots",
            project,
            n_classes,
            MIN_TRAINING_CLASSES,
            len(record.spots),
        )
        self._announce(record, msg.meta, msg.config, None, None)

    def _more_classes(
        self,
        project: str,
        msg: events_pb2.LabelsCommitted,
        snapshot: LabelSnapshot,
        queryset_id: str,
        previous: list[QueryRecord],
    ) -> QueryRecord:
        """Unlabelled spots of every embedded dataset far from the labelled ones."""
        config = msg.config
        blocks, keys, positions = [], [], []
        for uri in msg.embeddings_uris:
            adata = read_anndata(self.store, uri)
            dataset = parse_embeddings_key(uri).dataset
            blocks.append(feature_matrix(adata, config.features, config.spatial_neighbours))
            keys += [(dataset, str(b)) for b in adata.obs_names]
            positions.append(
                adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.float64)
                if {"array_row", "array_col"} <= set(adata.obs.columns)
                else None
            )
        labelled = np.array([b in snapshot.labels.get(d, {}) for d, b in keys], dtype=bool)
        round_ = (previous[-1].round + 1) if previous else 1
        ctx = QueryContext(
            features=np.vstack(blocks),
            labelled=labelled,
            round=round_,
            positions=positions[0] if len(positions) == 1 else None,
        )  # one array grid only
        selection = self._select(MORE_CLASSES_STRATEGY, config, ctx)
        spots = [
            {"dataset": keys[i][0], "barcode": keys[i][1], "score": float(s), "reason": "diversity"}
            for i, s in zip(selection.indices, selection.scores, strict=True)
        ]
        return QueryRecord(
            queryset_id=queryset_id,
            project=project,
            round=round_,
            strategy=MORE_CLASSES_STRATEGY,
            model_version="",
            label_version=int(msg.label_version),
            spots=spots,
            labels_uri=msg.labels_uri,
            config=_config_json(config),
        )

    # the query -----------------------------------------------------------------------
    def compute(
        self,
        project: str,
        predictions_uri: str,
        labels_uri: str,
        config: common_pb2.LoopConfig,
        *,
        queryset_id: str,
        label_version: int,
        strategy: str = "",
        query_size: int = 0,
        seed: int | None = None,
        previous: list[QueryRecord] | None = None,
    ) -> QueryRecord:
        """Choose a query set from predictions and the labels they were trained on.

        ``previous`` is the project's query sets if the caller has read them already.
        """
        predictions = read_predictions(self.store, predictions_uri)
        snapshot = read_snapshot(self.store, labels_uri)
        labelled = np.array(
            [
                b in snapshot.labels.get(d, {})
                for d, b in zip(predictions.datasets, predictions.barcodes, strict=True)
            ],
            dtype=bool,
        )
        disagreement = np.array(
            [
                snapshot.disagreement.get(d, {}).get(b, 0.0)
                for d, b in zip(predictions.datasets, predictions.barcodes, strict=True)
            ]
        )
        previous = self.records(project) if previous is None else previous
        round_ = (previous[-1].round + 1) if previous else 1
        class_index = {str(c): i for i, c in enumerate(predictions.classes)}
        labels = np.array(
            [
                class_index.get(str(snapshot.labels.get(d, {}).get(b)), -1)
                for d, b in zip(predictions.datasets, predictions.barcodes, strict=True)
            ],
            dtype=np.int64,
        )
        ctx = QueryContext(
            features=predictions.hidden,
            labelled=labelled,
            probabilities=predictions.probabilities,
            member_probabilities=predictions.member_probabilities,
            positions=predictions.positions,
            disagreement=disagreement if disagreement.any() else None,
            round=round_,
            labels=labels,
            rater_disagreement=predictions.rater_disagreement,
        )
        name = strategy or config.strategy or DEFAULT_STRATEGY
        # a stateful strategy continues from the state stored with the last query set of the same strategy
        state = next(
            (
                r.strategy_state
                for r in reversed(previous)
                if r.strategy == name and r.strategy_state
            ),
            None,
        )
        selection = self._select(name, config, ctx, query_size=query_size, seed=seed, state=state)
        if selection.note:
            log.warning("project %s round %d: %s", project, round_, selection.note)
        keep = stopping_rounds(config)  # rounds the rule looks at
        history = tuple(previous[-1].history[-(keep - 1) :] if previous else ()) + (
            predictions_uri,
        )
        spots = [
            {
                "dataset": str(predictions.datasets[i]),
                "barcode": str(predictions.barcodes[i]),
                "score": float(s),
                "reason": "adjudication" if adj else "uncertainty",
            }
            for i, s, adj in zip(
                selection.indices, selection.scores, selection.adjudication, strict=True
            )
        ]
        return QueryRecord(
            queryset_id=queryset_id,
            project=project,
            round=round_,
            strategy=name,
            model_version=predictions.model_version,
            label_version=label_version,
            spots=spots,
            predictions_uri=predictions_uri,
            labels_uri=labels_uri,
            history=history,
            stopping=self._stopping(history, predictions, config),
            config=_config_json(config),
            strategy_state=selection.state,
            note=selection.note,
        )

    def what_if(
        self, project: str, *, strategy: str = "", query_size: int = 0, seed: int | None = None
    ) -> QueryRecord:
        """A query set on the latest predictions with the project's stored config, not recorded.

        ``strategy``, ``query_size`` and ``seed`` override the project's when given.

        Raises:
            NotFound: no query set yet.
            FailedPrecondition: no model yet.
        """
        latest = self.latest(project)
        config = common_pb2.LoopConfig(strategy=latest.strategy)
        if latest.config:
            json_format.ParseDict(latest.config, config, ignore_unknown_fields=True)
        return self.compute(
            project,
            latest.predictions_uri,
            latest.labels_uri,
            config,
            queryset_id=events.derived_id(
                latest.queryset_id, f"query/{strategy}/{query_size}/{seed}"
            ),
            label_version=latest.label_version,
            strategy=strategy,
            query_size=query_size,
            seed=seed,
        )

    def _select(
        self,
        name: str,
        config: common_pb2.LoopConfig,
        ctx: QueryContext,
        *,
        query_size: int = 0,
        seed: int | None = None,
        state: dict | None = None,
    ) -> Selection:
        return select_query(
            ctx,
            strategy=name,
            query_size=int(query_size or config.query_size or DEFAULT_QUERY_SIZE),
            seed=int(config.seed if seed is None else seed),
            settings=config,
            state=state,
        )

    def _stopping(
        self,
        history: Sequence[str],
        current: Predictions,
        config: common_pb2.LoopConfig | None = None,
    ) -> dict:
        rounds = [
            current if uri == history[-1] else read_predictions(self.store, uri) for uri in history
        ]
        keys = [(str(d), str(b)) for d, b in zip(current.datasets, current.barcodes, strict=True)]
        aligned = []
        for preds in rounds:
            index = {
                (str(d), str(b)): i
                for i, (d, b) in enumerate(zip(preds.datasets, preds.barcodes, strict=True))
            }
            if any(k not in index for k in keys):
                continue  # a dataset joined later; compare only rounds over the same spots
            rows = np.array([index[k] for k in keys])
            aligned.append(
                RoundPredictions(
                    predicted=preds.probabilities[rows].argmax(1),
                    probabilities=preds.probabilities[rows],
                )
            )
        signal = recommend_stop(aligned, **stopping_options(config))
        return {
            "changed_fraction": signal.changed_share or 0.0,
            "kappa_vs_previous": signal.kappa or 0.0,
            "mean_uncertainty": signal.mean_uncertainty or 0.0,
            "recommend_stop": signal.stop,
            "reason": signal.reason,
        }

    # output --------------------------------------------------------------------------
    def _save(self, record: QueryRecord) -> None:
        key = self._key(record)
        if not self.store.exists(key):
            self.store.put(
                key, json.dumps(record.__dict__).encode(), content_type="application/json"
            )

    def _announce(
        self,
        record: QueryRecord,
        parent: common_pb2.EventMeta,
        config: common_pb2.LoopConfig,
        metrics: common_pb2.ModelMetrics | None,
        predictions_uri: str | None,
    ) -> None:
        key = self._key(record)
        stopping = events_pb2.StoppingSignal(**record.stopping) if record.stopping else None
        message = events_pb2.QuerySetReady(
            meta=events.new_meta(
                project=record.project,
                dataset=parent.dataset,
                producer=PRODUCER,
                event_id=events.derived_id(record.queryset_id, "announce"),
                source_versions=dict(parent.source_versions),
                trace_id=parent.trace_id,
            ),
            queryset_id=record.queryset_id,
            round=record.round,
            strategy=record.strategy,
            model_version=record.model_version,
            label_version=record.label_version,
            spots=[common_pb2.ScoredSpot(**s) for s in record.spots],
            queryset_uri=self.store.uri(key),
            predictions_uri=predictions_uri or "",
            metrics=metrics,
            stopping=stopping,
        )
        events.publish(self.bus, message)
        QUERYSETS.labels(project=record.project, strategy=record.strategy).inc()
        ROUND.labels(project=record.project).set(record.round)
        committed_ms = parent.source_versions.get("labels_committed_ms")
        if committed_ms:
            LOOP_LATENCY.labels(project=record.project).observe(
                max(0.0, time.time() - int(committed_ms) / 1000)
            )
        log.info(
            "query set %s round %d (%s, %d spots) for %s",
            record.queryset_id,
            record.round,
            record.strategy,
            len(record.spots),
            record.project,
        )

    def latest(self, project: str) -> QueryRecord:
        """The project's newest query set with predictions behind it.

        Raises:
            NotFound: no query set yet.
            FailedPrecondition: only the cold start so far (no model to query with).
        """
        records = self.records(project)
        if not records:
            raise NotFound(f"project {project!r} has no query sets yet")
        with_model = [r for r in records if r.predictions_uri]
        if not with_model:
            raise FailedPrecondition(
                f"project {project!r} has no model yet; label the cold-start query set"
            )
        return with_model[-1]


def _config_json(config: common_pb2.LoopConfig) -> dict:
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def check_query_args(project: str, query_size: int) -> None:
    """Validation shared by the Query RPC."""
    if not project:
        raise InvalidArgument("project_id is required")
    if query_size < 0 or query_size > MAX_QUERY_SIZE:
        raise InvalidArgument(
            f"query_size: {query_size} is not in 1..{MAX_QUERY_SIZE} (0 = the project's own size)"
        )
