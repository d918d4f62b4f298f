"""Wiring of the tiling service: servicer, event handler."""

from __future__ import annotations

import grpc

from histoloop import events
from histoloop.auth import require_project
from histoloop.errors import InvalidArgument
from histoloop.runtime import Runtime, ServiceParts
from histoloop.tiling.step import TilingStep
from histoloop.v1 import tiling_pb2, tiling_pb2_grpc

__all__ = ["TilingServicer", "build"]


def _ids(
    request: tiling_pb2.TileDatasetRequest | tiling_pb2.GetTilingStatusRequest,
) -> tuple[str, str]:
    if not request.project_id or not request.dataset_id:
        raise InvalidArgument("project_id and dataset_id are required")
    require_project(request.project_id)
    return request.project_id, request.dataset_id


class TilingServicer(tiling_pb2_grpc.TilingServiceServicer):
    """Thin proto ↔ domain layer."""

    def __init__(self, step: TilingStep) -> None:
        self.step = step

    def TileDataset(
        self, request: tiling_pb2.TileDatasetRequest, context: grpc.ServicerContext
    ) -> tiling_pb2.TileDatasetResponse:
        result = self.step.retile(*_ids(request))
        return tiling_pb2.TileDatasetResponse(
            patches_uri=result["patches_uri"],
            index_uri=result["index_uri"],
            overlay_uri=result["overlay_uri"],
            n_tiles=int(result["n_tiles"]),
        )

    def GetTilingStatus(
        self, request: tiling_pb2.GetTilingStatusRequest, context: grpc.ServicerContext
    ) -> tiling_pb2.TilingStatus:
        progress, done, error = self.step.progress.get(*_ids(request))
        return tiling_pb2.TilingStatus(progress=progress, done=done, error=error)


def build(runtime: Runtime) -> ServiceParts:
    """The tiling service's parts."""
    step = TilingStep(runtime.store, runtime.bus)
    servicer = TilingServicer(step)
    return ServiceParts(
        name="tiling",
        grpc_service="histoloop.v1.TilingService",
        register=lambda server: tiling_pb2_grpc.add_TilingServiceServicer_to_server(
            servicer, server
        ),
        handlers={events.DATASET_REGISTERED: step.on_registered},
    )
