"""Wiring of the training service: servicer, event handlers, health checks."""

from __future__ import annotations

from histoloop.runtime import Runtime, ServiceParts
from histoloop.v1 import training_pb2_grpc

__all__ = ["build"]


def build(runtime: Runtime) -> ServiceParts:
    """The training service's parts (RPCs answer UNIMPLEMENTED until its issue lands)."""
    servicer = training_pb2_grpc.TrainingServiceServicer()
    return ServiceParts(
        name="training",
        grpc_service="histoloop.v1.TrainingService",
        register=lambda server: training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server),
    )
