"""GetUnitLayer's domain: every unit as columns, on SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest

from histoloop.annotation_store.domain import QuerySetRecord, QuerySpot, SpotLabelInput
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.annotation_store.unit_layer import unit_layer
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.datasets import Predictions, write_predictions
from histoloop.errors import NotFound
from tests.annotation_store.conftest import LAYERS, barcode


def _labels(
    repo: AnnotationRepository, project: str, batch: str, who: str, pairs: dict[int, str]
) -> None:
    repo.submit_labels(
        project,
        "ds1",
        batch,
        [
            SpotLabelInput(barcode(i), label, f"labels[{k}]")
            for k, (i, label) in enumerate(pairs.items())
        ],
        annotator=who,
    )


def test_layer_columns_follow_labels_predictions_and_the_query(
    repo: AnnotationRepository, artifacts: LocalArtifactStore, project: str
) -> None:
    empty = unit_layer(repo, project, "ds1", caller="ann-a")
    n = len(empty.unit_ids)
    assert n > 0 and empty.coordinates == "fullres" and empty.classes == list(LAYERS)
    assert (empty.consensus == -1).all() and (empty.predicted == -1).all() and not empty.queryset_id
    assert empty.size[0] > 0 and len(empty.x) == len(empty.y) == n

    _labels(repo, project, "b1", "ann-a", {0: "Layer1", 1: "Layer2"})
    _labels(repo, project, "b2", "ann-b", {1: "Layer3", 2: "WM"})
    a = unit_layer(repo, project, "ds1", caller="ann-a")
    b = unit_layer(repo, project, "ds1", caller="ann-b")
    i0, i1, i2 = (a.unit_ids.index(barcode(i)) for i in range(3))
    assert a.mine[i0] == 0 and a.mine[i1] == 1 and a.mine[i2] == -1
    assert b.mine[i0] == -1 and b.mine[i1] == 2 and b.mine[i2] == 6
    consensus = repo.consensus(project, dataset_id="ds1").labels
    for i in (i0, i1, i2):
        expected = consensus[("ds1", a.unit_ids[i])]
        assert a.classes[a.consensus[i]] == expected.label and a.disputed[i] == expected.disputed
    assert a.disputed[i1] and not a.disputed[i0]
    assert sorted((u, who, c) for u, who, c in a.votes if u == i1) == [
        (i1, "ann-a", 1),
        (i1, "ann-b", 2),
    ]

    probabilities = np.full((n, len(LAYERS)), 0.1, np.float32)
    probabilities[:, 3] = 0.4
    probabilities[i2] = [0.9, 0.1 / 6, 0.1 / 6, 0.1 / 6, 0.1 / 6, 0.1 / 6, 0.1 / 6]
    uri = write_predictions(
        artifacts,
        f"predictions/{project}/m1.npz",
        Predictions(
            model_version="m1",
            classes=list(LAYERS),
            datasets=np.array(["ds1"] * n),
            barcodes=np.array(a.unit_ids),
            probabilities=probabilities,
            hidden=np.zeros((n, 2), np.float32),
        ),
    )
    repo.record_query_set(
        QuerySetRecord(
            queryset_id="qs-1",
            project_id=project,
            round=1,
            strategy="entropy",
            model_version="m1",
            spots=(
                QuerySpot(barcode(5), 0.9, "ds1", "uncertainty"),
                QuerySpot(barcode(3), 0.8, "ds1", "uncertainty"),
                QuerySpot("elsewhere-1", 0.7, "ds9", "uncertainty"),
            ),
            predictions_uri=uri,
        ),
        event_id="e-qs-1",
    )
    layer = unit_layer(repo, project, "ds1", caller="ann-a")
    assert layer.queryset_id == "qs-1" and layer.round == 1 and layer.model_version == "m1"
    assert layer.query_rank[layer.unit_ids.index(barcode(5))] == 1
    assert layer.query_rank[layer.unit_ids.index(barcode(3))] == 2
    assert int((layer.query_rank > 0).sum()) == 2  # the other dataset's unit is not here
    assert (layer.predicted[[i0, i1]] == 3).all() and layer.predicted[i2] == 0
    assert layer.uncertainty[i2] == pytest.approx(0.1) and layer.uncertainty[i0] == pytest.approx(
        0.6
    )

    _labels(repo, project, "b3", "ann-a", {1: "Layer3"})  # a new label version: no stale cache
    again = unit_layer(repo, project, "ds1", caller="ann-a")
    assert again.mine[i1] == 2 and not again.disputed[i1]


def test_header_only_and_unknown_dataset(repo: AnnotationRepository, project: str) -> None:
    header = unit_layer(repo, project, "ds1", caller="x", header_only=True)
    assert header.spatial_uri_prefix and not header.unit_ids and header.kind == "visium"
    with pytest.raises(NotFound, match="dataset 'nope' not found"):
        unit_layer(repo, project, "nope", caller="x")
    with pytest.raises(NotFound, match="project 'nope' not found"):
        unit_layer(repo, "nope", "ds1", caller="x")
