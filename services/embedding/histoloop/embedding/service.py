"""Wiring of the embedding service: servicer, event handler, Triton health."""

from __future__ import annotations

import grpc
import numpy as np

from histoloop import events
from histoloop.auth import require_project
from histoloop.embedding.step import EmbeddingStep
from histoloop.errors import InvalidArgument
from histoloop.runtime import Runtime, ServiceParts
from histoloop.v1 import embedding_pb2, embedding_pb2_grpc

__all__ = ["EmbeddingServicer", "build"]

_MAX_PATCH_BYTES = 48 * 1024 * 1024


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    """Thin proto ↔ domain layer."""

    def __init__(self, step: EmbeddingStep) -> None:
        self.step = step

    def Embed(
        self, request: embedding_pb2.EmbedRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.EmbedResponse:
        n, h, w = request.n, request.height, request.width
        if not (n and h and w):
            raise InvalidArgument("n, height and width must be positive")
        if len(request.patches) != n * h * w * 3 or len(request.patches) > _MAX_PATCH_BYTES:
            raise InvalidArgument(
                f"patches: expected n×height×width×3 = {n * h * w * 3} bytes (at most {_MAX_PATCH_BYTES}), "
                f"got {len(request.patches)}"
            )
        patches = np.frombuffer(request.patches, dtype=np.uint8).reshape(n, h, w, 3)
        embedder = self.step.embedder
        vectors = embedder.embed(patches)
        return embedding_pb2.EmbedResponse(
            vectors=vectors.ravel().tolist(),
            n=n,
            dim=int(vectors.shape[1]),
            model_name=embedder.name,
            model_version=str(embedder.version),
        )

    def EmbedDataset(
        self, request: embedding_pb2.EmbedDatasetRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.EmbedDatasetResponse:
        if not request.project_id or not request.dataset_id:
            raise InvalidArgument("project_id and dataset_id are required")
        require_project(request.project_id)
        uri, n_spots, dim = self.step.latest_embeddings(request.project_id, request.dataset_id)
        return embedding_pb2.EmbedDatasetResponse(embeddings_uri=uri, n_spots=n_spots, dim=dim)

    def GetEmbeddingStatus(
        self, request: embedding_pb2.GetEmbeddingStatusRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.EmbeddingStatus:
        if not request.project_id or not request.dataset_id:
            raise InvalidArgument("project_id and dataset_id are required")
        require_project(request.project_id)
        progress, done, error = self.step.progress.get(request.project_id, request.dataset_id)
        return embedding_pb2.EmbeddingStatus(
            progress=progress, done=done, error=error, embedder=self.step.settings.embedder_backend
        )


def build(runtime: Runtime) -> ServiceParts:
    """The embedding service's parts."""
    step = EmbeddingStep(runtime.store, runtime.bus, runtime.settings)
    servicer = EmbeddingServicer(step)
    return ServiceParts(
        name="embedding",
        grpc_service="histoloop.v1.EmbeddingService",
        register=lambda server: embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(
            servicer, server
        ),
        handlers={events.TILES_READY: step.on_tiles},
        checks=[step.ping],
        close=step.close,
    )
