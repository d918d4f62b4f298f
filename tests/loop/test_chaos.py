"""Chaos, bounded: five projects, every kind of bad input, malformed events on every topic.

One embedded server with all six services. Two healthy projects run their rounds on DLPFC
151510 while the other three feed it what issue 12 lists — unknown strategy names, a
dataset that cannot feed the feature set, a reused batch id, a typo class, a bogus query
set id, a counts file that does not parse — and events that do not parse or point at
nothing, on every topic. Afterwards: the server is alive and ready, the healthy projects
finished their rounds, every bad input was refused at the door (the reply names the field)
or parked with its reason in ``GetStatus``, every acknowledged label batch is in the
history, and every consumer group is caught up (nothing left behind, nothing lost).
"""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histoloop import events
from histoloop.config import load_settings
from histoloop.server import Server
from histoloop.stages import STAGES, list_dead_letters
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import annotation_store_pb2_grpc, common_pb2, events_pb2
from tests.loop.conftest import LAYERS, answer, start_project

pytestmark = pytest.mark.timeout(120)  # bounded: about 30 s on 2 cores

ROUNDS = 2
HEALTHY = ("chaos-h1", "chaos-h2")


def _refused(call, code: grpc.StatusCode, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert info.value.details().startswith(field), info.value.details()


def test_chaos_never_stalls_a_healthy_project(dlpfc, tmp_path: Path) -> None:
    folder, truth = dlpfc
    rng = random.Random(12)
    server = Server(
        load_settings(
            data_dir=tmp_path / "state",
            grpc_port=0,
            metrics_port=0,
            max_attempts=2,
            retry_backoff=0.2,
        )
    )
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = annotation_store_pb2_grpc.AnnotationStoreServiceStub(channel)
    bus, store = server.runtime.bus, server.runtime.store
    try:
        watches = {
            p: start_project(stub, folder, p, query_size=10, head="logreg", seed=1) for p in HEALTHY
        }

        # -- bad inputs at the door: refused, naming the field; nothing stored -------------
        classes = [common_pb2.ClassDef(name=n) for n in LAYERS]
        _refused(
            lambda: stub.CreateProject(
                pb.CreateProjectRequest(
                    project_id="chaos-door",
                    classes=classes,
                    config=common_pb2.LoopConfig(strategy="uncertainty"),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.strategy",
        )
        _refused(
            lambda: stub.CreateProject(
                pb.CreateProjectRequest(
                    project_id="chaos-door",
                    classes=classes,
                    config=common_pb2.LoopConfig(cold_start_strategy="margin"),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.cold_start_strategy",
        )
        stub.CreateProject(pb.CreateProjectRequest(project_id="chaos-door", classes=classes))
        _refused(
            lambda: stub.RegisterDataset(
                pb.RegisterDatasetRequest(  # morphology, no slide
                    project_id="chaos-door",
                    dataset_id="151510",
                    spatial_dir=str(folder / "spatial"),
                )
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "slide_path",
        )
        assert not stub.GetProject(pb.GetProjectRequest(project_id="chaos-door")).datasets

        # -- a counts file that does not parse: passes the door, parked in embedding --------
        broken = tmp_path / "broken.h5ad"
        broken.write_bytes(b"this is not an AnnData file" * 100)
        stub.CreateProject(
            pb.CreateProjectRequest(
                project_id="chaos-counts",
                classes=classes,
                config=common_pb2.LoopConfig(features=common_pb2.FEATURE_SET_EXPRESSION),
            )
        )
        stub.RegisterDataset(
            pb.RegisterDatasetRequest(
                project_id="chaos-counts",
                dataset_id="151510",
                spatial_dir=str(folder / "spatial"),
                expression_path=str(broken),
            )
        )

        # -- events that parse but point at nothing, for a project of their own ------------
        stub.CreateProject(pb.CreateProjectRequest(project_id="chaos-ghost", classes=classes))
        ghost = store.uri("nothing/here.bin")
        ghost_meta = {"project": "chaos-ghost", "dataset": "d", "producer": "chaos"}
        for message in (
            events_pb2.DatasetRegistered(
                meta=events.new_meta(**ghost_meta),
                slide_uri=ghost,
                kind=common_pb2.DATASET_KIND_WSI,
            ),
            events_pb2.TilesReady(meta=events.new_meta(**ghost_meta), patches_uri=ghost),
            events_pb2.LabelsCommitted(
                meta=events.new_meta(**ghost_meta),
                labels_uri=ghost,
                embeddings_uris=[ghost],
                label_version=1,
            ),
            events_pb2.ModelTrained(meta=events.new_meta(**ghost_meta), model_uri=ghost),
            events_pb2.PredictionsReady(meta=events.new_meta(**ghost_meta), predictions_uri=ghost),
        ):
            events.publish(bus, message)
        # -- bytes that do not parse, on every topic, under random keys --------------------
        garbage = {}
        for topic in events.TOPICS:
            key = rng.choice([*HEALTHY, "chaos-ghost", f"nobody-{rng.randrange(1000)}"])
            event_id = f"garbage-{uuid.uuid4().hex[:8]}"
            bus.publish(
                topic, key, rng.randbytes(rng.randrange(1, 64)) + b"\xff\xff", event_id=event_id
            )
            garbage[event_id] = key

        # -- the healthy projects: rounds, plus the careful-user mistakes along the way ----
        acknowledged = {p: 0 for p in HEALTHY}
        latest = {p: watches[p].next_round(-1, timeout=90) for p in HEALTHY}
        for round_ in range(1, ROUNDS + 1):
            for project in HEALTHY:
                labels = answer(latest[project], truth)
                reply = stub.SubmitLabels(
                    pb.SubmitLabelsRequest(
                        project_id=project,
                        dataset_id="151510",
                        batch_id=f"r{round_}",
                        labels=labels,
                        queryset_id=latest[project].queryset_id,
                    )
                )
                acknowledged[project] += reply.n_labels
                typo = [
                    pb.SpotLabel(barcode=labels[0].barcode, label=labels[0].label.lower() + " ")
                ]
                _refused(
                    lambda p=project, t=typo: stub.SubmitLabels(
                        pb.SubmitLabelsRequest(
                            project_id=p,
                            dataset_id="151510",
                            batch_id="typo",
                            labels=t,
                            add_missing_classes=True,
                        )
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "labels[0]",
                )
                _refused(
                    lambda p=project, ls=labels, r=round_: stub.SubmitLabels(
                        pb.SubmitLabelsRequest(
                            project_id=p, dataset_id="151510", batch_id=f"r{r}", labels=ls[1:]
                        )
                    ),
                    grpc.StatusCode.ALREADY_EXISTS,
                    "batch_id",
                )
                _refused(
                    lambda p=project, ls=labels: stub.SubmitLabels(
                        pb.SubmitLabelsRequest(
                            project_id=p,
                            dataset_id="151510",
                            batch_id="bogus",
                            labels=ls,
                            queryset_id="no-such-set",
                        )
                    ),
                    grpc.StatusCode.NOT_FOUND,
                    "queryset_id",
                )
            for project in HEALTHY:
                latest[project] = watches[project].next_round(round_ - 1, timeout=90)
        for watch in watches.values():
            watch.close()

        # -- afterwards ----------------------------------------------------------------------
        health = health_pb2_grpc.HealthStub(channel)
        assert (
            health.Check(health_pb2.HealthCheckRequest(service="")).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        for project in HEALTHY:  # finished, nothing acknowledged lost
            status = stub.GetStatus(pb.GetStatusRequest(project_id=project))
            assert status.round == ROUNDS and status.label_version == ROUNDS
            assert status.n_labelled == acknowledged[project]
            assert {s.stage: s.status for s in status.stages if s.stage in STAGES} == dict.fromkeys(
                STAGES, common_pb2.STAGE_STATUS_DONE
            )
        counts = _wait_parked(stub, "chaos-counts", {"embedding"})
        assert (
            next(s for s in counts.stages if s.stage == "embedding").status
            == common_pb2.STAGE_STATUS_PARKED
        )
        _wait_parked(
            stub, "chaos-ghost", {"tiling", "embedding", "training", "prediction", "acquisition"}
        )
        for event_id, key in garbage.items():  # each parked under its key, with the parse error
            letters = [d for d in list_dead_letters(store, key) if d.event_id == event_id]
            assert letters and "does not parse" in letters[0].error, event_id
        _wait_caught_up(server)
    finally:
        channel.close()
        server.stop(5)


def _wait_parked(stub, project: str, stages: set[str], timeout: float = 60.0) -> pb.ProjectStatus:
    deadline = time.monotonic() + timeout
    while True:
        status = stub.GetStatus(pb.GetStatusRequest(project_id=project))
        parked = {p.stage for p in status.parked}
        if stages <= parked:
            assert all(p.error for p in status.parked)
            return status
        assert time.monotonic() < deadline, f"{project}: parked {parked}, expected {stages}"
        time.sleep(0.3)


def _wait_caught_up(server: Server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for worker in server.workers:
        consumer = server.runtime.bus.consumer(worker.group, sorted(worker._handlers))
        while sum(consumer.lag().values()):
            assert time.monotonic() < deadline, (worker.group, dict(consumer.lag()))
            time.sleep(0.2)
        consumer.close()
