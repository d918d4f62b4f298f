"""Per-rater confusion against the consensus in GetAgreement (fields 7–8), and each rater's
votes in the label snapshot (what the per-annotator models train on)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from histoloop.annotation_store.domain import ClassSpec, DatasetSpec, LoopSettings
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.annotation_store.snapshot import snapshot_bytes
from histoloop.errors import InvalidArgument
from histoloop.labelsets import LabelSnapshot
from tests.annotation_store.conftest import new_project_id
from tests.annotation_store.test_outbox import barcode, labels


def test_each_rater_against_the_majority(repo: AnnotationRepository, small_spatial: Path) -> None:
    project = new_project_id()
    classes = ("A", "B", "C")
    repo.create_project(
        project, "raters", [ClassSpec(c) for c in classes], LoopSettings(consensus="majority")
    )
    repo.register_dataset(
        DatasetSpec(
            project_id=project, dataset_id="ds1", kind="visium", spatial_dir=str(small_spatial)
        )
    )
    truth = {i: classes[i % 3] for i in range(12)}
    merger = {i: ("A" if c == "B" else c) for i, c in truth.items()}  # folds B into A
    for who, given in (("exact1", truth), ("exact2", truth), ("merger", merger)):
        repo.register_annotator(who, role="annotator", projects=[project])
        repo.submit_labels(project, "ds1", f"{who}-1", labels(*given.items()), annotator=who)
    repo.register_annotator("solo", role="annotator", projects=[project])
    repo.submit_labels(
        project, "ds1", "solo-1", labels((30, "C")), annotator="solo"
    )  # rated by nobody else

    report = repo.agreement(project)
    assert report.confusion_classes == classes
    by = {r.annotator: r for r in report.rater_confusion}
    assert set(by) == {"exact1", "exact2", "merger"}  # solo has no multi-rated spot
    assert np.array_equal(by["exact1"].counts, np.diag([4, 4, 4])) and by["exact1"].agreement == 1.0
    # rows = the rater's class, columns = the consensus: the 4 B spots are in row A, column B
    assert np.array_equal(by["merger"].counts, [[4, 4, 0], [0, 0, 0], [0, 0, 4]])
    assert by["merger"].n_spots == 12 and by["merger"].agreement == 8 / 12


def test_the_snapshot_carries_each_raters_latest_vote(
    repo: AnnotationRepository, small_spatial: Path
) -> None:
    project = new_project_id()
    repo.create_project(
        project, "votes", [ClassSpec(c) for c in ("A", "B")], LoopSettings(consensus="majority")
    )
    repo.register_dataset(
        DatasetSpec(
            project_id=project, dataset_id="ds1", kind="visium", spatial_dir=str(small_spatial)
        )
    )
    for who in ("ann", "bob"):
        repo.register_annotator(who, role="annotator", projects=[project])
    repo.submit_labels(project, "ds1", "ann-1", labels((1, "A"), (2, "A")), annotator="ann")
    repo.submit_labels(project, "ds1", "bob-1", labels((1, "B")), annotator="bob")
    repo.submit_labels(
        project, "ds1", "ann-2", labels((1, "B")), annotator="ann"
    )  # ann corrects herself

    v2 = LabelSnapshot.from_json(snapshot_bytes(repo.labels_snapshot(project, 2)))
    v3 = LabelSnapshot.from_json(snapshot_bytes(repo.labels_snapshot(project, 3)))
    one, two = barcode(1), barcode(2)
    assert v2.votes == {"ds1": {one: {"ann": "A", "bob": "B"}, two: {"ann": "A"}}}
    assert v3.votes["ds1"][one] == {"ann": "B", "bob": "B"} and v3.annotators == ("ann", "bob")
    assert v3.labels["ds1"][one] == "B" and v3.disagreement["ds1"][one] == 0.0


def test_snapshots_without_votes_still_load_and_votes_are_checked() -> None:
    doc = {
        "project": "p",
        "label_version": 1,
        "classes": [{"name": "A", "color": ""}],
        "datasets": {"d": {"labels": {"s1": "A"}, "disagreement": {"s1": 0.0}}},
    }
    old = LabelSnapshot.from_json(json.dumps(doc).encode())
    assert old.votes == {} and old.annotators == () and old.labels == {"d": {"s1": "A"}}
    doc["datasets"]["d"]["votes"] = {"s1": {"ann": "A", "bob": "Tumour"}}
    with pytest.raises(InvalidArgument, match="Tumour"):
        LabelSnapshot.from_json(json.dumps(doc).encode())
