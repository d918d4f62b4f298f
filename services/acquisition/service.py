"""Wiring of the acquisition service: servicer, event handlers, health checks."""

from __future__ import annotations

from histoloop.runtime import Runtime, ServiceParts
from histoloop.v1 import acquisition_pb2_grpc

__all__ = ["build"]


def build(runtime: Runtime) -> ServiceParts:
    """The acquisition service's parts (RPCs answer UNIMPLEMENTED until its issue lands)."""
    servicer = acquisition_pb2_grpc.AcquisitionServiceServicer()
    return ServiceParts(
        name="acquisition",
        grpc_service="histoloop.v1.AcquisitionService",
        register=lambda server: acquisition_pb2_grpc.add_AcquisitionServiceServicer_to_server(servicer, server),
    )
