"""Wiring of the embedding service: servicer, event handlers, health checks."""

from __future__ import annotations

from histoloop.runtime import Runtime, ServiceParts
from histoloop.v1 import embedding_pb2_grpc

__all__ = ["build"]


def build(runtime: Runtime) -> ServiceParts:
    """The embedding service's parts (RPCs answer UNIMPLEMENTED until its issue lands)."""
    servicer = embedding_pb2_grpc.EmbeddingServiceServicer()
    return ServiceParts(
        name="embedding",
        grpc_service="histoloop.v1.EmbeddingService",
        register=lambda server: embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(servicer, server),
    )
