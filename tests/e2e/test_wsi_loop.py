"""Whole-slide tiles as labelled units across six service processes (Kafka, S3, PostgreSQL,
Triton): register the CMU slide → a cold-start query of tiles → labels (one batch over gRPC,
one as QuPath GeoJSON) → a model, predictions and a new query set, by themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import common_pb2
from tests.e2e.loop import wait_for
from tests.e2e.stack import Stack

CLASSES = ("tumour", "stroma", "background")


def _round(store, project: str, at_least: int) -> pb.QuerySet | None:
    sets = store.ListQuerySets(pb.ListQuerySetsRequest(project_id=project), timeout=30).query_sets
    return next((q for q in sets if q.round >= at_least), None)


def test_wsi_tiles_loop_over_six_processes(stack: Stack, slide: Path) -> None:
    store, project = stack.store_stub(), "e2e-wsi"
    store.CreateProject(
        pb.CreateProjectRequest(
            project_id=project,
            classes=[common_pb2.ClassDef(name=n) for n in CLASSES],
            config=common_pb2.LoopConfig(
                query_size=6, head="logreg", seed=0, features=common_pb2.FEATURE_SET_MORPHOLOGY
            ),
        ),
        timeout=30,
    )
    store.RegisterDataset(
        pb.RegisterDatasetRequest(
            project_id=project,
            dataset_id="cmu",
            kind=common_pb2.DATASET_KIND_WSI,
            slide_path=str(slide),
        ),
        timeout=60,
    )
    cold = wait_for("the cold-start query of tiles", lambda: _round(store, project, 0), 150)
    assert len(cold.spots) == 6 and all(s.barcode.startswith("r") for s in cold.spots)
    dataset = store.ListDatasets(pb.ListDatasetsRequest(project_id=project), timeout=30).datasets[0]
    assert dataset.n_spots == dataset.n_in_tissue > 20  # the store knows every tissue tile

    # half the answers over gRPC, half drawn in QuPath (the exported squares, classified)
    store.SubmitLabels(
        pb.SubmitLabelsRequest(
            project_id=project,
            dataset_id="cmu",
            batch_id="grpc-half",
            labels=[
                pb.SpotLabel(barcode=s.barcode, label=CLASSES[i % 3])
                for i, s in enumerate(cold.spots[:3])
            ],
        ),
        timeout=60,
    )
    first = wait_for("round 1", lambda: _round(store, project, 1), 150)
    assert first.model_version
    exported = store.ExportLabels(
        pb.ExportLabelsRequest(
            project_id=project,
            dataset_id="cmu",
            kind=pb.EXPORT_KIND_QUERY_SET,
            format=pb.EXPORT_FORMAT_GEOJSON,
            queryset_id=first.queryset_id,
        ),
        timeout=60,
    )
    doc = json.loads(exported.content)
    for i, feature in enumerate(doc["features"]):
        feature["properties"]["classification"] = {"name": CLASSES[i % 3]}
    reply = store.ImportGeoJson(
        pb.ImportGeoJsonRequest(
            project_id=project,
            dataset_id="cmu",
            batch_id="qupath",
            geojson=json.dumps(doc).encode(),
        ),
        timeout=60,
    )
    assert reply.n_labels == len(first.spots)
    second = wait_for("round 2", lambda: _round(store, project, 2), 150)
    assert second.model_version and not {s.barcode for s in second.spots} & {
        s.barcode for s in first.spots
    }
    status = store.GetStatus(pb.GetStatusRequest(project_id=project), timeout=30)
    assert status.n_labelled == 3 + len(first.spots) and status.n_spots == dataset.n_spots
    predictions = store.ExportLabels(
        pb.ExportLabelsRequest(
            project_id=project, dataset_id="cmu", kind=pb.EXPORT_KIND_PREDICTIONS
        ),
        timeout=60,
    )
    assert len(predictions.csv.decode().splitlines()) == dataset.n_spots + 1
    png = store.ExportLabels(
        pb.ExportLabelsRequest(
            project_id=project,
            dataset_id="cmu",
            kind=pb.EXPORT_KIND_QUERY_SET,
            format=pb.EXPORT_FORMAT_PNG,
        ),
        timeout=60,
    )
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"


def _cli(stack: Stack, *args: str, tls: bool = True, token: str | None = None, rc: int = 0) -> str:
    """``histoloop …`` as a subprocess against the stack's annotation store (TLS flags, token)."""
    assert stack.tls is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("HISTOLOOP_")}
    flags = [
        "--server",
        stack.services["annotation_store"].address,
        "--token",
        token or stack.admin_token,
    ]
    if tls:
        flags += [
            "--tls-ca",
            str(stack.tls.ca),
            "--tls-cert",
            str(stack.tls.cert),
            "--tls-key",
            str(stack.tls.key),
        ]
    done = subprocess.run(
        [sys.executable, "-m", "histoloop.cli", *args, *flags, "--timeout", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == rc, done.stderr
    return done.stdout if rc == 0 else done.stderr


def test_the_commands_reach_a_tls_server_with_tokens(stack: Stack, slide: Path) -> None:
    """``--server``, ``--tls-*`` and ``--token`` against the mutual-TLS stack; an annotator's token
    sees only its projects."""
    project = "e2e-cli"
    _cli(stack, "project", "create", project, "--classes", "a,b", "--query-size", "4")
    assert json.loads(_cli(stack, "project", "show", project, "--json"))["project_id"] == project
    token = json.loads(_cli(stack, "annotator", "add", "cli-path", "--project", project, "--json"))[
        "token"
    ]
    mine = json.loads(_cli(stack, "project", "list", "--json", token=token))
    assert [p["project_id"] for p in mine] == [project]
    assert "project 'e2e-nope' not found" in _cli(stack, "status", "e2e-nope", rc=1)
    refused = _cli(stack, "project", "create", "e2e-cli-2", "--classes", "a,b", token=token, rc=1)
    assert "may not create projects" in refused
    assert "cannot reach the server" in _cli(stack, "project", "list", tls=False, rc=1)
