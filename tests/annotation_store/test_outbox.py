"""The transactional outbox and its relay: one event per commit, nothing lost on a crash."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from histoloop import events
from histoloop.annotation_store.domain import ClassSpec, DatasetSpec, LoopSettings, SpotLabelInput
from histoloop.annotation_store.outbox import OutboxRelay
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.annotation_store.snapshot import snapshot_key
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.base import Record
from histoloop.bus.embedded import EmbeddedBus
from histoloop.errors import Unavailable
from histoloop.v1 import common_pb2, events_pb2
from tests.annotation_store.conftest import LAYERS, REPO_ROOT, barcode, new_project_id

SCRIPT = Path(__file__).with_name("outbox_crash.py")


def labels(*pairs: tuple[int, str]) -> list[SpotLabelInput]:
    return [
        SpotLabelInput(barcode=barcode(b), label=lab, row=f"labels[{i}]")
        for i, (b, lab) in enumerate(pairs)
    ]


def read_all(bus: EmbeddedBus, topic: str, group: str = "check") -> list[Record]:
    consumer = bus.consumer(group, [topic])
    records: list[Record] = []
    while batch := consumer.poll(0.05):
        records += batch
    consumer.close()
    return records


def deduplicated(records: list[Record]) -> dict[str, Record]:
    """What a consumer deduplicating on event id handles."""
    seen: dict[str, Record] = {}
    for record in records:
        seen.setdefault(record.event_id, record)
    return seen


def test_each_commit_publishes_exactly_one_event(
    repo: AnnotationRepository, bus: EmbeddedBus, artifacts: LocalArtifactStore, project: str
) -> None:
    relay = OutboxRelay(repo, bus, artifacts)
    b1 = repo.submit_labels(
        project, "ds1", "b1", labels((1, "Layer1"), (2, "WM")), annotator="alice"
    )
    repo.submit_labels(
        project, "ds1", "b1", labels((1, "Layer1"), (2, "WM")), annotator="alice"
    )  # duplicate
    assert repo.set_embeddings(project, "ds1", "file:///emb/ds1.h5ad", "emb-1")
    b2 = repo.submit_labels(
        project, "ds1", "b2", labels((2, "Layer2"), (3, "Layer3")), annotator="alice"
    )
    assert repo.status(project).pending_events == 3  # dataset.registered + 2 batches
    assert relay.run_once() and relay.published == 3
    assert relay.run_once() and relay.published == 3  # nothing twice
    assert repo.status(project).pending_events == 0

    records = read_all(bus, events.LABELS_COMMITTED)
    assert [r.event_id for r in records] == [b1.event_id, b2.event_id]
    first, second = (events.decode(r) for r in records)
    assert isinstance(first, events_pb2.LabelsCommitted) and isinstance(
        second, events_pb2.LabelsCommitted
    )
    assert (first.batch_id, first.label_version, first.n_labels, first.n_labelled_spots) == (
        "b1",
        1,
        2,
        2,
    )
    assert (second.label_version, second.n_labelled_spots) == (2, 3)
    assert list(first.classes) == list(LAYERS)
    assert (
        first.config.strategy == "activevisium"
        and first.config.features == common_pb2.FEATURE_SET_MORPHOLOGY
    )
    # the latest embeddings of each dataset when the event is published
    assert list(first.embeddings_uris) == list(second.embeddings_uris) == ["file:///emb/ds1.h5ad"]
    assert first.meta.project == project and first.meta.source_versions["labels"] == "1"
    snapshot = json.loads(artifacts.get(artifacts.key_from_uri(first.labels_uri)))
    assert first.labels_uri == artifacts.uri(snapshot_key(project, 1))
    assert snapshot["datasets"]["ds1"]["labels"] == {barcode(1): "Layer1", barcode(2): "WM"}
    assert snapshot["datasets"]["ds1"]["disagreement"] == {barcode(1): 0.0, barcode(2): 0.0}

    registered = [events.decode(r) for r in read_all(bus, events.DATASET_REGISTERED)]
    assert len(registered) == 1
    ds = registered[0]
    assert isinstance(ds, events_pb2.DatasetRegistered)
    assert ds.kind == common_pb2.DATASET_KIND_VISIUM and ds.meta.dataset == "ds1"
    assert ds.spatial_uri_prefix == artifacts.uri(f"datasets/{project}/ds1/input/spatial")
    assert ds.config.query_size == 20 and ds.slide_scale == 1.0


class FlakyBus(EmbeddedBus):
    """Fails the first ``failures`` publishes (a broker outage)."""

    def __init__(self, path: Path, failures: int) -> None:
        super().__init__(path)
        self.failures = failures

    def publish(self, topic: str, key: str, value: bytes, *, event_id: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise Unavailable("broker down")
        super().publish(topic, key, value, event_id=event_id)


def test_a_bus_outage_loses_nothing_and_keeps_order(
    repo: AnnotationRepository, artifacts: LocalArtifactStore, project: str, tmp_path: Path
) -> None:
    bus = FlakyBus(tmp_path / "flaky.sqlite", failures=1)
    for i in range(3):
        repo.submit_labels(project, "ds1", f"b{i}", labels((i, "Layer1")), annotator="alice")
    relay = OutboxRelay(repo, bus, artifacts)
    assert not relay.run_once()  # the first row failed: the project's later rows wait
    assert relay.published == 0 and repo.pending_count() == 4
    assert relay.run_once() and relay.published == 4
    versions = [events.decode(r).label_version for r in read_all(bus, events.LABELS_COMMITTED)]
    assert versions == [1, 2, 3]
    bus.close()


def test_relay_thread_wakes_on_commit_and_stops_twice(
    repo: AnnotationRepository, bus: EmbeddedBus, artifacts: LocalArtifactStore, project: str
) -> None:
    relay = OutboxRelay(repo, bus, artifacts, poll_interval=30.0)
    repo.on_commit = relay.notify
    relay.start()
    try:
        relay.start()  # no second thread
        time.sleep(0.2)
        result = repo.submit_labels(project, "ds1", "b1", labels((1, "WM")), annotator="alice")
        deadline = time.monotonic() + 10
        while repo.pending_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert repo.pending_count() == 0
        relay.check()
    finally:
        relay.stop(5.0)
        relay.stop(5.0)
    assert [r.event_id for r in read_all(bus, events.LABELS_COMMITTED)] == [result.event_id]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )


@pytest.mark.parametrize("kill_at", ["snapshot", "publish"])
def test_store_killed_between_commit_and_publish_delivers_exactly_once(
    db_url: str, repo: AnnotationRepository, tmp_path: Path, small_spatial: Path, kill_at: str
) -> None:
    data_dir = tmp_path  # the artifact store and event log the subprocesses share with us
    artifacts = LocalArtifactStore(data_dir / "artifacts")
    project = new_project_id()
    repo.create_project(project, "crash", [ClassSpec(c) for c in LAYERS], LoopSettings())
    repo.register_dataset(
        DatasetSpec(
            project_id=project, dataset_id="ds1", kind="visium", spatial_dir=str(small_spatial)
        )
    )
    common = ["--url", db_url, "--data-dir", str(data_dir)]
    bus = EmbeddedBus(data_dir / "events.sqlite")
    assert OutboxRelay(repo, bus, artifacts).run_once()  # dataset.registered is out of the way

    # 1. the store process commits a batch and is SIGKILLed inside the relay
    killed = _run(
        [
            "commit",
            *common,
            "--project",
            project,
            "--dataset",
            "ds1",
            "--barcodes",
            f"{barcode(1)},{barcode(2)}",
            "--kill-at",
            kill_at,
        ]
    )
    assert killed.returncode == -9, killed.stderr
    committed = json.loads(killed.stdout.splitlines()[0])
    assert repo.status(project).label_version == 1  # the commit survived the kill
    assert repo.status(project).pending_events == 1  # ... and its event is still owed
    assert artifacts.exists(snapshot_key(project, 1))  # the crashed attempt wrote the snapshot
    snapshot_before = artifacts.stat(snapshot_key(project, 1))
    published_before = read_all(bus, events.LABELS_COMMITTED, group="peek")
    assert len(published_before) == (1 if kill_at == "publish" else 0)

    # 2. the restarted store process relays what was owed
    restarted = _run(["relay", *common])
    assert restarted.returncode == 0, restarted.stderr
    assert json.loads(restarted.stdout.splitlines()[-1]) == {"relayed": 1, "ok": True}
    # 3. and a further restart owes nothing
    again = _run(["relay", *common])
    assert json.loads(again.stdout.splitlines()[-1]) == {"relayed": 0, "ok": True}

    records = read_all(bus, events.LABELS_COMMITTED, group="consumer")
    handled = deduplicated(records)
    assert list(handled) == [committed["event_id"]]  # exactly once, with the id fixed at commit
    message = events.decode(handled[committed["event_id"]])
    assert isinstance(message, events_pb2.LabelsCommitted)
    assert (message.label_version, message.n_labels, message.n_labelled_spots) == (1, 2, 2)
    assert artifacts.stat(snapshot_key(project, 1)) == snapshot_before  # reused, not rewritten
    assert repo.status(project).pending_events == 0
    bus.close()


@pytest.mark.parametrize("rule", ["latest_expert", "majority", "dawid_skene"])
def test_incremental_snapshots_equal_full_recomputation(
    repo: AnnotationRepository, small_spatial: Path, rule: str
) -> None:
    from histoloop.annotation_store.snapshot import SnapshotBuilder, snapshot_bytes

    project = new_project_id()
    repo.create_project(
        project, "inc", [ClassSpec(c) for c in ("A", "B", "C")], LoopSettings(consensus=rule)
    )
    repo.register_dataset(
        DatasetSpec(
            project_id=project, dataset_id="ds1", kind="visium", spatial_dir=str(small_spatial)
        )
    )
    repo.register_annotator("exp", role="expert", projects=[project])
    builder = SnapshotBuilder(repo)
    plan = [
        ("ann1", [(1, "A"), (2, "B")]),
        ("ann2", [(1, "B"), (3, "C")]),
        ("exp", [(1, "C"), (2, "B")]),
        ("ann1", [(1, "B"), (4, "A")]),
        ("ann2", [(2, "A"), (4, "A"), (5, "Tumour")]),
    ]

    def full(version: int) -> tuple[bytes, int]:
        document = repo.labels_snapshot(project, version)
        return snapshot_bytes(document), document["n_labelled_spots"]

    for version, (who, pairs) in enumerate(plan, start=1):
        repo.submit_labels(
            project, "ds1", f"b{version}", labels(*pairs), annotator=who, add_missing_classes=True
        )
        assert builder.build(project, version) == full(version)
    # a fresh builder (a restarted relay) asked for an old version gives the same bytes
    assert SnapshotBuilder(repo).build(project, 2) == full(2)
    assert builder.build(project, 3) == full(3)  # going back rebuilds
    assert json.loads(full(5)[0])["datasets"]["ds1"]["labels"][barcode(5)] == "Tumour"
