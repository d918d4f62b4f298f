"""The prediction step of the loop: every spot of a project through the new model."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoloop import events
from histoloop.artifacts.base import ArtifactStore
from histoloop.bus.base import EventBus
from histoloop.datasets import (
    Predictions,
    feature_matrix,
    read_anndata,
    read_predictions,
    write_predictions,
)
from histoloop.errors import InvalidArgument
from histoloop.formats.embeddings import parse_embeddings_key
from histoloop.integration import project_feature_blocks
from histoloop.models import LoadedModel, latest_card, load_model
from histoloop.prediction.proposals import predictions_key
from histoloop.spatial import neighbour_indices, smooth_probabilities, visium_array_positions
from histoloop.v1 import events_pb2

__all__ = ["OnDemandPredictions", "PredictionStep", "prediction_map_png"]

log = logging.getLogger(__name__)
PRODUCER = "prediction"


@dataclass(frozen=True)
class OnDemandPredictions:
    """A model's probabilities for vectors or one dataset's embeddings (the Predict RPC)."""

    model_version: str
    classes: Sequence[str]
    probabilities: np.ndarray
    """(n, C) float32."""
    barcodes: Sequence[str] = ()
    """The spots' barcodes when predicted from embeddings."""
    missing_genes: Sequence[str] = ()
    """Genes the model knows that the embeddings lack (set to the source mean)."""


class PredictionStep:
    """Predicts a project's datasets when a model is trained and announces it."""

    def __init__(self, store: ArtifactStore, bus: EventBus) -> None:
        self.store = store
        self.bus = bus

    def predict_datasets(
        self,
        model: LoadedModel,
        embeddings_uris: list[str],
        *,
        smoothing: float = 0.0,
        neighbours: int = 0,
    ) -> Predictions:
        """Probabilities and hidden features for every spot of the given datasets.

        With ``smoothing`` = α > 0 each spot's probabilities become ``(1 − α)·own + α·mean of
        its neighbours'`` (``neighbours`` nearest spots on the array; 6 when 0). A model trained
        on Harmony-integrated expression (``card.extra["harmony"]``) gets the same integration.
        A model with a per-annotator module also gives each annotator's predicted class of
        every spot (smoothed alike), from which their disagreement follows.
        """
        parts = []
        integrated = (
            project_feature_blocks(
                self.store,
                embeddings_uris,
                model.card.features,
                model.card.spatial_neighbours,
                harmony=True,
                seed=model.card.seed,
            )
            if model.card.extra.get("harmony")
            else None
        )
        for i, uri in enumerate(embeddings_uris):
            adata = read_anndata(self.store, uri)
            x = (
                np.hstack(list(integrated[i].values()))
                if integrated
                else feature_matrix(adata, model.card.features, model.card.spatial_neighbours)
            )
            probs, hidden, members = model.predict(x)
            per_rater = (
                model.predict_raters(x)
                if model.raters_module is not None
                else np.empty((0, len(x), 1))
            )
            if smoothing > 0 and {"array_row", "array_col"} <= set(adata.obs.columns):
                nb = neighbour_indices(
                    visium_array_positions(
                        adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
                    ),
                    min(neighbours or 6, len(x) - 1),
                )
                probs = smooth_probabilities(probs, nb, smoothing)
                per_rater = (
                    np.stack([smooth_probabilities(p, nb, smoothing) for p in per_rater])
                    if len(per_rater)
                    else per_rater
                )
            dataset = str(adata.uns.get("dataset", parse_embeddings_key(uri).dataset))
            positions = (
                adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.float64)
                if {"array_row", "array_col"} <= set(adata.obs.columns)
                else np.zeros((len(x), 2))
            )
            parts.append(
                (
                    np.full(len(x), dataset),
                    np.asarray(adata.obs_names, dtype=str),
                    probs,
                    hidden,
                    members,
                    positions,
                    per_rater.argmax(axis=2),
                )
            )
        return Predictions(
            model_version=model.card.version,
            classes=list(model.card.classes),
            datasets=np.concatenate([p[0] for p in parts]),
            barcodes=np.concatenate([p[1] for p in parts]),
            probabilities=np.concatenate([p[2] for p in parts]),
            hidden=np.concatenate([p[3] for p in parts]),
            member_probabilities=np.concatenate([p[4] for p in parts], axis=1)
            if parts[0][4].shape[0] > 1
            else None,
            positions=np.concatenate([p[5] for p in parts]),
            raters=list(model.card.raters) if model.raters_module is not None else [],
            rater_predicted=np.concatenate([p[6] for p in parts], axis=1)
            if model.raters_module is not None
            else None,
        )

    def predict_on_demand(
        self,
        project: str,
        model_version: str = "",
        *,
        vectors: np.ndarray | None = None,
        embeddings_uri: str = "",
        annotator: str = "",
    ) -> OnDemandPredictions:
        """Probabilities from a project's model (the newest unless ``model_version``).

        Give ``vectors`` (``(n, input_dim)`` features) or ``embeddings_uri`` (a dataset's
        embeddings, featurised as the model was trained). With ``annotator`` the
        probabilities are that annotator's, from the model's per-annotator module.

        Raises:
            NotFound: no such model, or (``annotator_id``) an annotator the model does not know.
            FailedPrecondition: ``annotator`` given and the model has no per-annotator module.
            InvalidArgument: neither or both inputs, or features of the wrong width.
        """
        if (vectors is None) == (not embeddings_uri):
            raise InvalidArgument("input: give vectors or embeddings_uri")
        uri, _ = latest_card(self.store, project, model_version)
        model = load_model(self.store, uri)
        barcodes: list[str] = []
        missing: list[str] = []
        if vectors is None:
            adata = read_anndata(self.store, embeddings_uri)
            vectors = feature_matrix(adata, model.card.features, model.card.spatial_neighbours)
            barcodes = list(map(str, adata.obs_names))
            missing = [str(g) for g in adata.uns.get("missing_genes", [])]
        probs = model.predict_as(vectors, annotator) if annotator else model.predict(vectors)[0]
        return OnDemandPredictions(
            model_version=model.card.version,
            classes=list(model.card.classes),
            probabilities=probs,
            barcodes=barcodes,
            missing_genes=missing,
        )

    def on_model(self, msg: events_pb2.ModelTrained, _record: object = None) -> None:
        """Handle ``model.trained``: predict, store, announce ``predictions.ready``."""
        project = msg.meta.project
        key = predictions_key(project, msg.model_version)
        map_key = f"predictions/{project}/{msg.model_version}-map.png"
        if self.store.exists(key):
            predictions = read_predictions(self.store, self.store.uri(key))
        else:
            model = load_model(self.store, msg.model_uri)
            predictions = self.predict_datasets(
                model,
                list(msg.embeddings_uris),
                smoothing=msg.config.smoothing,
                neighbours=msg.config.spatial_neighbours,
            )
            if not self.store.exists(map_key):
                self.store.put(map_key, prediction_map_png(predictions), content_type="image/png")
            write_predictions(self.store, key, predictions)
        message = events_pb2.PredictionsReady(
            meta=events.new_meta(
                project=project,
                dataset=msg.meta.dataset,
                producer=PRODUCER,
                event_id=events.derived_id(msg.meta.event_id, "predictions"),
                source_versions={**msg.meta.source_versions, "model": msg.model_version},
                trace_id=msg.meta.trace_id,
            ),
            model_version=msg.model_version,
            predictions_uri=self.store.uri(key),
            label_version=msg.label_version,
            labels_uri=msg.labels_uri,
            config=msg.config,
            classes=list(predictions.classes),
            metrics=msg.metrics,
            prediction_map_uri=self.store.uri(map_key) if self.store.exists(map_key) else "",
        )
        events.publish(self.bus, message)
        log.info(
            "predicted %d spots of %s with model %s",
            len(predictions.barcodes),
            project,
            msg.model_version,
        )


def prediction_map_png(predictions: Predictions) -> bytes:
    """Spots coloured by predicted class on their array positions, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(predictions.datasets.tolist()))
    fig, axes = plt.subplots(
        1, len(datasets), figsize=(5.5 * len(datasets), 5.5), dpi=110, squeeze=False
    )
    cmap = plt.get_cmap("tab10" if len(predictions.classes) <= 10 else "tab20")
    predicted = predictions.probabilities.argmax(axis=1)
    positions = (
        predictions.positions
        if predictions.positions is not None
        else np.zeros((len(predicted), 2))
    )
    for ax, dataset in zip(axes[0], datasets, strict=True):
        rows = predictions.datasets == dataset
        ax.scatter(
            positions[rows, 1],
            -positions[rows, 0],
            c=[cmap(i) for i in predicted[rows]],
            s=8,
            linewidths=0,
        )
        ax.set_title(f"{dataset} — model {predictions.model_version}")
        ax.set_aspect("equal")
        ax.axis("off")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=cmap(i), label=c)
        for i, c in enumerate(predictions.classes)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
