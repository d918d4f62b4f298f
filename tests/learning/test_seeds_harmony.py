"""Harmony integration of a multi-dataset project's expression features (issue 17)."""

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
from histoloop.integration import harmonize, project_feature_blocks
from histoloop.models import list_cards, load_model
from histoloop.prediction.step import PredictionStep
from histoloop.training.pipeline import train_model
from histoloop.training.predict import predict
from histoloop.training.step import TrainingStep
from histoloop.v1 import common_pb2, events_pb2


def _sections(seed: int = 0, n: int = 300, genes: int = 40, shift: float = 1.0):
    """Two sections with the same three tissue classes and a gene-wise batch shift."""
    r = np.random.default_rng(seed)
    centres = r.normal(0, 1.0, (3, genes))
    ya, yb = r.integers(0, 3, n), r.integers(0, 3, n)
    a = centres[ya] + r.standard_normal((n, genes))
    b = centres[yb] + r.standard_normal((n, genes)) + r.normal(0, shift, genes)
    return a.astype(np.float32), ya, b.astype(np.float32), yb


def _class_means(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.stack([z[y == c].mean(axis=0) for c in range(3)])


def test_harmony_brings_the_same_class_of_two_sections_together() -> None:
    a, ya, b, yb = _sections()
    za, zb = harmonize([a, b], n_pcs=10)
    assert za.shape == (300, 10) and zb.shape == (300, 10) and za.dtype == np.float32
    # the same PCs without integration, for comparison
    x = np.r_[a, b].astype(np.float64)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    pcs = x @ np.linalg.svd(x, full_matrices=False)[2][:10].T
    before = np.linalg.norm(
        _class_means(pcs[:300], ya) - _class_means(pcs[300:], yb), axis=1
    ).mean()
    after = np.linalg.norm(_class_means(za, ya) - _class_means(zb, yb), axis=1).mean()
    apart = np.linalg.norm(_class_means(za, ya)[0] - _class_means(za, ya)[1])
    assert after < 0.3 * before  # same class, two sections: brought together
    assert apart > 5 * after  # different classes stay apart
    model = train_model(za, ya.astype(str), head="logreg", validation_fraction=0.0)
    assert (predict(model, zb).predicted == yb).mean() > 0.95


def _project(tmp_path: Path):
    store = LocalArtifactStore(tmp_path / "artifacts")
    a, ya, b, yb = _sections()
    uris, truth = [], {}
    for name, x, y in (("d1", a, ya), ("d2", b, yb)):
        obs = pd.DataFrame(
            {"array_row": np.arange(len(x)) // 20, "array_col": np.arange(len(x)) % 20 * 2},
            index=[f"{name}-{i}" for i in range(len(x))],
        )
        uris.append(
            write_anndata(
                store, f"embeddings/p/{name}/e.h5ad", ad.AnnData(obs=obs, obsm={"X_expr": x})
            )
        )
        truth[name] = {f"{name}-{i}": f"c{c}" for i, c in enumerate(y)}
    labelled = {k: v for k, v in list(truth["d1"].items())[:150]}  # labels on section 1 only
    doc = {
        "project": "p",
        "label_version": 1,
        "consensus": "majority",
        "n_labelled_spots": 150,
        "classes": [{"name": c, "color": ""} for c in ("c0", "c1", "c2")],
        "datasets": {"d1": {"labels": labelled, "disagreement": {}}},
    }
    store.put("labels/p/v1.json", json.dumps(doc).encode())
    return store, uris, truth


def test_training_and_prediction_share_the_integration(tmp_path: Path) -> None:
    store, uris, truth = _project(tmp_path)
    bus = EmbeddedBus(tmp_path / "events.sqlite")
    config = common_pb2.LoopConfig(
        head="logreg", features=common_pb2.FEATURE_SET_EXPRESSION, harmony=True
    )
    msg = events_pb2.LabelsCommitted(
        meta=events.new_meta(project="p", producer="test"),
        batch_id="b1",
        label_version=1,
        labels_uri=store.uri("labels/p/v1.json"),
        embeddings_uris=uris,
        classes=["c0", "c1", "c2"],
        config=config,
    )
    TrainingStep(store, bus).on_labels(msg)
    ((uri, card),) = list_cards(store, "p")
    assert card.extra["harmony"] is True and card.input_dim == 30  # 30 integrated PCs
    assert len(list(store.list("integration/"))) == 1  # computed once, read back by prediction
    predictions = PredictionStep(store, bus).predict_datasets(load_model(store, uri), uris)
    assert len(list(store.list("integration/"))) == 1
    on_d2 = predictions.datasets == "d2"
    names = np.asarray(predictions.classes)[predictions.probabilities[on_d2].argmax(axis=1)]
    accuracy = np.mean(
        [names[i] == truth["d2"][b] for i, b in enumerate(predictions.barcodes[on_d2])]
    )
    assert accuracy > 0.9  # the unlabelled second section, through the integrated features
    blocks = project_feature_blocks(store, uris[:1], config.features, harmony=True)
    assert blocks[0]["genes"].shape == (300, 40)  # one dataset: nothing to integrate
