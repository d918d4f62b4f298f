"""The training step on stored artifacts: augmented views, the registry, skipping one-class labels, and
the per-annotator model trained beside the consensus model when two or more annotators labelled."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from histoloop import events
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.embedded import EmbeddedBus
from histoloop.datasets import predicted_classes, read_predictions, write_anndata, write_predictions
from histoloop.errors import FailedPrecondition, NotFound
from histoloop.formats.models import raters_key
from histoloop.models import list_cards, load_model
from histoloop.prediction.step import PredictionStep
from histoloop.training.step import TrainingStep
from histoloop.v1 import common_pb2, events_pb2


def _setup(
    tmp_path: Path, classes_of_labels: list[str]
) -> tuple[TrainingStep, EmbeddedBus, events_pb2.LabelsCommitted]:
    store = LocalArtifactStore(tmp_path / "artifacts")
    bus = EmbeddedBus(tmp_path / "events.sqlite")
    rng = np.random.default_rng(0)
    n, d, views = 300, 16, 3
    y = rng.integers(0, 2, n)
    clean = (rng.normal(size=(n, d)) + y[:, None] * 2).astype(np.float32)
    aug = np.stack(
        [clean] + [clean + rng.normal(scale=0.3, size=clean.shape) for _ in range(views - 1)],
        axis=1,
    )
    obs = pd.DataFrame(
        {"array_row": np.arange(n) // 20, "array_col": np.arange(n) % 20 * 2},
        index=[f"b{i}" for i in range(n)],
    )
    uri = write_anndata(
        store,
        "embeddings/p/d1/e.h5ad",
        ad.AnnData(obs=obs, obsm={"X_morph": clean, "X_morph_aug": aug.astype(np.float32)}),
    )
    labelled = rng.choice(n, 60, replace=False)
    doc = {
        "project": "p",
        "label_version": 1,
        "consensus": "majority",
        "n_labelled_spots": 60,
        "classes": [{"name": c, "color": ""} for c in ("neg", "pos")],
        "datasets": {
            "d1": {
                "labels": {
                    f"b{i}": classes_of_labels[y[i] % len(classes_of_labels)] for i in labelled
                },
                "disagreement": {},
            }
        },
    }
    store.put("labels/p/v1.json", json.dumps(doc).encode())
    msg = events_pb2.LabelsCommitted(
        meta=events.new_meta(project="p", producer="test"),
        batch_id="b1",
        label_version=1,
        labels_uri=store.uri("labels/p/v1.json"),
        embeddings_uris=[uri],
        classes=["neg", "pos"],
        config=common_pb2.LoopConfig(head="mlp", features=common_pb2.FEATURE_SET_MORPHOLOGY),
    )
    return TrainingStep(store, bus), bus, msg


def test_augmented_views_are_used_and_the_model_is_registered(tmp_path: Path) -> None:
    step, bus, msg = _setup(tmp_path, ["neg", "pos"])
    step.on_labels(msg)
    ((uri, card),) = list_cards(step.store, "p")
    assert card.extra["views"] == 3 and card.head == "mlp" and card.label_batch_ids == ["b1"]
    probs, hidden, _ = load_model(step.store, uri).predict(np.zeros((4, 16), np.float32))
    assert probs.shape == (4, 2) and hidden.shape[0] == 4
    announced = bus.consumer("t", [events.MODEL_TRAINED]).poll(1.0)
    assert len(announced) == 1
    step.on_labels(msg)  # a redelivery: same model, announced again under the same event id
    assert len(list_cards(step.store, "p")) == 1
    again = bus.consumer("t2", [events.MODEL_TRAINED]).poll(1.0)
    assert {r.event_id for r in again} == {announced[0].event_id}


def test_labels_of_one_class_wait_for_more(tmp_path: Path) -> None:
    step, bus, msg = _setup(tmp_path, ["pos"])
    step.on_labels(msg)
    assert list_cards(step.store, "p") == []
    assert bus.consumer("t", [events.MODEL_TRAINED]).poll(0.2) == []


def test_the_multimodal_head_draws_views_on_its_image_branch(tmp_path: Path) -> None:
    step, bus, msg = _setup(tmp_path, ["neg", "pos"])
    adata = ad.read_h5ad(step.store.get_file("embeddings/p/d1/e.h5ad", tmp_path / "e.h5ad"))
    adata.obsm["X_expr"] = np.random.default_rng(1).normal(size=(adata.n_obs, 5)).astype(np.float32)
    adata.uns["embedding"] = {
        "model": "efficientnet-lite0",
        "version": "0.1.0+efficientnet-lite0-57934424",
    }
    uri = write_anndata(step.store, "embeddings/p/d1/e2.h5ad", adata)
    msg.embeddings_uris[:] = [uri]
    msg.config.CopyFrom(
        common_pb2.LoopConfig(head="multimodal", features=common_pb2.FEATURE_SET_MULTIMODAL)
    )
    step.on_labels(msg)
    ((_, card),) = list_cards(step.store, "p")
    assert card.head == "multimodal" and card.extra["views"] == 3
    assert card.extra["embedding_models"] == [
        "efficientnet-lite0@0.1.0+efficientnet-lite0-57934424"
    ]


def _two_raters(tmp_path: Path) -> tuple[TrainingStep, events_pb2.LabelsCommitted, np.ndarray]:
    """Rater ``x`` splits the spots by feature 0, rater ``y`` by feature 1; both label the same 200."""
    store = LocalArtifactStore(tmp_path / "artifacts")
    rng = np.random.default_rng(3)
    n, d = 400, 8
    X = rng.normal(size=(n, d)).astype(np.float32)
    obs = pd.DataFrame(
        {"array_row": np.arange(n) // 20, "array_col": np.arange(n) % 20 * 2},
        index=[f"b{i}" for i in range(n)],
    )
    uri = write_anndata(store, "embeddings/p/d1/e.h5ad", ad.AnnData(obs=obs, obsm={"X_morph": X}))
    classes = ("neg", "pos")
    votes = {
        f"b{i}": {"x": classes[int(X[i, 0] > 0)], "y": classes[int(X[i, 1] > 0)]}
        for i in range(200)
    }
    doc = {
        "project": "p",
        "label_version": 1,
        "consensus": "latest_expert",
        "n_labelled_spots": 200,
        "classes": [{"name": c, "color": ""} for c in classes],
        "datasets": {
            "d1": {
                "labels": {b: v["x"] for b, v in votes.items()},
                "disagreement": {},
                "votes": votes,
            }
        },
    }
    store.put("labels/p/v1.json", json.dumps(doc).encode())
    msg = events_pb2.LabelsCommitted(
        meta=events.new_meta(project="p", producer="test"),
        batch_id="b1",
        label_version=1,
        labels_uri=store.uri("labels/p/v1.json"),
        embeddings_uris=[uri],
        classes=list(classes),
        config=common_pb2.LoopConfig(head="mlp", features=common_pb2.FEATURE_SET_MORPHOLOGY),
    )
    return TrainingStep(store, EmbeddedBus(tmp_path / "events.sqlite")), msg, X


def test_two_annotators_give_each_annotator_a_model_beside_the_consensus(tmp_path: Path) -> None:
    step, msg, X = _two_raters(tmp_path)
    step.on_labels(msg)
    ((uri, card),) = list_cards(step.store, "p")
    assert list(card.raters) == ["x", "y"]
    assert step.store.exists(raters_key("p", card.version))
    model = load_model(step.store, uri)
    unseen = X[200:]  # spots no rater labelled
    as_x = model.predict_as(unseen, "x").argmax(axis=1)
    as_y = model.predict_as(unseen, "y").argmax(axis=1)
    assert (as_x == (unseen[:, 0] > 0)).mean() > 0.85 and (as_y == (unseen[:, 1] > 0)).mean() > 0.85
    differ = (unseen[:, 0] > 0) != (unseen[:, 1] > 0)
    assert (as_x != as_y)[differ].mean() > 0.7 and (as_x != as_y)[~differ].mean() < 0.3
    assert np.array_equal(model.predict_raters(unseen).argmax(axis=2), np.stack([as_x, as_y]))
    with pytest.raises(NotFound, match="annotator_id"):
        model.predict_as(unseen, "z")

    # the prediction step stores each annotator's classes with the predictions
    predictions = PredictionStep(step.store, step.bus).predict_datasets(
        model, list(msg.embeddings_uris)
    )
    assert list(predictions.raters) == ["x", "y"]
    assert np.array_equal(predictions.predicted_as("y")[200:], np.asarray(card.classes)[as_y])
    assert np.array_equal(predictions.rater_disagreement[200:], (as_x != as_y).astype(float))
    write_predictions(step.store, "predictions/p/v.npz", predictions)
    again = read_predictions(step.store, step.store.uri("predictions/p/v.npz"))
    assert predicted_classes(again, "d1", "x") == predicted_classes(predictions, "d1", "x")
    with pytest.raises(NotFound, match="annotator_id"):
        predicted_classes(again, "d1", "nobody")


def test_one_annotator_gives_no_per_annotator_model(tmp_path: Path) -> None:
    step, _bus, msg = _setup(tmp_path, ["neg", "pos"])  # an old snapshot: no votes at all
    step.on_labels(msg)
    ((uri, card),) = list_cards(step.store, "p")
    assert list(card.raters) == [] and not step.store.exists(raters_key("p", card.version))
    model = load_model(step.store, uri)
    with pytest.raises(FailedPrecondition, match="per-annotator"):
        model.predict_as(np.zeros((2, 16), np.float32), "x")
    predictions = PredictionStep(step.store, step.bus).predict_datasets(
        model, list(msg.embeddings_uris)
    )
    assert predictions.rater_predicted is None and predictions.rater_disagreement is None
    with pytest.raises(FailedPrecondition, match="per-annotator"):
        predictions.predicted_as("x")
