"""Wiring of the tiling service: servicer, event handlers, health checks."""

from __future__ import annotations

from histoloop.runtime import Runtime, ServiceParts
from histoloop.v1 import tiling_pb2_grpc

__all__ = ["build"]


def build(runtime: Runtime) -> ServiceParts:
    """The tiling service's parts (RPCs answer UNIMPLEMENTED until its issue lands)."""
    servicer = tiling_pb2_grpc.TilingServiceServicer()
    return ServiceParts(
        name="tiling",
        grpc_service="histoloop.v1.TilingService",
        register=lambda server: tiling_pb2_grpc.add_TilingServiceServicer_to_server(servicer, server),
    )
