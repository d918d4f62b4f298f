"""Wiring of the prediction service: servicer, event handlers."""

from __future__ import annotations

import grpc
import numpy as np

from histoloop import events
from histoloop.auth import require_project
from histoloop.errors import InvalidArgument
from histoloop.prediction.proposals import propose_clicked_region
from histoloop.prediction.step import PredictionStep
from histoloop.runtime import Runtime, ServiceParts
from histoloop.v1 import prediction_pb2, prediction_pb2_grpc

__all__ = ["PredictionServicer", "build"]

_MAX_VALUES = 50_000_000


class PredictionServicer(prediction_pb2_grpc.PredictionServiceServicer):
    """Thin proto ↔ domain layer."""

    def __init__(self, step: PredictionStep) -> None:
        self.step = step

    def Predict(
        self, request: prediction_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> prediction_pb2.PredictResponse:
        if not request.project_id:
            raise InvalidArgument("project_id is required")
        require_project(request.project_id)
        which = request.WhichOneof("input")
        if which == "vectors":
            v = request.vectors
            if (
                v.n == 0
                or v.dim == 0
                or v.n * v.dim != len(v.values)
                or len(v.values) > _MAX_VALUES
            ):
                raise InvalidArgument(
                    f"vectors: n×dim ({v.n}×{v.dim}) must equal len(values) ({len(v.values)}), "
                    f"non-zero and at most {_MAX_VALUES}"
                )
            result = self.step.predict_on_demand(
                request.project_id,
                request.model_version,
                vectors=np.asarray(v.values, dtype=np.float32).reshape(v.n, v.dim),
                annotator=request.annotator_id,
            )
        elif which == "embeddings_uri":
            result = self.step.predict_on_demand(
                request.project_id,
                request.model_version,
                embeddings_uri=request.embeddings_uri,
                annotator=request.annotator_id,
            )
        else:
            raise InvalidArgument("input: give vectors or embeddings_uri")
        classes = list(result.classes)
        return prediction_pb2.PredictResponse(
            classes=classes,
            probabilities=result.probabilities.ravel().tolist(),
            predicted=[classes[i] for i in result.probabilities.argmax(axis=1)],
            barcodes=list(result.barcodes),
            model_version=result.model_version,
            missing_genes=list(result.missing_genes),
        )

    def ProposeRegion(
        self, request: prediction_pb2.ProposeRegionRequest, context: grpc.ServicerContext
    ) -> prediction_pb2.ProposeRegionResponse:
        for field in ("project_id", "dataset_id", "unit"):
            if not getattr(request, field):
                raise InvalidArgument(f"{field} is required")
        require_project(request.project_id)
        region = propose_clicked_region(
            self.step.store,
            request.project_id,
            request.dataset_id,
            request.unit,
            model_version=request.model_version,
            max_units=request.max_units,
            annotator=request.annotator_id,
        )
        return prediction_pb2.ProposeRegionResponse(
            units=list(region.units),
            class_name=region.class_name,
            model_version=region.model_version,
        )


def build(runtime: Runtime) -> ServiceParts:
    """The prediction service's parts."""
    step = PredictionStep(runtime.store, runtime.bus)
    servicer = PredictionServicer(step)
    return ServiceParts(
        name="prediction",
        grpc_service="histoloop.v1.PredictionService",
        register=lambda server: prediction_pb2_grpc.add_PredictionServiceServicer_to_server(
            servicer, server
        ),
        handlers={events.MODEL_TRAINED: step.on_model},
        coalesce=[events.MODEL_TRAINED],
    )
