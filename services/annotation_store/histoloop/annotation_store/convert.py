"""Conversions between protobuf messages (API and events) and the store's domain types."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from histoloop.annotation_store.domain import LoopSettings, QuerySetRecord, QuerySpot
from histoloop.annotation_store.history import LabelHistoryPage, LabelHistoryQuery
from histoloop.errors import InvalidArgument
from histoloop.v1 import annotation_store_pb2, common_pb2, events_pb2

__all__ = [
    "FEATURES_FROM_PROTO",
    "FEATURES_TO_PROTO",
    "history_page_to_proto",
    "history_query_from_proto",
    "loop_settings_from_proto",
    "loop_settings_to_proto",
    "message_from_json",
    "message_to_json",
    "query_set_from_event",
    "timestamp",
]

FEATURES_TO_PROTO = {
    "morphology": common_pb2.FEATURE_SET_MORPHOLOGY,
    "expression": common_pb2.FEATURE_SET_EXPRESSION,
    "multimodal": common_pb2.FEATURE_SET_MULTIMODAL,
}
FEATURES_FROM_PROTO = {v: k for k, v in FEATURES_TO_PROTO.items()}


def loop_settings_from_proto(config: common_pb2.LoopConfig) -> LoopSettings:
    """Validated settings from a ``LoopConfig``; unset (zero) fields take the defaults."""
    if config.features not in (common_pb2.FEATURE_SET_UNSPECIFIED, *FEATURES_FROM_PROTO):
        raise InvalidArgument(f"config.features: unknown value {config.features}")
    return LoopSettings.with_defaults(
        strategy=config.strategy,
        cold_start_strategy=config.cold_start_strategy,
        query_size=config.query_size,
        seed=config.seed,
        head=config.head,
        features=FEATURES_FROM_PROTO.get(config.features, ""),
        spatial_neighbours=config.spatial_neighbours
        if config.HasField("spatial_neighbours")
        else None,
        resampling=config.resampling,
        consensus=config.consensus,
        adjudication_share=config.adjudication_share,
        compactness=config.compactness,
        smoothing=config.smoothing,
        hybrid_share=config.hybrid_share,
        kmeans_pick=config.kmeans_pick,
        mc_dropout_samples=config.mc_dropout_samples,
        stop_max_change=config.stop_max_change,
        stop_min_kappa=config.stop_min_kappa,
        stop_patience=config.stop_patience,
        stop_max_uncertainty=config.stop_max_uncertainty,
        resampling_every=config.resampling_every,
        harmony=config.harmony,
        preset=config.preset,
        semi_supervised=config.semi_supervised,
        augment_views=config.augment_views if config.HasField("augment_views") else None,
    )


def loop_settings_to_proto(settings: LoopSettings) -> common_pb2.LoopConfig:
    """The ``LoopConfig`` events and replies carry."""
    return common_pb2.LoopConfig(
        strategy=settings.strategy,
        cold_start_strategy=settings.cold_start_strategy,
        query_size=settings.query_size,
        seed=settings.seed,
        head=settings.head,
        features=FEATURES_TO_PROTO[settings.features],
        spatial_neighbours=settings.spatial_neighbours,
        resampling=settings.resampling,
        consensus=settings.consensus,
        adjudication_share=settings.adjudication_share,
        compactness=settings.compactness,
        smoothing=settings.smoothing,
        hybrid_share=settings.hybrid_share,
        kmeans_pick=settings.kmeans_pick,
        mc_dropout_samples=settings.mc_dropout_samples,
        stop_max_change=settings.stop_max_change,
        stop_min_kappa=settings.stop_min_kappa,
        stop_patience=settings.stop_patience,
        stop_max_uncertainty=settings.stop_max_uncertainty,
        resampling_every=settings.resampling_every,
        harmony=settings.harmony,
        preset=settings.preset,
        semi_supervised=settings.semi_supervised,
        augment_views=settings.augment_views,
    )


def message_to_json(message: Message) -> dict[str, object]:
    """A message as a JSON object with proto field names (for JSON columns)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def message_from_json(data: Mapping[str, object], message: Message) -> Message:
    """Fill ``message`` from :func:`message_to_json` output (unknown keys ignored)."""
    json_format.ParseDict(dict(data), message, ignore_unknown_fields=True)
    return message


def timestamp(value: datetime | None) -> Timestamp:
    """A protobuf timestamp (unset for None)."""
    ts = Timestamp()
    if value is not None:
        ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


def query_set_from_event(event: events_pb2.QuerySetReady) -> QuerySetRecord:
    """The query set a ``queryset.ready`` event announces."""
    created = (
        event.meta.created_at.ToDatetime(tzinfo=UTC) if event.meta.HasField("created_at") else None
    )
    return QuerySetRecord(
        queryset_id=event.queryset_id or event.meta.event_id,
        project_id=event.meta.project,
        round=event.round,
        strategy=event.strategy,
        model_version=event.model_version,
        spots=tuple(
            QuerySpot(
                barcode=s.barcode,
                score=s.score,
                dataset=s.dataset or event.meta.dataset,
                reason=s.reason,
            )
            for s in event.spots
        ),
        label_version=event.label_version,
        queryset_uri=event.queryset_uri,
        predictions_uri=event.predictions_uri,
        metrics=message_to_json(event.metrics),
        stopping=message_to_json(event.stopping),
        created_at=created,
    )


_ROLES_TO_PROTO = {
    "annotator": annotation_store_pb2.ANNOTATOR_ROLE_ANNOTATOR,
    "expert": annotation_store_pb2.ANNOTATOR_ROLE_EXPERT,
    "admin": annotation_store_pb2.ANNOTATOR_ROLE_ADMIN,
    "service": annotation_store_pb2.ANNOTATOR_ROLE_SERVICE,
}
_SOURCES_TO_PROTO = {
    "grpc": annotation_store_pb2.LABEL_SOURCE_GRPC,
    "loupe_csv": annotation_store_pb2.LABEL_SOURCE_LOUPE_CSV,
    "correction": annotation_store_pb2.LABEL_SOURCE_CORRECTION,
}


def history_query_from_proto(
    request: annotation_store_pb2.ListLabelEventsRequest,
) -> LabelHistoryQuery:
    """The label-history query a ``ListLabelEvents`` request asks for."""
    return LabelHistoryQuery(
        project_id=request.project_id,
        dataset_id=request.dataset_id,
        barcode=request.barcode,
        annotator_id=request.annotator_id,
        since=request.since.ToDatetime(tzinfo=UTC) if request.HasField("since") else None,
        until=request.until.ToDatetime(tzinfo=UTC) if request.HasField("until") else None,
        batch_id=request.batch_id,
        page_size=request.page_size,
        page_token=request.page_token,
    )


def history_page_to_proto(page: LabelHistoryPage) -> annotation_store_pb2.ListLabelEventsResponse:
    """The ``ListLabelEvents`` reply for a page of the label history."""
    return annotation_store_pb2.ListLabelEventsResponse(
        events=[
            annotation_store_pb2.LabelHistoryEntry(
                sequence=e.sequence,
                dataset_id=e.dataset_id,
                barcode=e.barcode,
                label=e.label,
                annotator_id=e.annotator_id,
                annotator_role=_ROLES_TO_PROTO.get(
                    e.annotator_role, annotation_store_pb2.ANNOTATOR_ROLE_UNSPECIFIED
                ),
                source=_SOURCES_TO_PROTO.get(
                    e.source, annotation_store_pb2.LABEL_SOURCE_UNSPECIFIED
                ),
                batch_id=e.batch_id,
                label_version=e.label_version,
                created_at=timestamp(e.created_at),
                queryset_id=e.queryset_id,
            )
            for e in page.entries
        ],
        next_page_token=page.next_page_token,
    )
