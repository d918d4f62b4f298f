"""Wiring of the acquisition service: servicer, event handlers, health checks."""

from __future__ import annotations

import grpc

from histoloop import events
from histoloop.acquisition.step import AcquisitionStep, check_query_args
from histoloop.acquisition.strategies import list_strategies
from histoloop.auth import require_project
from histoloop.runtime import Runtime, ServiceParts
from histoloop.v1 import acquisition_pb2, acquisition_pb2_grpc, common_pb2

__all__ = ["AcquisitionServicer", "build"]


class AcquisitionServicer(acquisition_pb2_grpc.AcquisitionServiceServicer):
    """Thin proto ↔ domain layer."""

    def __init__(self, acquisition: AcquisitionStep) -> None:
        self.acquisition = acquisition

    def ListStrategies(
        self, request: acquisition_pb2.ListStrategiesRequest, context: grpc.ServicerContext
    ) -> acquisition_pb2.ListStrategiesResponse:
        return acquisition_pb2.ListStrategiesResponse(
            strategies=[
                acquisition_pb2.StrategyInfo(
                    name=s.name, description=s.description, needs_model=s.needs_model
                )
                for s in list_strategies()
            ]
        )

    def Query(
        self, request: acquisition_pb2.QueryRequest, context: grpc.ServicerContext
    ) -> acquisition_pb2.QueryResponse:
        """A what-if query set on the latest predictions (not announced, not recorded)."""
        check_query_args(request.project_id, request.query_size)
        require_project(request.project_id)
        record = self.acquisition.what_if(
            request.project_id,
            strategy=request.strategy,
            query_size=request.query_size,
            seed=request.seed or None,
        )
        return acquisition_pb2.QueryResponse(
            queryset_id=record.queryset_id,
            strategy=record.strategy,
            spots=[common_pb2.ScoredSpot(**s) for s in record.spots],
        )


def build(runtime: Runtime) -> ServiceParts:
    """The acquisition service's parts."""
    acquisition = AcquisitionStep(runtime.store, runtime.bus)
    servicer = AcquisitionServicer(acquisition)
    return ServiceParts(
        name="acquisition",
        grpc_service="histoloop.v1.AcquisitionService",
        register=lambda server: acquisition_pb2_grpc.add_AcquisitionServiceServicer_to_server(
            servicer, server
        ),
        handlers={
            events.EMBEDDINGS_READY: acquisition.on_embeddings,
            events.LABELS_COMMITTED: acquisition.on_labels,
            events.PREDICTIONS_READY: acquisition.on_predictions,
        },
        coalesce=[events.LABELS_COMMITTED, events.PREDICTIONS_READY],
    )
