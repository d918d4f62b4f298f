"""Recovery without deleting anything, over gRPC: UpdateProject, RemoveDataset, RetryStage.

And the door checks as a client meets them: refused with the field named, nothing stored.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from histoloop import events
from histoloop.bus.base import Record
from histoloop.stages import park_event
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import common_pb2, events_pb2
from tests.annotation_store.conftest import LAYERS, GrpcEnv, new_project_id
from tests.annotation_store.test_grpc import DLPFC_BARCODES, annotator, create_project
from tests.annotation_store.test_outbox import read_all


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_update_and_remove_keep_history_and_the_door_names_the_field(
    grpc_env: GrpcEnv, dlpfc_spatial: Path
) -> None:
    env, admin = grpc_env, grpc_env.md(grpc_env.admin_token)
    # CreateProject: names no service implements are refused up front
    bad = _error(
        lambda: env.stub.CreateProject(
            pb.CreateProjectRequest(
                project_id=new_project_id(),
                classes=[common_pb2.ClassDef(name="A")],
                config=common_pb2.LoopConfig(strategy="uncertainty"),
            ),
            metadata=admin,
        )
    )
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and bad.details().startswith(
        "config.strategy"
    )

    project = create_project(env, dlpfc_spatial)  # expression features, counts given
    # RegisterDataset: a spatial/ folder alone cannot feed an expression project
    refused = _error(
        lambda: env.stub.RegisterDataset(
            pb.RegisterDatasetRequest(
                project_id=project, dataset_id="spatial-only", spatial_dir=str(dlpfc_spatial)
            ),
            metadata=admin,
        )
    )
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.details().startswith("expression_path")
    assert list(
        env.stub.GetProject(pb.GetProjectRequest(project_id=project), metadata=admin).datasets
    ) == ["151510"]

    # UpdateProject: merges the fields given, validates, records who/when/why
    updated = env.stub.UpdateProject(
        pb.UpdateProjectRequest(
            project_id=project,
            config=common_pb2.LoopConfig(strategy="margin", query_size=7),
            reason="margin reads better",
        ),
        metadata=admin,
    )
    assert (updated.config.strategy, updated.config.query_size, updated.config.features) == (
        "margin",
        7,
        common_pb2.FEATURE_SET_EXPRESSION,
    )
    wrong = _error(
        lambda: env.stub.UpdateProject(
            pb.UpdateProjectRequest(
                project_id=project, config=common_pb2.LoopConfig(cold_start_strategy="margin")
            ),
            metadata=admin,
        )
    )
    assert wrong.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wrong.details().startswith("config.cold_start_strategy")
    reset = env.stub.UpdateProject(
        pb.UpdateProjectRequest(project_id=project, reset_fields=["query_size"]), metadata=admin
    )
    assert (reset.config.strategy, reset.config.query_size) == ("margin", 20)
    pathologist = env.md(annotator(env, "pat-recovery", [project]))
    denied = _error(
        lambda: env.stub.UpdateProject(
            pb.UpdateProjectRequest(
                project_id=project, config=common_pb2.LoopConfig(strategy="random")
            ),
            metadata=pathologist,
        )
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED

    # the next label batch carries the new config (it takes effect from the next round)
    env.stub.SubmitLabels(
        pb.SubmitLabelsRequest(
            project_id=project,
            dataset_id="151510",
            batch_id="r1",
            labels=[pb.SpotLabel(barcode=DLPFC_BARCODES[0], label="Layer1")],
        ),
        metadata=pathologist,
    )
    # Loupe rows with an empty label are not labels: skipped, and the reply says how many
    csv = f"Barcode,Pathologist\n{DLPFC_BARCODES[2]},Layer2\n{DLPFC_BARCODES[3]},\n".encode()
    reply = env.stub.ImportLoupeCsv(
        pb.ImportLoupeCsvRequest(
            project_id=project, dataset_id="151510", batch_id="loupe-1", csv=csv
        ),
        metadata=pathologist,
    )
    assert (reply.n_labels, reply.n_empty) == (1, 1)
    status = env.stub.GetStatus(pb.GetStatusRequest(project_id=project), metadata=admin)
    history = list(status.config_history)
    assert [(c.after.strategy, c.after.query_size, c.changed_by) for c in history] == [
        ("margin", 7, "admin"),
        ("margin", 20, "admin"),
    ]
    assert (
        history[0].before.strategy == "activevisium" and history[0].reason == "margin reads better"
    )
    assert history[0].from_label_version == 1
    committed = _wait_for(
        lambda: [
            r
            for r in read_all(
                env.server.runtime.bus, events.LABELS_COMMITTED, group=f"t-{time.time()}"
            )
            if r.key == project
        ]
    )
    assert events_pb2.LabelsCommitted.FromString(committed[-1].value).config.strategy == "margin"

    # RemoveDataset: out of the pool, labels kept, no new labels
    removed = env.stub.RemoveDataset(
        pb.RemoveDatasetRequest(project_id=project, dataset_id="151510", reason="wrong sample"),
        metadata=admin,
    )
    assert removed.removed_by == "admin" and removed.removed_at.seconds > 0
    after = env.stub.GetStatus(pb.GetStatusRequest(project_id=project), metadata=admin)
    assert after.n_spots == 0 and after.n_labelled == 2  # the labels stay in the history
    late = _error(
        lambda: env.stub.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id=project,
                dataset_id="151510",
                batch_id="r2",
                labels=[pb.SpotLabel(barcode=DLPFC_BARCODES[1], label="Layer1")],
            ),
            metadata=pathologist,
        )
    )
    assert late.code() == grpc.StatusCode.FAILED_PRECONDITION and "removed" in late.details()


def test_a_parked_stage_is_visible_and_retry_stage_runs_it_again(grpc_env: GrpcEnv) -> None:
    env, admin = grpc_env, grpc_env.md(grpc_env.admin_token)
    project = new_project_id()
    env.stub.CreateProject(
        pb.CreateProjectRequest(
            project_id=project, classes=[common_pb2.ClassDef(name=c) for c in LAYERS]
        ),
        metadata=admin,
    )
    # the store's own stage ("recording" query sets) parked a valid event earlier, as its
    # worker does after the retries ran out (e.g. the database was being restored)
    message = events_pb2.QuerySetReady(
        meta=events.new_meta(project=project, dataset="d1", producer="acquisition"),
        queryset_id="qs-1",
        round=1,
        strategy="random",
    )
    parked = Record(
        topic=events.QUERYSET_READY,
        key=project,
        value=message.SerializeToString(),
        event_id=message.meta.event_id,
        partition=0,
        offset=0,
        timestamp_ms=0,
    )
    park_event(env.server.runtime.store, "recording", parked, "database is being restored", 5)

    status = env.stub.GetStatus(pb.GetStatusRequest(project_id=project), metadata=admin)
    assert status.n_parked == 1
    assert (
        status.parked[0].stage,
        status.parked[0].event_id,
        status.parked[0].error,
        status.parked[0].dataset,
    ) == ("recording", message.meta.event_id, "database is being restored", "d1")
    missing = _error(
        lambda: env.stub.RetryStage(
            pb.RetryStageRequest(project_id=project, stage="training"), metadata=admin
        )
    )
    assert missing.code() == grpc.StatusCode.FAILED_PRECONDITION
    unknown = _error(
        lambda: env.stub.RetryStage(
            pb.RetryStageRequest(project_id=project, stage="typing"), metadata=admin
        )
    )
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT and unknown.details().startswith(
        "stage"
    )

    retried = env.stub.RetryStage(
        pb.RetryStageRequest(project_id=project, stage="recording"), metadata=admin
    )
    assert retried.n_retried == 1 and retried.event_ids[0] != message.meta.event_id
    recorded = _wait_for(
        lambda: (
            env.stub.ListQuerySets(
                pb.ListQuerySetsRequest(project_id=project), metadata=admin
            ).query_sets
        )
    )
    assert [q.queryset_id for q in recorded] == ["qs-1"]
    final = _wait_for(
        lambda: [
            s
            for s in env.stub.GetStatus(
                pb.GetStatusRequest(project_id=project), metadata=admin
            ).stages
            if s.stage == "recording" and s.status == common_pb2.STAGE_STATUS_DONE
        ]
    )
    assert final[0].event_id == retried.event_ids[0]
    assert env.stub.GetStatus(pb.GetStatusRequest(project_id=project), metadata=admin).n_parked == 0
    again = _error(
        lambda: env.stub.RetryStage(
            pb.RetryStageRequest(project_id=project, stage="recording"), metadata=admin
        )
    )
    assert again.code() == grpc.StatusCode.FAILED_PRECONDITION  # retried once, not twice


def _wait_for(probe, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return found
