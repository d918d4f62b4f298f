"""Per-rater confusion against the consensus in GetAgreement (fields 7–8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histoloop.annotation_store.domain import ClassSpec, DatasetSpec, LoopSettings
from histoloop.annotation_store.repository import AnnotationRepository
from tests.annotation_store.conftest import new_project_id
from tests.annotation_store.test_outbox import labels


def test_each_rater_against_the_majority(repo: AnnotationRepository, small_spatial: Path) -> None:
    project = new_project_id()
    classes = ("A", "B", "C")
    repo.create_project(project, "raters", [ClassSpec(c) for c in classes], LoopSettings(consensus="majority"))
    repo.register_dataset(DatasetSpec(project_id=project, dataset_id="ds1", kind="visium",
                                      spatial_dir=str(small_spatial)))
    truth = {i: classes[i % 3] for i in range(12)}
    merger = {i: ("A" if c == "B" else c) for i, c in truth.items()}  # folds B into A
    for who, given in (("exact1", truth), ("exact2", truth), ("merger", merger)):
        repo.register_annotator(who, role="annotator", projects=[project])
        repo.submit_labels(project, "ds1", f"{who}-1", labels(*given.items()), annotator=who)
    repo.register_annotator("solo", role="annotator", projects=[project])
    repo.submit_labels(project, "ds1", "solo-1", labels((30, "C")), annotator="solo")  # rated by nobody else

    report = repo.agreement(project)
    assert report.confusion_classes == classes
    by = {r.annotator: r for r in report.rater_confusion}
    assert set(by) == {"exact1", "exact2", "merger"}  # solo has no multi-rated spot
    assert np.array_equal(by["exact1"].counts, np.diag([4, 4, 4])) and by["exact1"].agreement == 1.0
    # rows = the rater's class, columns = the consensus: the 4 B spots are in row A, column B
    assert np.array_equal(by["merger"].counts, [[4, 4, 0], [0, 0, 0], [0, 0, 4]])
    assert by["merger"].n_spots == 12 and by["merger"].agreement == 8 / 12
