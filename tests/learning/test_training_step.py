"""The training step on stored artifacts: augmented views, the registry, and skipping one-class labels."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from histoloop import events
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.embedded import EmbeddedBus
from histoloop.datasets import write_anndata
from histoloop.models import list_cards, load_model
from histoloop.training.step import TrainingStep
from histoloop.v1 import common_pb2, events_pb2


def _setup(tmp_path: Path, classes_of_labels: list[str]) -> tuple[TrainingStep, EmbeddedBus, events_pb2.LabelsCommitted]:
    store = LocalArtifactStore(tmp_path / "artifacts")
    bus = EmbeddedBus(tmp_path / "events.sqlite")
    rng = np.random.default_rng(0)
    n, d, views = 300, 16, 3
    y = rng.integers(0, 2, n)
    clean = (rng.normal(size=(n, d)) + y[:, None] * 2).astype(np.float32)
    aug = np.stack([clean] + [clean + rng.normal(scale=0.3, size=clean.shape) for _ in range(views - 1)], axis=1)
    obs = pd.DataFrame({"array_row": np.arange(n) // 20, "array_col": np.arange(n) % 20 * 2},
                       index=[f"b{i}" for i in range(n)])
    uri = write_anndata(store, "embeddings/p/d1/e.h5ad",
                        ad.AnnData(obs=obs, obsm={"X_morph": clean, "X_morph_aug": aug.astype(np.float32)}))
    labelled = rng.choice(n, 60, replace=False)
    doc = {"project": "p", "label_version": 1, "consensus": "majority", "n_labelled_spots": 60,
           "classes": [{"name": c, "color": ""} for c in ("neg", "pos")],
           "datasets": {"d1": {"labels": {f"b{i}": classes_of_labels[y[i] % len(classes_of_labels)]
                                          for i in labelled}, "disagreement": {}}}}
    store.put("labels/p/v1.json", json.dumps(doc).encode())
    msg = events_pb2.LabelsCommitted(
        meta=events.new_meta(project="p", producer="test"), batch_id="b1", label_version=1,
        labels_uri=store.uri("labels/p/v1.json"), embeddings_uris=[uri], classes=["neg", "pos"],
        config=common_pb2.LoopConfig(head="mlp", features=common_pb2.FEATURE_SET_MORPHOLOGY))
    return TrainingStep(store, bus), bus, msg


def test_augmented_views_are_used_and_the_model_is_registered(tmp_path: Path) -> None:
    step, bus, msg = _setup(tmp_path, ["neg", "pos"])
    step.on_labels(msg)
    (uri, card), = list_cards(step.store, "p")
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
    adata.uns["embedding"] = {"model": "efficientnet-lite0", "version": "0.1.0+efficientnet-lite0-57934424"}
    uri = write_anndata(step.store, "embeddings/p/d1/e2.h5ad", adata)
    msg.embeddings_uris[:] = [uri]
    msg.config.CopyFrom(common_pb2.LoopConfig(head="multimodal", features=common_pb2.FEATURE_SET_MULTIMODAL))
    step.on_labels(msg)
    (_, card), = list_cards(step.store, "p")
    assert card.head == "multimodal" and card.extra["views"] == 3
    assert card.extra["embedding_models"] == ["efficientnet-lite0@0.1.0+efficientnet-lite0-57934424"]
