"""Per-annotator models through the embedded loop: two annotators label the same DLPFC spots
differently (bob folds Layer6 into Layer5); the next model predicts, proposes regions and
exports "as annotator X" in each one's style, and rater_disagreement queries where they differ."""

from __future__ import annotations

import csv
import io
import json

import grpc
import numpy as np
import pytest

from histoloop.datasets import read_predictions
from histoloop.models import latest_card
from histoloop.prediction.proposals import predictions_key
from histoloop.v1 import (
    acquisition_pb2,
    acquisition_pb2_grpc,
    annotation_store_pb2_grpc,
    prediction_pb2,
    prediction_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from histoloop.v1 import annotation_store_pb2 as pb
from tests.loop.conftest import answer, start_project

PROJECT = "raters-a"
DATASET = "151510"


def _error(call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value


def test_predict_as_each_annotator(server, store, channel, dlpfc) -> None:
    folder, truth = dlpfc
    predict = prediction_pb2_grpc.PredictionServiceStub(channel)
    watch = start_project(store, folder, PROJECT, query_size=60, head="logreg", seed=5)
    for who in ("ann", "bob"):
        store.RegisterAnnotator(
            pb.RegisterAnnotatorRequest(
                annotator_id=who,
                display_name=who,
                role=pb.ANNOTATOR_ROLE_ANNOTATOR,
                projects=[PROJECT],
            )
        )
    cold = watch.next_round(-1)
    given = answer(cold, truth)
    merged = [
        pb.SpotLabel(barcode=s.barcode, label="Layer5" if s.label == "Layer6" else s.label)
        for s in given
    ]
    assert any(s.label == "Layer6" for s in given)

    store.SubmitLabels(
        pb.SubmitLabelsRequest(
            project_id=PROJECT,
            dataset_id=DATASET,
            batch_id="ann-1",
            labels=given,
            annotator_id="ann",
        )
    )
    first = watch.next_round(0)  # a model on ann's labels alone: no per-annotator model
    _, card = latest_card(server.runtime.store, PROJECT, first.model_version)
    assert list(card.raters) == []
    uri = card.embeddings_uris[0]
    alone = _error(
        predict.Predict,
        prediction_pb2.PredictRequest(
            project_id=PROJECT,
            model_version=first.model_version,
            embeddings_uri=uri,
            annotator_id="ann",
        ),
    )
    assert (
        alone.code() == grpc.StatusCode.FAILED_PRECONDITION and "per-annotator" in alone.details()
    )

    store.SubmitLabels(
        pb.SubmitLabelsRequest(
            project_id=PROJECT,
            dataset_id=DATASET,
            batch_id="bob-1",
            labels=merged,
            annotator_id="bob",
        )
    )
    second = watch.next_round(first.round)
    watch.close()
    _, card = latest_card(server.runtime.store, PROJECT, second.model_version)
    assert list(card.raters) == ["ann", "bob"]
    info = training_pb2_grpc.TrainingServiceStub(channel).GetModel(
        training_pb2.GetModelRequest(project_id=PROJECT)
    )
    assert info.model_version == second.model_version and list(info.raters) == ["ann", "bob"]

    views = {}
    for who in ("ann", "bob"):
        reply = predict.Predict(
            prediction_pb2.PredictRequest(project_id=PROJECT, embeddings_uri=uri, annotator_id=who)
        )
        assert reply.model_version == second.model_version
        views[who] = dict(zip(reply.barcodes, reply.predicted, strict=True))
    barcodes = list(views["ann"])
    as_ann = np.array([views["ann"][b] for b in barcodes])
    as_bob = np.array([views["bob"][b] for b in barcodes])
    # where their labels differ (ann's Layer6 spots) their models differ; elsewhere they mostly agree
    layer6 = [s.barcode for s in given if s.label == "Layer6"]
    assert [views["ann"][b] for b in layer6].count("Layer6") > len(layer6) / 2
    assert [views["bob"][b] for b in layer6].count("Layer5") > len(layer6) / 2
    assert (as_bob == "Layer6").mean() < 0.02 < (as_ann == "Layer6").mean()
    assert (as_ann == as_bob)[(as_ann != "Layer6")].mean() > 0.8

    unknown = _error(
        predict.Predict,
        prediction_pb2.PredictRequest(project_id=PROJECT, embeddings_uri=uri, annotator_id="eve"),
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "annotator_id" in unknown.details()

    # the stored predictions carry each annotator's view: regions and exports as that annotator
    artifacts = server.runtime.store
    stored = read_predictions(
        artifacts, artifacts.uri(predictions_key(PROJECT, second.model_version))
    )
    assert list(stored.raters) == ["ann", "bob"] and stored.rater_disagreement.max() > 0
    clicked = layer6[[views["ann"][b] for b in layer6].index("Layer6")]
    regions = {
        who: predict.ProposeRegion(
            prediction_pb2.ProposeRegionRequest(
                project_id=PROJECT, dataset_id=DATASET, unit=clicked, annotator_id=who
            )
        )
        for who in ("ann", "bob")
    }
    assert regions["ann"].class_name == "Layer6" and regions["bob"].class_name != "Layer6"
    assert set(regions["ann"].units) != set(regions["bob"].units)

    exported = store.ExportLabels(
        pb.ExportLabelsRequest(
            project_id=PROJECT,
            dataset_id=DATASET,
            kind=pb.EXPORT_KIND_PREDICTIONS,
            annotator_id="bob",
        )
    )
    rows = dict(csv.reader(io.StringIO(exported.csv.decode())))
    query = {s.barcode for s in second.spots}
    as_bob_stored = dict(zip(stored.barcodes.astype(str), stored.predicted_as("bob"), strict=True))
    assert all(
        label == ("help" if b in query else as_bob_stored[b])
        for b, label in rows.items()
        if b != "Barcode"
    )
    assert len(rows) - 1 == exported.n_rows == len(stored.barcodes)
    with grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_receive_message_length", 64 << 20)]
    ) as big:  # ~9 MB of GeoJSON
        geojson = annotation_store_pb2_grpc.AnnotationStoreServiceStub(big).ExportLabels(
            pb.ExportLabelsRequest(
                project_id=PROJECT,
                dataset_id=DATASET,
                annotator_id="ann",
                kind=pb.EXPORT_KIND_PREDICTIONS,
                format=pb.EXPORT_FORMAT_GEOJSON,
            )
        )
    as_ann_stored = dict(zip(stored.barcodes.astype(str), stored.predicted_as("ann"), strict=True))
    features = json.loads(geojson.content)["features"]
    assert len(features) == len(stored.barcodes)
    assert all(
        f["properties"]["classification"]["name"] == as_ann_stored[f["properties"]["name"]]
        for f in features
    )
    for kind, name, code in [
        (pb.EXPORT_KIND_PREDICTIONS, "eve", grpc.StatusCode.NOT_FOUND),
        (pb.EXPORT_KIND_LABELS, "bob", grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        error = _error(
            store.ExportLabels,
            pb.ExportLabelsRequest(
                project_id=PROJECT, dataset_id=DATASET, kind=kind, annotator_id=name
            ),
        )
        assert error.code() == code and "annotator_id" in error.details(), error.details()

    # disagreement-aware querying from the stored per-annotator predictions
    acquisition = acquisition_pb2_grpc.AcquisitionServiceStub(channel)
    picked = acquisition.Query(
        acquisition_pb2.QueryRequest(
            project_id=PROJECT, strategy="rater_disagreement", query_size=10
        )
    )
    disagreement = dict(zip(stored.barcodes.astype(str), stored.rater_disagreement, strict=True))
    assert picked.strategy == "rater_disagreement" and len(picked.spots) == 10
    assert all(disagreement[s.barcode] == 1.0 for s in picked.spots)
