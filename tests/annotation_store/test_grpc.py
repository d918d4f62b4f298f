"""The servicer over real gRPC, in the lead's server scaffold (auth on), on both databases."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from histoloop import events
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.embedded import EmbeddedBus
from histoloop.datasets import Predictions, write_predictions
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import common_pb2, events_pb2
from tests.annotation_store.conftest import LAYERS, GrpcEnv, new_project_id
from tests.annotation_store.test_outbox import read_all

DLPFC_BARCODES = (
    "AAACAAGTATCTCCCA-1",
    "AAACACCAATAACTGC-1",
    "AAACAGAGCGACTCCT-1",
    "AAACAGCTTTCAGAAG-1",
)


def create_project(env: GrpcEnv, dlpfc_spatial: Path, **config: object) -> str:
    project = new_project_id()
    md = env.md(env.admin_token)
    config.setdefault(
        "features", common_pb2.FEATURE_SET_EXPRESSION
    )  # the sample has counts, no slide
    reply = env.stub.CreateProject(
        pb.CreateProjectRequest(
            project_id=project,
            name="DLPFC",
            classes=[common_pb2.ClassDef(name=c) for c in LAYERS],
            config=common_pb2.LoopConfig(**config),
        ),
        metadata=md,
    )
    assert reply.project_id == project
    env.stub.RegisterDataset(
        pb.RegisterDatasetRequest(
            project_id=project,
            dataset_id="151510",
            kind=common_pb2.DATASET_KIND_VISIUM,
            spatial_dir=str(dlpfc_spatial),
            expression_path=str(dlpfc_spatial.parent / "dlpfc151510_500genes.h5ad"),
        ),
        metadata=md,
    )
    return project


def annotator(
    env: GrpcEnv, name: str, projects: list[str], role: int = pb.ANNOTATOR_ROLE_ANNOTATOR
) -> str:
    reply = env.stub.RegisterAnnotator(
        pb.RegisterAnnotatorRequest(
            annotator_id=name, display_name=name.title(), role=role, projects=projects
        ),
        metadata=env.md(env.admin_token),
    )
    assert reply.annotator_id == name and reply.token
    return reply.token


def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()


def test_project_dataset_labels_status_over_grpc(grpc_env: GrpcEnv, dlpfc_spatial: Path) -> None:
    env = grpc_env
    project = create_project(env, dlpfc_spatial, query_size=30, consensus="majority")
    got = env.stub.GetProject(
        pb.GetProjectRequest(project_id=project), metadata=env.md(env.admin_token)
    )
    assert [c.name for c in got.classes] == list(LAYERS) and list(got.datasets) == ["151510"]
    assert (got.config.query_size, got.config.consensus, got.config.strategy, got.config.head) == (
        30,
        "majority",
        "activevisium",
        "mlp",
    )
    added = env.stub.AddClasses(
        pb.AddClassesRequest(
            project_id=project, classes=[common_pb2.ClassDef(name="Tumour", color="#123456")]
        ),
        metadata=env.md(env.admin_token),
    )
    assert added.classes[-1] == common_pb2.ClassDef(name="Tumour", color="#123456")

    token = annotator(env, f"path-{uuid.uuid4().hex[:6]}", [project])
    md = env.md(token)
    request = pb.SubmitLabelsRequest(
        project_id=project,
        dataset_id="151510",
        batch_id="round-1",
        labels=[
            pb.SpotLabel(barcode=DLPFC_BARCODES[0], label="Layer1"),
            pb.SpotLabel(barcode=DLPFC_BARCODES[1], label="Layer5"),
        ],
    )
    first = env.stub.SubmitLabels(request, metadata=md)
    assert (first.n_labels, first.label_version, first.duplicate) == (
        2,
        1,
        False,
    ) and first.event_id
    again = env.stub.SubmitLabels(request, metadata=md)
    assert again.duplicate and again.event_id == first.event_id and again.label_version == 1

    csv = f"Barcode,Pathologist Annotations\n{DLPFC_BARCODES[2]},WM\n{DLPFC_BARCODES[3]},help\n".encode()
    imported = env.stub.ImportLoupeCsv(
        pb.ImportLoupeCsvRequest(
            project_id=project, dataset_id="151510", batch_id="loupe-1", csv=csv
        ),
        metadata=md,
    )
    assert (imported.n_labels, imported.n_placeholders, imported.label_version) == (1, 1, 2)

    exported = env.stub.ExportLabels(
        pb.ExportLabelsRequest(project_id=project, dataset_id="151510"), metadata=md
    )
    assert exported.n_rows == 3 and exported.filename == f"{project}_151510_labels.csv"
    assert exported.csv.decode().splitlines() == [
        "Barcode,Pathologist Annotations",
        f"{DLPFC_BARCODES[2]},WM",
        f"{DLPFC_BARCODES[0]},Layer1",
        f"{DLPFC_BARCODES[1]},Layer5",
    ]  # dataset (positions file) order

    status = env.stub.GetStatus(pb.GetStatusRequest(project_id=project), metadata=md)
    assert (status.n_labelled, status.label_version, status.n_spots, status.round) == (
        3,
        2,
        4634,
        0,
    )
    assert status.labelled_per_class["Layer1"] == 1 and status.labelled_per_class["Layer2"] == 0
    agreement = env.stub.GetAgreement(pb.GetAgreementRequest(project_id=project), metadata=md)
    assert agreement.n_spots_multi_rated == 0 and agreement.n_disputed == 0

    # the relay publishes labels.committed (once per batch) on the server's bus
    bus = EmbeddedBus(env.data_dir / "events.sqlite")
    deadline = time.monotonic() + 10
    records = []
    while time.monotonic() < deadline:
        records = read_all(bus, events.LABELS_COMMITTED, group=f"g{time.monotonic_ns()}")
        if len(records) == 2:
            break
        time.sleep(0.1)
    assert [r.event_id for r in records] == [first.event_id, imported.event_id]
    bus.close()


def test_error_codes_name_the_problem(grpc_env: GrpcEnv, dlpfc_spatial: Path) -> None:
    env = grpc_env
    project = create_project(env, dlpfc_spatial)
    md = env.md(env.admin_token)

    def submit(
        *labels: tuple[str, str], project_id: str = project, dataset: str = "151510"
    ) -> object:
        return env.stub.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id=project_id,
                dataset_id=dataset,
                batch_id="b",
                labels=[pb.SpotLabel(barcode=b, label=lab) for b, lab in labels],
            ),
            metadata=md,
        )

    with pytest.raises(grpc.RpcError) as info:
        submit((DLPFC_BARCODES[0], "Layer1"), ("NOPE-1", "Layer1"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "labels[1]: barcode 'NOPE-1' is not a spot of dataset '151510'" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        submit((DLPFC_BARCODES[0], "Tumour"))
    assert (
        info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "class 'Tumour'" in info.value.details()
    )
    assert (
        code_of(lambda: submit((DLPFC_BARCODES[0], "Layer1"), project_id="nope"))
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code_of(lambda: submit((DLPFC_BARCODES[0], "Layer1"), dataset="nope"))
        == grpc.StatusCode.NOT_FOUND
    )
    with pytest.raises(grpc.RpcError) as info:
        env.stub.ImportLoupeCsv(
            pb.ImportLoupeCsvRequest(
                project_id=project, dataset_id="151510", batch_id="c", csv=b"Barcode;Group\nA;B\n"
            ),
            metadata=md,
        )
    assert (
        info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "delimiter" in info.value.details()
    )
    assert code_of(
        lambda: env.stub.GetQuerySet(pb.GetQuerySetRequest(project_id=project), metadata=md)
    ) == (grpc.StatusCode.NOT_FOUND)
    assert code_of(
        lambda: env.stub.ExportLabels(
            pb.ExportLabelsRequest(
                project_id=project, dataset_id="151510", kind=pb.EXPORT_KIND_PREDICTIONS
            ),
            metadata=md,
        )
    ) == (grpc.StatusCode.NOT_FOUND)  # no query set yet
    assert (
        code_of(
            lambda: env.stub.CreateProject(pb.CreateProjectRequest(project_id=project), metadata=md)
        )
        == grpc.StatusCode.ALREADY_EXISTS
    )
    status = env.stub.GetStatus(pb.GetStatusRequest(project_id=project), metadata=md)
    assert status.label_version == 0 and status.n_labelled == 0


def test_oversized_upload_is_refused_by_grpc(grpc_env: GrpcEnv, dlpfc_spatial: Path) -> None:
    env = grpc_env
    huge = b"x" * (64 * 1024 * 1024 + 1)
    assert code_of(
        lambda: env.stub.ImportLoupeCsv(
            pb.ImportLoupeCsvRequest(project_id="p", dataset_id="d", batch_id="b", csv=huge),
            metadata=env.md(env.admin_token),
        )
    ) == (grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_access_control(grpc_env: GrpcEnv, dlpfc_spatial: Path) -> None:
    env = grpc_env
    project_a = create_project(env, dlpfc_spatial)
    project_b = create_project(env, dlpfc_spatial)
    alice_id = f"alice-{uuid.uuid4().hex[:6]}"
    alice = env.md(annotator(env, alice_id, [project_a]))
    denied = grpc.StatusCode.PERMISSION_DENIED
    label = [pb.SpotLabel(barcode=DLPFC_BARCODES[0], label="Layer1")]

    ok = env.stub.SubmitLabels(
        pb.SubmitLabelsRequest(
            project_id=project_a, dataset_id="151510", batch_id="a1", labels=label
        ),
        metadata=alice,
    )
    assert ok.n_labels == 1
    # project B: neither read nor write
    assert (
        code_of(
            lambda: env.stub.SubmitLabels(
                pb.SubmitLabelsRequest(
                    project_id=project_b, dataset_id="151510", batch_id="b1", labels=label
                ),
                metadata=alice,
            )
        )
        == denied
    )
    assert (
        code_of(
            lambda: env.stub.ImportLoupeCsv(
                pb.ImportLoupeCsvRequest(
                    project_id=project_b,
                    dataset_id="151510",
                    batch_id="b1",
                    csv=b"Barcode,G\nA,B\n",
                ),
                metadata=alice,
            )
        )
        == denied
    )
    for call in (
        lambda: env.stub.GetProject(pb.GetProjectRequest(project_id=project_b), metadata=alice),
        lambda: env.stub.ExportLabels(
            pb.ExportLabelsRequest(project_id=project_b, dataset_id="151510"), metadata=alice
        ),
        lambda: env.stub.GetStatus(pb.GetStatusRequest(project_id=project_b), metadata=alice),
        lambda: env.stub.GetAgreement(pb.GetAgreementRequest(project_id=project_b), metadata=alice),
        lambda: env.stub.ListQuerySets(
            pb.ListQuerySetsRequest(project_id=project_b), metadata=alice
        ),
        lambda: next(
            env.stub.WatchQuerySets(pb.WatchQuerySetsRequest(project_id=project_b), metadata=alice)
        ),
    ):
        assert code_of(call) == denied
    # admin-only and admin/service-only calls
    assert (
        code_of(
            lambda: env.stub.CreateProject(
                pb.CreateProjectRequest(project_id=new_project_id()), metadata=alice
            )
        )
        == denied
    )
    assert (
        code_of(
            lambda: env.stub.RegisterAnnotator(
                pb.RegisterAnnotatorRequest(annotator_id="eve"), metadata=alice
            )
        )
        == denied
    )
    assert (
        code_of(
            lambda: env.stub.RegisterDataset(
                pb.RegisterDatasetRequest(
                    project_id=project_a, dataset_id="x", spatial_dir=str(dlpfc_spatial)
                ),
                metadata=alice,
            )
        )
        == denied
    )
    # labels on someone else's behalf: services and admins only
    assert (
        code_of(
            lambda: env.stub.SubmitLabels(
                pb.SubmitLabelsRequest(
                    project_id=project_a,
                    dataset_id="151510",
                    batch_id="a2",
                    labels=label,
                    annotator_id="bob",
                ),
                metadata=alice,
            )
        )
        == denied
    )
    bob_id = f"bob-{uuid.uuid4().hex[:6]}"
    annotator(env, bob_id, [project_b])
    on_behalf = env.stub.SubmitLabels(
        pb.SubmitLabelsRequest(
            project_id=project_b,
            dataset_id="151510",
            batch_id="svc1",
            labels=label,
            annotator_id=bob_id,
        ),
        metadata=env.md(env.service_token),
    )
    assert on_behalf.n_labels == 1
    # no token, an unknown token
    assert code_of(lambda: env.stub.GetProject(pb.GetProjectRequest(project_id=project_a))) == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert (
        code_of(
            lambda: env.stub.GetProject(
                pb.GetProjectRequest(project_id=project_a), metadata=env.md("forged")
            )
        )
        == grpc.StatusCode.UNAUTHENTICATED
    )
    # membership granted later applies at once
    env.stub.RegisterAnnotator(
        pb.RegisterAnnotatorRequest(annotator_id=alice_id, projects=[project_b]),
        metadata=env.md(env.admin_token),
    )
    assert (
        env.stub.GetProject(pb.GetProjectRequest(project_id=project_b), metadata=alice).project_id
        == project_b
    )


def _query_set_event(
    project: str,
    queryset_id: str,
    round_no: int,
    barcodes: tuple[str, ...],
    predictions_uri: str = "",
) -> events_pb2.QuerySetReady:
    return events_pb2.QuerySetReady(
        meta=events.new_meta(project=project, dataset="151510", producer="acquisition"),
        queryset_id=queryset_id,
        round=round_no,
        strategy="activevisium",
        model_version=f"m{round_no}",
        label_version=round_no,
        spots=[common_pb2.ScoredSpot(barcode=b, score=0.5, reason="uncertainty") for b in barcodes],
        predictions_uri=predictions_uri,
        metrics=common_pb2.ModelMetrics(balanced_accuracy=0.61, macro_f1=0.55),
        stopping=events_pb2.StoppingSignal(
            changed_fraction=0.1, recommend_stop=False, reason="still changing"
        ),
    )


def test_query_sets_arrive_on_watch_streams(grpc_env: GrpcEnv, dlpfc_spatial: Path) -> None:
    env = grpc_env
    project = create_project(env, dlpfc_spatial)
    md = env.md(env.admin_token)
    bus = EmbeddedBus(env.data_dir / "events.sqlite")
    events.publish(bus, _query_set_event(project, "qs-1", 1, DLPFC_BARCODES[:2]))

    received: list[pb.QuerySet] = []
    stream = env.stub.WatchQuerySets(
        pb.WatchQuerySetsRequest(project_id=project, include_latest=True), metadata=md
    )

    def consume() -> None:
        for query_set in stream:
            received.append(query_set)
            if len(received) == 2:
                break

    # wait for the first query set to be recorded (the handler runs in the server's worker)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            env.stub.GetQuerySet(pb.GetQuerySetRequest(project_id=project), metadata=md)
            break
        except grpc.RpcError:
            time.sleep(0.05)
    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(0.3)
    # round 2 comes with the prediction service's artifact (the lead's .npz format)
    store = LocalArtifactStore(env.data_dir / "artifacts")
    predictions_uri = write_predictions(
        store,
        f"predictions/{project}/m2.npz",
        Predictions(
            model_version="m2",
            classes=["Layer6", "WM"],
            datasets=np.array(["151510"] * 4 + ["other"]),
            barcodes=np.array([*DLPFC_BARCODES, DLPFC_BARCODES[0]]),
            probabilities=np.array(
                [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.1, 0.9]], dtype=np.float32
            ),
            hidden=np.zeros((5, 2), dtype=np.float32),
        ),
    )
    second = _query_set_event(project, "qs-2", 2, DLPFC_BARCODES[2:], predictions_uri)
    events.publish(bus, second)
    events.publish(bus, second)  # a redelivered event is recorded once
    reader.join(15)
    stream.cancel()
    assert [q.queryset_id for q in received] == ["qs-1", "qs-2"]
    assert [s.barcode for s in received[1].spots] == list(DLPFC_BARCODES[2:])
    assert received[1].spots[0].dataset == "151510"
    assert received[1].metrics.balanced_accuracy == pytest.approx(0.61)

    listed = env.stub.ListQuerySets(pb.ListQuerySetsRequest(project_id=project), metadata=md)
    assert [q.queryset_id for q in listed.query_sets] == ["qs-1", "qs-2"]
    status = env.stub.GetStatus(pb.GetStatusRequest(project_id=project), metadata=md)
    assert (status.round, status.latest_model_version) == (2, "m2")
    assert (
        status.latest_metrics.macro_f1 == pytest.approx(0.55)
        and status.stopping.reason == "still changing"
    )
    exported = env.stub.ExportLabels(
        pb.ExportLabelsRequest(
            project_id=project, dataset_id="151510", kind=pb.EXPORT_KIND_QUERY_SET
        ),
        metadata=md,
    )
    assert exported.csv.decode().splitlines()[1:] == [f"{b},help" for b in DLPFC_BARCODES[2:]]
    # predictions: the prediction service's artifact, the query spots marked help
    predictions = env.stub.ExportLabels(
        pb.ExportLabelsRequest(
            project_id=project, dataset_id="151510", kind=pb.EXPORT_KIND_PREDICTIONS
        ),
        metadata=md,
    )
    lines = predictions.csv.decode().splitlines()
    assert lines[0] == "Barcode,Predictions" and predictions.n_rows == 4
    assert dict(line.split(",") for line in lines[1:]) == {
        DLPFC_BARCODES[0]: "Layer6",
        DLPFC_BARCODES[1]: "WM",
        DLPFC_BARCODES[2]: "help",
        DLPFC_BARCODES[3]: "help",
    }
    assert predictions.filename == f"{project}_151510_predictions.csv"

    # embeddings.ready: the next labels.committed carries the dataset's embeddings
    events.publish(
        bus,
        events_pb2.EmbeddingsReady(
            meta=events.new_meta(project=project, dataset="151510", producer="embedding"),
            embeddings_uri="file:///emb/151510.h5ad",
        ),
    )
    deadline = time.monotonic() + 10
    uris: list[str] = []
    n = 0
    while time.monotonic() < deadline and "file:///emb/151510.h5ad" not in uris:
        n += 1
        env.stub.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id=project,
                dataset_id="151510",
                batch_id=f"e{n}",
                labels=[pb.SpotLabel(barcode=DLPFC_BARCODES[0], label="WM")],
            ),
            metadata=md,
        )
        time.sleep(0.3)
        records = read_all(bus, events.LABELS_COMMITTED, group=f"emb{n}")
        uris = [u for r in records for u in events.decode(r).embeddings_uris]  # type: ignore[attr-defined]
    assert "file:///emb/151510.h5ad" in uris
    bus.close()


def test_watch_stream_ends_cleanly_when_the_server_stops(
    grpc_env: GrpcEnv, dlpfc_spatial: Path
) -> None:
    env = grpc_env
    project = create_project(env, dlpfc_spatial)
    stream = env.stub.WatchQuerySets(
        pb.WatchQuerySetsRequest(project_id=project), metadata=env.md(env.admin_token)
    )
    outcome: list[object] = []

    def consume() -> None:
        try:
            outcome.append(list(stream))
        except grpc.RpcError as exc:
            outcome.append(exc.code())

    reader = threading.Thread(target=consume)
    reader.start()
    time.sleep(0.5)
    started = time.monotonic()
    env.server.stop(5.0)  # type: ignore[attr-defined]
    reader.join(10)
    assert not reader.is_alive()
    assert outcome == [[]]  # the stream completed with OK, no error
    assert time.monotonic() - started < 5.0
