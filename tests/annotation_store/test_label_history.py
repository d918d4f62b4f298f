"""ListLabelEvents over real gRPC (auth on), on SQLite and PostgreSQL: filters, paging."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from histoloop.v1 import annotation_store_pb2 as pb
from tests.annotation_store.conftest import GrpcEnv
from tests.annotation_store.test_grpc import DLPFC_BARCODES, annotator, code_of, create_project


def _ts(value: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _submit(env: GrpcEnv, md, project: str, batch: str, labels: dict[str, str], **kw) -> None:
    env.stub.SubmitLabels(
        pb.SubmitLabelsRequest(
            project_id=project,
            dataset_id="151510",
            batch_id=batch,
            labels=[pb.SpotLabel(barcode=b, label=c) for b, c in labels.items()],
            **kw,
        ),
        metadata=md,
    )


def test_list_label_events_filters_and_pages(grpc_env: GrpcEnv, dlpfc_spatial: Path) -> None:
    env = grpc_env
    project = create_project(env, dlpfc_spatial)
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    md_a = env.md(annotator(env, alice, [project]))
    md_b = env.md(annotator(env, bob, [project], role=pb.ANNOTATOR_ROLE_EXPERT))
    b0, b1, b2 = DLPFC_BARCODES[:3]
    before = datetime.now(UTC) - timedelta(seconds=1)
    _submit(env, md_a, project, "a-1", {b0: "Layer1", b1: "Layer2"})
    _submit(env, md_b, project, "b-1", {b0: "Layer3"})
    middle = datetime.now(UTC)
    _submit(env, md_a, project, "a-2", {b0: "Layer4", b2: "WM"})

    def ask(**kw) -> pb.ListLabelEventsResponse:
        return env.stub.ListLabelEvents(
            pb.ListLabelEventsRequest(project_id=project, **kw), metadata=md_a
        )

    everything = ask()
    assert [
        (e.barcode, e.label, e.annotator_id, e.batch_id, e.label_version) for e in everything.events
    ] == [
        (b0, "Layer1", alice, "a-1", 1),
        (b1, "Layer2", alice, "a-1", 1),
        (b0, "Layer3", bob, "b-1", 2),
        (b0, "Layer4", alice, "a-2", 3),
        (b2, "WM", alice, "a-2", 3),
    ]
    assert not everything.next_page_token
    seqs = [e.sequence for e in everything.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert everything.events[2].annotator_role == pb.ANNOTATOR_ROLE_EXPERT
    assert everything.events[0].source == pb.LABEL_SOURCE_GRPC
    assert (
        everything.events[0].dataset_id == "151510" and everything.events[0].created_at.seconds > 0
    )

    # one unit's history: every opinion, in order (the latest does not hide the others)
    assert [e.label for e in ask(barcode=b0).events] == ["Layer1", "Layer3", "Layer4"]
    assert [e.batch_id for e in ask(annotator_id=bob).events] == ["b-1"]
    assert [e.barcode for e in ask(batch_id="a-2").events] == [b0, b2]
    assert [e.batch_id for e in ask(since=_ts(middle)).events] == ["a-2", "a-2"]
    assert len(ask(since=_ts(before), until=_ts(middle)).events) == 3
    assert len(ask(dataset_id="151510", annotator_id=alice, barcode=b0).events) == 2

    # pages of two: the tokens walk through everything exactly once
    seen, token = [], ""
    while True:
        page = ask(page_size=2, page_token=token)
        assert len(page.events) <= 2
        seen += [e.sequence for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert seen == seqs

    # a token stays valid while labels arrive: the next page continues after it
    first = ask(page_size=4)
    _submit(env, md_b, project, "b-2", {b1: "Layer6"})
    rest = ask(page_size=4, page_token=first.next_page_token)
    assert [e.batch_id for e in rest.events] == ["a-2", "b-2"]

    # GetAgreement: each rater against the consensus (bob is the expert: latest_expert follows him)
    agreement = env.stub.GetAgreement(pb.GetAgreementRequest(project_id=project), metadata=md_a)
    classes = list(agreement.confusion_classes)
    conf = {
        r.annotator_id: (r, np.array(r.counts).reshape(len(classes), len(classes)))
        for r in agreement.rater_confusion
    }
    assert conf[alice][1][classes.index("Layer4"), classes.index("Layer3")] == 1  # b0
    assert conf[alice][1][classes.index("Layer2"), classes.index("Layer6")] == 1  # b1
    assert (
        conf[alice][0].agreement == 0.0
        and conf[bob][0].agreement == 1.0
        and conf[bob][0].n_spots == 2
    )

    # bad input names the field; other projects' members are refused
    assert code_of(lambda: ask(page_token="garbage!")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: ask(page_size=5000)) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        code_of(lambda: ask(since=_ts(middle), until=_ts(before)))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(lambda: ask(dataset_id="nope")) == grpc.StatusCode.NOT_FOUND
    with_err = None
    try:
        ask(page_size=5000)
    except grpc.RpcError as exc:
        with_err = exc.details()
    assert with_err is not None and "page_size" in with_err
    outsider = env.md(annotator(env, f"eve-{uuid.uuid4().hex[:6]}", []))
    assert (
        code_of(
            lambda: env.stub.ListLabelEvents(
                pb.ListLabelEventsRequest(project_id=project), metadata=outsider
            )
        )
        == grpc.StatusCode.PERMISSION_DENIED
    )


def test_snapshots_list_every_batch_up_to_their_version(repo, project: str) -> None:
    from histoloop.annotation_store.snapshot import SnapshotBuilder, snapshot_bytes
    from histoloop.labelsets import LabelSnapshot
    from tests.annotation_store.test_outbox import labels

    repo.register_annotator("ann1", role="annotator", projects=[project])
    for i, batch in enumerate(("first", "second", "third"), start=1):
        repo.submit_labels(
            project, "ds1", batch, labels((i, "Layer1"), (i + 10, "WM")), annotator="ann1"
        )
    full = repo.labels_snapshot(project, 3)
    assert full["batches"] == [
        {"batch_id": "first", "label_version": 1},
        {"batch_id": "second", "label_version": 2},
        {"batch_id": "third", "label_version": 3},
    ]
    builder = SnapshotBuilder(repo)
    data, _ = builder.build(project, 2)
    assert LabelSnapshot.from_json(data).batches == ((1, "first"), (2, "second"))
    data, _ = builder.build(project, 3)  # incremental: the same bytes as from scratch
    assert data == snapshot_bytes(full)
    assert LabelSnapshot.from_json(data).batches == ((1, "first"), (2, "second"), (3, "third"))
