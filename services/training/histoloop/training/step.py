"""The training step of the loop: a label snapshot → a registered model → ``model.trained``.

Label batches that arrive while a run is busy are coalesced by the worker (only the newest
``labels.committed`` per project in a poll batch is trained on; each snapshot holds every
label so far). A model's version is derived from the event, so a redelivered event finds
its model in the registry and re-announces it instead of training twice.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict
from typing import Any

import numpy as np

from histoloop import events
from histoloop.artifacts.base import ArtifactStore
from histoloop.bus.base import EventBus
from histoloop.datasets import feature_blocks, read_anndata
from histoloop.errors import FailedPrecondition, NotFound
from histoloop.formats.embeddings import OBSM_MORPH_VIEWS, parse_embeddings_key
from histoloop.formats.models import STATE_FILE, sibling_key, state_key
from histoloop.formats.vocab import DEFAULT_HEAD, DEFAULT_RESAMPLING
from histoloop.integration import project_feature_blocks
from histoloop.labelsets import MIN_TRAINING_CLASSES, LabelSnapshot, read_snapshot
from histoloop.metrics import MODEL_METRIC, TRAINING_RUNS
from histoloop.models import ModelCard, latest_card, list_cards, save_model
from histoloop.spatial import unit_positions
from histoloop.training.export import export_raters_torchscript, export_torchscript
from histoloop.training.pipeline import TrainedModel
from histoloop.training.raters import RaterVote, fit_round_raters, vote_rows
from histoloop.training.round import VIEW_HEADS, fit_round, head_settings
from histoloop.training.semi import SemiSupervised, pseudo_label_rows
from histoloop.v1 import common_pb2, events_pb2

__all__ = ["TrainingStep", "dataset_of", "trained_batches"]

log = logging.getLogger(__name__)
PRODUCER = "training"


def dataset_of(embeddings_uri: str) -> str:
    """The dataset id in an embeddings key ``embeddings/<project>/<dataset>/<id>.h5ad``."""
    return parse_embeddings_key(embeddings_uri).dataset


def metrics_proto(card: ModelCard) -> common_pb2.ModelMetrics:
    """A model card's validation metrics as the proto the events and status RPCs carry."""
    validation: dict[str, Any] = dict(
        card.metrics
    )  # floats, and per_class_f1: class → float | None
    counts = {k: v for k, v in card.extra.items() if isinstance(v, int)}
    return common_pb2.ModelMetrics(
        balanced_accuracy=validation.get("balanced_accuracy") or 0.0,
        macro_f1=validation.get("macro_f1") or 0.0,
        per_class_f1={
            k: v for k, v in (validation.get("per_class_f1") or {}).items() if v is not None
        },
        cohen_kappa=validation.get("kappa") or 0.0,
        accuracy=validation.get("accuracy") or 0.0,
        n_train=counts.get("n_train", 0),
        n_val=counts.get("n_validation", 0),
        train_seconds=card.train_seconds,
    )


def trained_batches(snapshot: LabelSnapshot, msg: events_pb2.LabelsCommitted) -> list[str]:
    """Every label batch a model trained on ``snapshot`` learnt from, oldest first.

    The snapshot holds every label up to its version, so that is every batch up to it —
    batches coalesced into this run included; snapshots without a batch list fall back to
    the event's own batch.
    """
    return [batch for _, batch in snapshot.batches] or [msg.batch_id]


def _pseudo_labels(
    adata,
    blocks: dict[str, np.ndarray],
    rows: np.ndarray,
    names: list[str],
    classes: list[str],
    threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Confident pseudo-labels of one dataset by label spreading (``LoopConfig.semi_supervised``)."""
    x = np.hstack([blocks[k] for k in blocks])
    z = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-8)
    positions = unit_positions(adata)
    extra, extra_names = pseudo_label_rows(
        z,
        positions,
        rows,
        np.asarray(names, dtype=object),
        tuple(classes),
        SemiSupervised(threshold=threshold),
    )
    log.info(
        "semi-supervised: %d pseudo-labels beside %d labels (threshold %.2f)",
        len(extra),
        len(rows),
        threshold,
    )
    return extra, extra_names


def _augmented_views(
    adata, config: common_pb2.LoopConfig, head: str, rows: np.ndarray
) -> np.ndarray:
    """The labelled spots' augmented image views ``(views, n, d)``, where they apply, else empty.

    They apply to the image features without neighbour means (the views are of the spot's
    own patch) and to the heads that train by epochs: ``mlp`` and ``ensemble`` on image-only
    features, ``multimodal`` on its image branch.
    """
    image_only = config.features == common_pb2.FEATURE_SET_MORPHOLOGY and head in VIEW_HEADS
    image_branch = config.features == common_pb2.FEATURE_SET_MULTIMODAL and head == "multimodal"
    if (
        OBSM_MORPH_VIEWS not in adata.obsm
        or config.spatial_neighbours
        or not (image_only or image_branch)
    ):
        return np.empty((0,))
    return np.ascontiguousarray(
        np.asarray(adata.obsm[OBSM_MORPH_VIEWS], dtype=np.float32)[rows].transpose(1, 0, 2)
    )


def _too_few_classes(project: str, n_labels: int, classes: set[str]) -> bool:
    """Whether the labels cover too few classes for a model (logged, counted as a skipped run)."""
    if len(classes) >= MIN_TRAINING_CLASSES:
        return False
    log.warning(
        "project %s: %d labels in %d class(es); a model needs %d classes — waiting for more",
        project,
        n_labels,
        len(classes),
        MIN_TRAINING_CLASSES,
    )
    TRAINING_RUNS.labels(outcome="skipped").inc()
    return True


class TrainingStep:
    """Trains a project's model on its label snapshot and announces it."""

    def __init__(self, store: ArtifactStore, bus: EventBus) -> None:
        self.store = store
        self.bus = bus

    def on_labels(self, msg: events_pb2.LabelsCommitted, _record: object = None) -> None:
        """Handle ``labels.committed``."""
        key = f"training/{msg.meta.project}/labels-{msg.meta.event_id}.pb"
        if not self.store.exists(key):
            self.store.put(key, msg.SerializeToString())  # for the manual Train RPC
        self.train(
            msg,
            version=f"v{msg.label_version:06d}-{events.derived_id(msg.meta.event_id, 'model')[:8]}",
            event_id=events.derived_id(msg.meta.event_id, "model.trained"),
        )

    def train(
        self,
        msg: events_pb2.LabelsCommitted,
        *,
        version: str,
        event_id: str,
        head: str = "",
        seed: int | None = None,
    ) -> tuple[str, ModelCard] | None:
        """Train (or find) model ``version`` on the snapshot ``msg`` names, then announce it.

        Returns None (and announces nothing) while the labels cover fewer than two classes.
        """
        project = msg.meta.project
        try:
            uri, card = latest_card(self.store, project, version)
        except NotFound:
            trained = self._train(
                msg,
                version,
                head=head or msg.config.head or DEFAULT_HEAD,
                seed=int(msg.config.seed if seed is None else seed),
                parent=msg.meta.event_id,
            )
            if trained is None:
                return None
            uri, card = trained
        metrics = metrics_proto(card)
        source = {
            **msg.meta.source_versions,
            "labels": str(msg.label_version),
            "labels_committed_ms": str(msg.meta.created_at.ToMilliseconds()),
        }
        events.publish(
            self.bus,
            events_pb2.ModelTrained(
                meta=events.new_meta(
                    project=project,
                    producer=PRODUCER,
                    event_id=event_id,
                    source_versions=source,
                    trace_id=msg.meta.trace_id,
                ),
                model_version=card.version,
                model_uri=uri,
                metrics=metrics,
                label_version=msg.label_version,
                labels_uri=msg.labels_uri,
                embeddings_uris=list(msg.embeddings_uris),
                config=msg.config,
                classes=list(card.classes),
            ),
        )
        return uri, card

    def _train(
        self, msg: events_pb2.LabelsCommitted, version: str, *, head: str, seed: int, parent: str
    ) -> tuple[str, ModelCard] | None:
        project, config = msg.meta.project, msg.config
        snapshot = read_snapshot(self.store, msg.labels_uri)
        classes = list(msg.classes) or list(snapshot.classes)
        if not msg.embeddings_uris:
            raise FailedPrecondition(
                f"labels of {project} name no embeddings; is the dataset embedded yet?"
            )
        if _too_few_classes(
            project,
            snapshot.n_labelled,  # acquisition asks for more spots meanwhile
            snapshot.labelled_classes(dataset_of(uri) for uri in msg.embeddings_uris),
        ):
            return None
        blocks_all: list[dict[str, np.ndarray]] = []
        labelled: list[np.ndarray] = []
        views_lab: list[np.ndarray] = []
        embedding_models: set[str] = set()
        labels: list[str] = []
        votes: list[RaterVote] = []
        offset = 0
        integrated = (
            project_feature_blocks(
                self.store,
                list(msg.embeddings_uris),
                config.features,
                config.spatial_neighbours,
                harmony=True,
                seed=seed,
            )
            if config.harmony and len(msg.embeddings_uris) > 1
            else None
        )
        for i, uri in enumerate(msg.embeddings_uris):
            adata = read_anndata(self.store, uri)
            meta = dict(adata.uns.get("embedding", {}))
            if meta.get("model"):
                embedding_models.add(f"{meta['model']}@{meta.get('version', '')}")
            blocks = (
                integrated[i]
                if integrated
                else feature_blocks(adata, config.features, config.spatial_neighbours)
            )
            given = snapshot.labels.get(dataset_of(uri), {})
            votes += vote_rows(
                map(str, adata.obs_names), snapshot.votes.get(dataset_of(uri), {}), offset
            )
            rows = np.array(
                [i for i, b in enumerate(adata.obs_names) if b in given], dtype=np.int64
            )
            names = [given[adata.obs_names[i]] for i in rows]
            if config.semi_supervised > 0 and len(rows):
                extra, extra_names = _pseudo_labels(
                    adata, blocks, rows, names, classes, config.semi_supervised
                )
                rows, names = np.concatenate([rows, extra]), names + [str(v) for v in extra_names]
            blocks_all.append(blocks)
            labelled.append(rows + offset)
            offset += adata.n_obs
            views_lab.append(_augmented_views(adata, config, head, rows))
            labels += names
        if _too_few_classes(
            project, len(labels), set(labels)
        ):  # labelled barcodes missing from the embeddings
            return None
        keys = list(blocks_all[0])
        all_x = {k: np.concatenate([b[k] for b in blocks_all]) for k in keys}
        views = None
        if all(v.size for v in views_lab) and len({v.shape[0] for v in views_lab}) == 1:
            views = np.concatenate(views_lab, axis=1)  # (views, n, d), view 0 clean
        n_views = (
            views.shape[0] if views is not None and (head == "multimodal" or len(keys) == 1) else 1
        )
        previous = self._previous(project, head)
        started = time.perf_counter()
        try:
            trained = fit_round(
                all_x,
                np.concatenate(labelled),
                labels,
                head=head,
                seed=seed,
                classes=classes,
                resampling=config.resampling or DEFAULT_RESAMPLING,
                views=views,
                previous=previous,
                hyperparameters=head_settings(config, head),
                resampling_every=int(config.resampling_every),
            )
        except Exception:
            TRAINING_RUNS.labels(outcome="failure").inc()
            raise
        module = export_torchscript(trained)
        raters_module, raters = None, []
        if (
            len({annotator for _, annotator, _ in votes}) >= 2
        ):  # each annotator's own view beside the consensus
            per_rater = fit_round_raters(all_x, trained, votes, seed=seed)
            raters_module, raters = (
                export_raters_torchscript(trained, per_rater),
                list(per_rater.raters),
            )
            log.info(
                "project %s: per-annotator model of %s on %d labels, %d epochs",
                project,
                raters,
                len(votes),
                per_rater.epochs,
            )
        state = state_key(project, version)
        if not self.store.exists(state):
            self.store.put(state, trained.to_bytes())
        card = ModelCard(
            project=project,
            version=version,
            head=head,
            classes=list(trained.classes),
            input_dim=int(sum(v.shape[1] for v in all_x.values())),
            features=int(config.features),
            spatial_neighbours=int(config.spatial_neighbours),
            seed=seed,
            label_version=int(msg.label_version),
            label_batch_ids=trained_batches(snapshot, msg),
            embeddings_uris=list(msg.embeddings_uris),
            hyperparameters={k: str(v) for k, v in trained.hyperparameters.items()},
            metrics=dict(trained.validation),
            train_seconds=time.perf_counter() - started,
            created_ms=int(time.time() * 1000),
            parent_event_id=parent,
            extra={
                "n_train": trained.n_train,
                "n_validation": trained.n_validation,
                "resampling": trained.resampling,
                "n_labels": len(labels),
                "harmony": bool(integrated),
                "new_label_batch_ids": self._new_batches(project, snapshot, msg),
                "views": int(n_views),
                "embedding_models": sorted(embedding_models),
            },
            raters=raters,
        )
        uri = save_model(self.store, card, module, raters_module)
        TRAINING_RUNS.labels(outcome="success").inc()
        for name in ("macro_f1", "balanced_accuracy", "kappa"):
            value = trained.validation.get(name)
            if value is not None:
                MODEL_METRIC.labels(project=project, metric=name).set(value)
        log.info(
            "trained %s %s on %d labels in %.2fs: %s",
            project,
            version,
            len(labels),
            card.train_seconds,
            {k: v for k, v in asdict(card).items() if k == "metrics"},
        )
        return uri, card

    def _new_batches(
        self, project: str, snapshot: LabelSnapshot, msg: events_pb2.LabelsCommitted
    ) -> list[str]:
        """The batches since the project's newest earlier model (more than one when coalesced)."""
        cards = [
            c for _, c in list_cards(self.store, project) if c.label_version < msg.label_version
        ]
        after = max((c.label_version for c in cards), default=0)
        if not snapshot.batches:
            return [msg.batch_id]
        return [b for v, b in snapshot.batches if v > after]

    def _previous(self, project: str, head: str) -> TrainedModel | None:
        """The project's newest model of the same head, for a warm start."""
        for uri, card in reversed(list_cards(self.store, project)):
            if card.head == head:
                key = sibling_key(self.store.key_from_uri(uri), STATE_FILE)
                return TrainedModel.from_bytes(self.store.get(key))
        return None

    def retrain(
        self, project: str, *, head: str = "", seed: int | None = None
    ) -> tuple[str, ModelCard]:
        """The Train RPC: train again on the project's newest label snapshot, and announce it."""
        stored = [i for i in self.store.list(f"training/{project}/") if i.key.endswith(".pb")]
        if not stored:
            raise NotFound(f"project {project!r} has no committed labels yet")
        latest = max(
            (events_pb2.LabelsCommitted.FromString(self.store.get(i.key)) for i in stored),
            key=lambda m: m.label_version,
        )
        run = uuid.uuid4().hex[:8]
        trained = self.train(
            latest,
            version=f"v{latest.label_version:06d}-manual-{run}",
            event_id=events.derived_id(latest.meta.event_id, f"manual/{run}"),
            head=head,
            seed=seed,
        )
        if trained is None:
            raise FailedPrecondition(f"project {project!r} needs labels in at least two classes")
        return trained
