"""``LabelsCommitted.n_trainable_classes``: the store's count equals the one acquisition took
from the snapshot, and acquisition reads the snapshot only to choose more spots."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from histoloop import events
from histoloop.acquisition.round import MORE_CLASSES_STRATEGY
from histoloop.acquisition.step import AcquisitionStep
from histoloop.annotation_store.domain import ClassSpec, DatasetSpec, LoopSettings, SpotLabelInput
from histoloop.annotation_store.outbox import OutboxRelay
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.embedded import EmbeddedBus
from histoloop.datasets import write_anndata
from histoloop.formats.embeddings import embeddings_key, parse_embeddings_key
from histoloop.labelsets import MIN_TRAINING_CLASSES, read_snapshot
from histoloop.v1 import events_pb2
from tests.annotation_store.conftest import LAYERS, barcode, new_project_id
from tests.annotation_store.test_outbox import FlakyBus, labels, read_all


class CountingStore(LocalArtifactStore):
    """Counts the reads of label snapshots."""

    snapshot_reads = 0

    def get(self, key: str) -> bytes:
        """Read an object, counting it when it is a label snapshot."""
        if key.startswith("labels/"):
            self.snapshot_reads += 1
        return super().get(key)


@pytest.fixture
def artifacts(tmp_path: Path) -> CountingStore:
    """The artifact store of the store, its relay and acquisition, counting snapshot reads."""
    return CountingStore(tmp_path / "artifacts")


@pytest.fixture
def project(
    repo: AnnotationRepository, artifacts: CountingStore, small_spatial: Path, other_spatial: Path
) -> str:
    """A project with ``ds1`` (40 spots, embedded) and ``ds2`` (20 spots, no embeddings)."""
    project = new_project_id()
    repo.create_project(project, "count", [ClassSpec(c) for c in LAYERS], LoopSettings())
    for dataset, spatial in (("ds1", small_spatial), ("ds2", other_spatial)):
        repo.register_dataset(
            DatasetSpec(
                project_id=project, dataset_id=dataset, kind="visium", spatial_dir=str(spatial)
            )
        )
    n = 40
    obs = pd.DataFrame(
        {"array_row": np.arange(n) // 8, "array_col": np.arange(n) % 8 * 2},
        index=[barcode(i) for i in range(n)],
    )
    features = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    uri = write_anndata(
        artifacts,
        embeddings_key(project, "ds1", "e1"),
        ad.AnnData(obs=obs, obsm={"X_morph": features}),
    )
    assert repo.set_embeddings(project, "ds1", uri, "emb-1")
    return project


def _in_ds2(i: int, label: str) -> list[SpotLabelInput]:
    """A label of spot ``i`` of ``ds2``."""
    return [SpotLabelInput(barcode=barcode(i, "2"), label=label, row="labels[0]")]


def _snapshot_count(store: LocalArtifactStore, msg: events_pb2.LabelsCommitted) -> int:
    """What acquisition counted before the field: classes of the snapshot in embedded datasets."""
    datasets = [parse_embeddings_key(uri).dataset for uri in msg.embeddings_uris]
    return len(read_snapshot(store, msg.labels_uri).labelled_classes(datasets))


def _committed(bus: EmbeddedBus, group: str) -> list[events_pb2.LabelsCommitted]:
    out = [events.decode(r) for r in read_all(bus, events.LABELS_COMMITTED, group=group)]
    assert all(isinstance(m, events_pb2.LabelsCommitted) for m in out)
    return out  # type: ignore[return-value]


def test_the_event_counts_what_acquisition_counted_from_the_snapshot(
    repo: AnnotationRepository, artifacts: CountingStore, project: str, bus: EmbeddedBus
) -> None:
    plan = [
        ("ds1", labels((1, "Layer1"))),  # one class
        ("ds2", _in_ds2(1, "WM")),  # a second class, but in the dataset without embeddings
        ("ds1", labels((1, "Layer2"))),  # a correction: Layer1 has no consensus label left
        ("ds1", labels((2, "Layer1"))),  # two classes
    ]
    for version, (dataset, given) in enumerate(plan, start=1):
        repo.submit_labels(project, dataset, f"b{version}", given, annotator="alice")
    assert OutboxRelay(repo, bus, artifacts).run_once()
    committed = _committed(bus, "count")
    assert [m.n_trainable_classes for m in committed] == [1, 1, 1, 2]
    assert [m.n_trainable_classes for m in committed] == [
        _snapshot_count(artifacts, m) for m in committed
    ]
    everywhere = read_snapshot(artifacts, committed[1].labels_uri).labelled_classes()
    assert everywhere == {"Layer1", "WM"}  # the dataset restriction is what keeps it at 1


def test_a_snapshot_found_from_an_earlier_attempt_gives_the_same_count(
    repo: AnnotationRepository, artifacts: CountingStore, project: str, tmp_path: Path
) -> None:
    bus = FlakyBus(tmp_path / "flaky.sqlite", failures=0)
    relay = OutboxRelay(repo, bus, artifacts)
    assert relay.run_once()  # dataset.registered ×2
    repo.submit_labels(
        project, "ds1", "b1", labels((1, "Layer1"), (2, "Layer3")), annotator="alice"
    )
    repo.submit_labels(project, "ds2", "b2", _in_ds2(3, "WM"), annotator="alice")
    bus.failures = 1
    assert not relay.run_once()  # the snapshot of v1 is written, its event not published
    assert relay.run_once()  # v1 counted from the snapshot found, v2 from memory
    counts = [(m.label_version, m.n_trainable_classes) for m in _committed(bus, "retry")]
    assert counts == [(1, 2), (2, 2)]
    bus.close()


def _event(
    repo: AnnotationRepository,
    store: CountingStore,
    bus: EmbeddedBus,
    project: str,
    pairs: tuple[tuple[int, str], ...],
) -> events_pb2.LabelsCommitted:
    """The event of ``pairs`` labelled in ``ds1``, after a WM label in ``ds2``."""
    repo.submit_labels(project, "ds2", f"b0-{len(pairs)}", _in_ds2(5, "WM"), annotator="alice")
    repo.submit_labels(project, "ds1", f"b1-{len(pairs)}", labels(*pairs), annotator="alice")
    assert OutboxRelay(repo, bus, store).run_once()
    return _committed(bus, "relay")[-1]


def _asked(bus: EmbeddedBus) -> list[events_pb2.QuerySetReady]:
    out = [events.decode(r) for r in read_all(bus, events.QUERYSET_READY, group="asked")]
    return out  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("second", "n_classes", "reads"),
    [("Layer1", 1, 1), ("Layer2", 2, 0)],
    ids=["one-class", "two-classes"],
)
def test_acquisition_reads_the_snapshot_only_to_ask_for_more_classes(
    repo: AnnotationRepository,
    artifacts: CountingStore,
    project: str,
    bus: EmbeddedBus,
    second: str,
    n_classes: int,
    reads: int,
) -> None:
    """``ds2`` (no embeddings) holds a WM label: it counts for neither the store nor acquisition."""
    store = artifacts
    msg = _event(repo, store, bus, project, ((1, "Layer1"), (2, second)))
    assert msg.n_trainable_classes == n_classes == _snapshot_count(store, msg)
    store.snapshot_reads = 0
    AcquisitionStep(store, bus).on_labels(msg)
    assert store.snapshot_reads == reads  # one-class: read once, to leave the labelled spots out
    asked = _asked(bus)
    if n_classes >= MIN_TRAINING_CLASSES:
        assert not asked  # training's turn
    else:
        assert [a.strategy for a in asked] == [MORE_CLASSES_STRATEGY] and asked[0].spots
        assert {s.barcode for s in asked[0].spots}.isdisjoint({barcode(1), barcode(2)})


def test_an_event_of_an_older_store_is_counted_from_the_snapshot(
    repo: AnnotationRepository, artifacts: CountingStore, project: str, bus: EmbeddedBus
) -> None:
    store = artifacts
    one = _event(repo, store, bus, project, ((1, "Layer1"),))
    two = _event(repo, store, bus, project, ((1, "Layer1"), (2, "Layer2")))
    for msg in (one, two):
        msg.ClearField("n_trainable_classes")  # as an older store published it
        assert msg.n_labelled_spots > 0
    step = AcquisitionStep(store, bus)
    store.snapshot_reads = 0
    step.on_labels(two)
    assert store.snapshot_reads == 1 and not _asked(bus)  # counted 2 from the snapshot
    step.on_labels(one)
    (asked,) = _asked(bus)
    assert asked.strategy == MORE_CLASSES_STRATEGY and asked.meta.project == one.meta.project
    assert store.snapshot_reads == 2  # the snapshot read for the count also picks the spots
