"""Wiring of the training service: servicer, event handler, model registry RPCs."""

from __future__ import annotations

import grpc

from histoloop import events
from histoloop.auth import require_project
from histoloop.errors import InvalidArgument
from histoloop.models import ModelCard, latest_card, list_cards
from histoloop.runtime import Runtime, ServiceParts
from histoloop.training.heads import HEADS
from histoloop.training.step import TrainingStep, metrics_proto
from histoloop.v1 import training_pb2, training_pb2_grpc

__all__ = ["TrainingServicer", "build"]


def _info(uri: str, card: ModelCard) -> training_pb2.ModelInfo:
    return training_pb2.ModelInfo(
        project_id=card.project,
        model_version=card.version,
        model_uri=uri,
        head=card.head,
        seed=card.seed,
        label_version=card.label_version,
        label_batch_ids=list(card.label_batch_ids),
        embeddings_uris=list(card.embeddings_uris),
        hyperparameters=dict(card.hyperparameters),
        metrics=metrics_proto(card),
        classes=list(card.classes),
        raters=list(card.raters),
    )


def _project(project_id: str) -> str:
    if not project_id:
        raise InvalidArgument("project_id is required")
    require_project(project_id)
    return project_id


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """Thin proto ↔ domain layer."""

    def __init__(self, step: TrainingStep) -> None:
        self.step = step

    def Train(
        self, request: training_pb2.TrainRequest, context: grpc.ServicerContext
    ) -> training_pb2.TrainResponse:
        project = _project(request.project_id)
        if request.head and request.head not in HEADS:
            raise InvalidArgument(f"head {request.head!r} is not one of {', '.join(sorted(HEADS))}")
        return training_pb2.TrainResponse(
            model=_info(*self.step.retrain(project, head=request.head, seed=request.seed or None))
        )

    def GetModel(
        self, request: training_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> training_pb2.ModelInfo:
        return _info(
            *latest_card(self.step.store, _project(request.project_id), request.model_version)
        )

    def ListModels(
        self, request: training_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> training_pb2.ListModelsResponse:
        cards = list_cards(self.step.store, _project(request.project_id))
        return training_pb2.ListModelsResponse(models=[_info(uri, card) for uri, card in cards])


def build(runtime: Runtime) -> ServiceParts:
    """The training service's parts."""
    step = TrainingStep(runtime.store, runtime.bus)
    servicer = TrainingServicer(step)
    return ServiceParts(
        name="training",
        grpc_service="histoloop.v1.TrainingService",
        register=lambda server: training_pb2_grpc.add_TrainingServiceServicer_to_server(
            servicer, server
        ),
        handlers={events.LABELS_COMMITTED: step.on_labels},
        coalesce=[events.LABELS_COMMITTED],
    )
