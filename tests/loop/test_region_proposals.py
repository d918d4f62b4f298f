"""ProposeRegion against a real embedded server: a DLPFC project run to its first model."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from histoloop.datasets import read_anndata, read_predictions
from histoloop.models import latest_card
from histoloop.prediction.proposals import predictions_key
from histoloop.spatial import unit_positions
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import prediction_pb2, prediction_pb2_grpc
from tests.loop.conftest import answer, start_project

PROJECT = "region-a"
DATASET = "151510"


def _propose(
    stub: prediction_pb2_grpc.PredictionServiceStub, **fields
) -> prediction_pb2.ProposeRegionResponse:
    return stub.ProposeRegion(
        prediction_pb2.ProposeRegionRequest(
            **{"project_id": PROJECT, "dataset_id": DATASET, **fields}
        )
    )


def _error(stub: prediction_pb2_grpc.PredictionServiceStub, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _propose(stub, **fields)
    return info.value


def test_propose_region_on_the_first_model(server, store, channel, dlpfc) -> None:
    folder, truth = dlpfc
    stub = prediction_pb2_grpc.PredictionServiceStub(channel)
    unknown = _error(stub, unit="AAACAAGTATCTCCCA-1")
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "project_id" in unknown.details()

    watch = start_project(store, folder, PROJECT, query_size=12, head="logreg", seed=3)
    cold = watch.next_round(-1)
    early = _error(stub, unit=cold.spots[0].barcode)
    assert (
        early.code() == grpc.StatusCode.FAILED_PRECONDITION
        and "no predictions yet" in early.details()
    )

    store.SubmitLabels(
        pb.SubmitLabelsRequest(
            project_id=PROJECT, dataset_id=DATASET, batch_id="b1", labels=answer(cold, truth)
        )
    )
    first = watch.next_round(0)
    watch.close()
    replies = {
        s.barcode: _propose(stub, unit=s.barcode) for s in cold.spots
    }  # each labelled spot clicked
    clicked, reply = max(replies.items(), key=lambda item: len(item[1].units))
    assert reply.model_version == first.model_version
    assert reply.units[0] == clicked and len(set(reply.units)) == len(reply.units) > 1

    artifacts = server.runtime.store
    predictions = read_predictions(
        artifacts, artifacts.uri(predictions_key(PROJECT, reply.model_version))
    )
    predicted = dict(zip(predictions.barcodes.astype(str), predictions.predicted, strict=True))
    assert reply.class_name == predicted[clicked]
    assert {predicted[u] for u in reply.units} == {reply.class_name}
    assert all(r.units[0] == b and predicted[b] == r.class_name for b, r in replies.items())

    _, card = latest_card(artifacts, PROJECT)
    adata = read_anndata(artifacts, card.embeddings_uris[0])
    positions = dict(zip(map(str, adata.obs_names), unit_positions(adata), strict=True))
    region = np.array([positions[u] for u in reply.units])
    for i in range(
        1, len(region)
    ):  # touching Visium spots are 2 apart in isotropic array positions
        assert np.linalg.norm(region[:i] - region[i], axis=1).min() <= 2.0 + 1e-6, (
            f"unit {i} is not connected"
        )

    capped = _propose(stub, unit=clicked, max_units=5, model_version=first.model_version)
    assert list(capped.units) == list(reply.units[:5])

    for fields, code, name in [
        ({"unit": "no-such-spot"}, grpc.StatusCode.NOT_FOUND, "unit"),
        (
            {"unit": clicked, "dataset_id": "no-such-dataset"},
            grpc.StatusCode.NOT_FOUND,
            "dataset_id",
        ),
        ({"unit": clicked, "model_version": "v-none"}, grpc.StatusCode.NOT_FOUND, "model_version"),
        ({"unit": ""}, grpc.StatusCode.INVALID_ARGUMENT, "unit"),
    ]:
        error = _error(stub, **fields)
        assert error.code() == code and name in error.details(), (fields, error.details())
