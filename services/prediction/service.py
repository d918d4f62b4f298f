"""Wiring of the prediction service: servicer, event handlers."""

from __future__ import annotations

import grpc
import numpy as np

from histoloop import events
from histoloop.auth import require_project
from histoloop.datasets import feature_matrix, read_anndata
from histoloop.errors import InvalidArgument
from histoloop.models import latest_card, load_model
from histoloop.prediction.loop import PredictionStep
from histoloop.runtime import Runtime, ServiceParts
from histoloop.v1 import prediction_pb2, prediction_pb2_grpc

__all__ = ["PredictionServicer", "build"]

_MAX_VALUES = 50_000_000


class PredictionServicer(prediction_pb2_grpc.PredictionServiceServicer):
    """Thin proto ↔ domain layer."""

    def __init__(self, step: PredictionStep) -> None:
        self.step = step

    def Predict(self, request: prediction_pb2.PredictRequest,
                context: grpc.ServicerContext) -> prediction_pb2.PredictResponse:
        if not request.project_id:
            raise InvalidArgument("project_id is required")
        require_project(request.project_id)
        uri, _ = latest_card(self.step.store, request.project_id, request.model_version)
        model = load_model(self.step.store, uri)
        barcodes: list[str] = []
        missing: list[str] = []
        which = request.WhichOneof("input")
        if which == "vectors":
            v = request.vectors
            if v.n == 0 or v.dim == 0 or v.n * v.dim != len(v.values) or len(v.values) > _MAX_VALUES:
                raise InvalidArgument(
                    f"vectors: n×dim ({v.n}×{v.dim}) must equal len(values) ({len(v.values)}), "
                    f"non-zero and at most {_MAX_VALUES}")
            x = np.asarray(v.values, dtype=np.float32).reshape(v.n, v.dim)
        elif which == "embeddings_uri":
            adata = read_anndata(self.step.store, request.embeddings_uri)
            x = feature_matrix(adata, model.card.features, model.card.spatial_neighbours)
            barcodes = list(map(str, adata.obs_names))
            missing = [str(g) for g in adata.uns.get("missing_genes", [])]
        else:
            raise InvalidArgument("input: give vectors or embeddings_uri")
        probs, _, _ = model.predict(x)
        classes = list(model.card.classes)
        return prediction_pb2.PredictResponse(
            classes=classes, probabilities=probs.ravel().tolist(),
            predicted=[classes[i] for i in probs.argmax(axis=1)], barcodes=barcodes,
            model_version=model.card.version, missing_genes=missing)


def build(runtime: Runtime) -> ServiceParts:
    """The prediction service's parts."""
    step = PredictionStep(runtime.store, runtime.bus)
    servicer = PredictionServicer(step)
    return ServiceParts(
        name="prediction",
        grpc_service="histoloop.v1.PredictionService",
        register=lambda server: prediction_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server),
        handlers={events.MODEL_TRAINED: step.on_model},
        coalesce=[events.MODEL_TRAINED],
    )
