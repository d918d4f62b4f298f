"""Wiring of the prediction service: servicer, event handlers, health checks."""

from __future__ import annotations

from histoloop.runtime import Runtime, ServiceParts
from histoloop.v1 import prediction_pb2_grpc

__all__ = ["build"]


def build(runtime: Runtime) -> ServiceParts:
    """The prediction service's parts (RPCs answer UNIMPLEMENTED until its issue lands)."""
    servicer = prediction_pb2_grpc.PredictionServiceServicer()
    return ServiceParts(
        name="prediction",
        grpc_service="histoloop.v1.PredictionService",
        register=lambda server: prediction_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server),
    )
