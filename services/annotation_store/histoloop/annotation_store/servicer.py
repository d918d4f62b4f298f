"""gRPC servicer of ``histoloop.v1.AnnotationStoreService``: proto ↔ domain, nothing else.

Errors are :mod:`histoloop.errors` raised by the domain; the server interceptor maps them
to status codes. The caller is :func:`histoloop.auth.current_identity` (set by the
interceptor): annotators reach only the projects they are members of; creating projects
and registering annotators takes an admin; registering datasets (which reads server-side
paths) an admin or a service.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from histoloop.annotation_store.convert import (
    history_page_to_proto,
    history_query_from_proto,
    loop_settings_from_proto,
    loop_settings_to_proto,
    message_from_json,
    timestamp,
)
from histoloop.annotation_store.domain import (
    BatchResult,
    ClassSpec,
    ConfigChange,
    DatasetInfo,
    DatasetKind,
    DatasetSpec,
    ProjectInfo,
    QuerySetRecord,
    SpotLabelInput,
)
from histoloop.annotation_store.doors import check_feeds_features
from histoloop.annotation_store.exports import (
    export_geojson,
    export_png,
    geojson_labels,
    predictions_csv_as,
)
from histoloop.annotation_store.history import list_label_events
from histoloop.annotation_store.loupe import check_upload_size
from histoloop.annotation_store.recovery import Recovery, merge_config
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.annotation_store.unit_layer import unit_layer
from histoloop.annotation_store.watch import QuerySetHub
from histoloop.auth import Identity, Role, current_identity, require_project
from histoloop.errors import InvalidArgument, PermissionDenied
from histoloop.formats.legacy_st import spaceranger_folder
from histoloop.formats.positions import HIRES_IMAGE
from histoloop.stages import DeadLetter, StageRecord
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import annotation_store_pb2_grpc as pb_grpc
from histoloop.v1 import common_pb2

__all__ = ["AnnotationStoreServicer"]


_ROLE_FROM_PROTO: dict[int, Role | None] = {
    pb.ANNOTATOR_ROLE_UNSPECIFIED: None,
    pb.ANNOTATOR_ROLE_ANNOTATOR: "annotator",
    pb.ANNOTATOR_ROLE_EXPERT: "expert",
    pb.ANNOTATOR_ROLE_ADMIN: "admin",
    pb.ANNOTATOR_ROLE_SERVICE: "service",
}
_SOURCE_FROM_PROTO = {
    pb.LABEL_SOURCE_UNSPECIFIED: "grpc",
    pb.LABEL_SOURCE_GRPC: "grpc",
    pb.LABEL_SOURCE_LOUPE_CSV: "loupe_csv",
    pb.LABEL_SOURCE_CORRECTION: "correction",
}
_KIND_TO_PROTO = {"visium": common_pb2.DATASET_KIND_VISIUM, "wsi": common_pb2.DATASET_KIND_WSI}
_EXPORT_NAMES = {
    pb.EXPORT_KIND_UNSPECIFIED: "labels",
    pb.EXPORT_KIND_LABELS: "labels",
    pb.EXPORT_KIND_QUERY_SET: "queryset",
    pb.EXPORT_KIND_PREDICTIONS: "predictions",
}
_EXPORT_FORMATS = frozenset(
    {
        pb.EXPORT_FORMAT_UNSPECIFIED,
        pb.EXPORT_FORMAT_LOUPE_CSV,
        pb.EXPORT_FORMAT_GEOJSON,
        pb.EXPORT_FORMAT_PNG,
    }
)
_WAKE_SECONDS = 0.25
"""How often an idle WatchQuerySets stream checks for shutdown and a cancelled call."""
_REREAD_SECONDS = 2.0
"""How often an idle stream re-reads the database (query sets recorded by other replicas)."""


def _require_role(identity: Identity, roles: tuple[str, ...], action: str) -> None:
    if identity.role not in roles:
        raise PermissionDenied(
            f"{identity.subject} ({identity.role}) may not {action}; needs {' or '.join(roles)}"
        )


class AnnotationStoreServicer(pb_grpc.AnnotationStoreServiceServicer):
    """Every RPC of the annotation store."""

    def __init__(
        self,
        repo: AnnotationRepository,
        hub: QuerySetHub,
        stopping: threading.Event,
        *,
        on_annotators_changed: Callable[[], None] = lambda: None,
        recovery: Recovery | None = None,
    ) -> None:
        """Create the servicer.

        Args:
            repo: the domain operations.
            hub: wakes WatchQuerySets streams.
            stopping: set when the server shuts down (streams end).
            on_annotators_changed: called after RegisterAnnotator (clears the token cache).
            recovery: stage states and RetryStage (default: read-only, no bus to republish on).
        """
        self._repo = repo
        self._hub = hub
        self._stopping = stopping
        self._on_annotators_changed = on_annotators_changed
        self._recovery = recovery or Recovery(repo, None)

    # projects -----------------------------------------------------------------------------
    def CreateProject(
        self, request: pb.CreateProjectRequest, context: grpc.ServicerContext
    ) -> pb.Project:
        """Create a project (admin)."""
        _require_role(current_identity(), ("admin",), "create projects")
        info = self._repo.create_project(
            request.project_id,
            request.name,
            [ClassSpec(c.name, c.color) for c in request.classes],
            loop_settings_from_proto(request.config),
        )
        return _project(info)

    def GetProject(
        self, request: pb.GetProjectRequest, context: grpc.ServicerContext
    ) -> pb.Project:
        """A project (members)."""
        require_project(request.project_id)
        return _project(self._repo.get_project(request.project_id))

    def AddClasses(
        self, request: pb.AddClassesRequest, context: grpc.ServicerContext
    ) -> pb.Project:
        """Append classes to a project's schema (members)."""
        require_project(request.project_id)
        return _project(
            self._repo.add_classes(
                request.project_id, [ClassSpec(c.name, c.color) for c in request.classes]
            )
        )

    # datasets, annotators -----------------------------------------------------------------
    def RegisterDataset(
        self, request: pb.RegisterDatasetRequest, context: grpc.ServicerContext
    ) -> pb.Dataset:
        """Register a Visium sample or WSI (admin or service; reads server-side paths)."""
        identity = require_project(request.project_id)
        _require_role(identity, ("admin", "service"), "register datasets")
        kind: DatasetKind
        if request.kind == common_pb2.DATASET_KIND_VISIUM:
            kind = "visium"
        elif request.kind == common_pb2.DATASET_KIND_WSI:
            kind = "wsi"
        elif request.kind == common_pb2.DATASET_KIND_UNSPECIFIED:
            kind = "visium" if request.spatial_dir or not request.slide_path else "wsi"
        else:
            raise InvalidArgument(f"kind: unknown value {request.kind}")
        with spaceranger_folder(request.spatial_dir, request.positions_format) as spatial_dir:
            # Space Ranger's hires image serves as the slide when none is given (tiling uses it)
            hires = Path(spatial_dir) / HIRES_IMAGE if spatial_dir else None
            check_feeds_features(
                features=self._repo.get_project(request.project_id).config.features,
                kind=kind,
                expression_path=request.expression_path,
                slide_path=request.slide_path or (str(hires) if hires and hires.is_file() else ""),
            )
            info = self._repo.register_dataset(
                DatasetSpec(
                    project_id=request.project_id,
                    dataset_id=request.dataset_id,
                    kind=kind,
                    slide_path=request.slide_path,
                    spatial_dir=spatial_dir,
                    expression_path=request.expression_path,
                    slide_scale=request.slide_scale,
                    context=request.context,
                    mpp=request.mpp,
                    tile_size=request.tile_size,
                )
            )
        return _dataset(info)

    def RegisterAnnotator(
        self, request: pb.RegisterAnnotatorRequest, context: grpc.ServicerContext
    ) -> pb.RegisterAnnotatorResponse:
        """Create an annotator and issue a token (admin); the token is shown only here."""
        _require_role(current_identity(), ("admin",), "register annotators")
        if request.role not in _ROLE_FROM_PROTO:
            raise InvalidArgument(f"role: unknown value {request.role}")
        token = self._repo.register_annotator(
            request.annotator_id,
            display_name=request.display_name,
            role=_ROLE_FROM_PROTO[request.role],
            projects=list(request.projects),
        )
        self._on_annotators_changed()
        return pb.RegisterAnnotatorResponse(annotator_id=request.annotator_id, token=token)

    # labels -------------------------------------------------------------------------------
    def _labeller(self, identity: Identity, on_behalf: str) -> tuple[str, str, bool]:
        """(author, role if the author is new, whether to create the author's row)."""
        if not on_behalf or on_behalf == identity.subject:
            return identity.subject, identity.role, True
        _require_role(identity, ("admin", "service"), "submit labels for another annotator")
        return on_behalf, "annotator", False

    def SubmitLabels(
        self, request: pb.SubmitLabelsRequest, context: grpc.ServicerContext
    ) -> pb.SubmitLabelsResponse:
        """Commit a label batch (members); the same batch id again returns the first result."""
        identity = require_project(request.project_id)
        if request.source not in _SOURCE_FROM_PROTO:
            raise InvalidArgument(f"source: unknown value {request.source}")
        annotator, role, create = self._labeller(identity, request.annotator_id)
        result = self._repo.submit_labels(
            request.project_id,
            request.dataset_id,
            request.batch_id,
            [
                SpotLabelInput(barcode=x.barcode, label=x.label, row=f"labels[{i}]")
                for i, x in enumerate(request.labels)
            ],
            annotator=annotator,
            annotator_role=role,
            source=_SOURCE_FROM_PROTO[request.source],
            add_missing_classes=request.add_missing_classes,
            queryset_id=request.queryset_id,
            create_annotator=create,
        )
        return _batch(result)

    def _import_file(
        self,
        request: pb.ImportLoupeCsvRequest | pb.ImportGeoJsonRequest,
        data: bytes,
        field_name: str,
        commit: Callable[..., BatchResult],
    ) -> pb.SubmitLabelsResponse:
        """Check the caller and the upload, then commit the file's labels as one batch."""
        identity = require_project(request.project_id)
        check_upload_size(len(data), field=field_name)
        annotator, role, create = self._labeller(identity, request.annotator_id)
        result = commit(
            annotator=annotator,
            annotator_role=role,
            add_missing_classes=request.add_missing_classes,
            queryset_id=request.queryset_id,
            create_annotator=create,
        )
        return _batch(result)

    def ImportLoupeCsv(
        self, request: pb.ImportLoupeCsvRequest, context: grpc.ServicerContext
    ) -> pb.SubmitLabelsResponse:
        """Import a Loupe category CSV as one label batch (members)."""
        return self._import_file(
            request,
            request.csv,
            "csv",
            functools.partial(
                self._repo.import_loupe_csv,
                request.project_id,
                request.dataset_id,
                request.batch_id,
                request.csv,
            ),
        )

    def ExportLabels(
        self, request: pb.ExportLabelsRequest, context: grpc.ServicerContext
    ) -> pb.ExportLabelsResponse:
        """Consensus labels, the query set (``help``) or predictions as a Loupe CSV, QuPath
        GeoJSON or (query set) a PNG picture (members)."""
        require_project(request.project_id)
        kind = _EXPORT_NAMES.get(request.kind)
        if kind is None:
            raise InvalidArgument(f"kind: unknown value {request.kind}")
        if request.format not in _EXPORT_FORMATS:
            raise InvalidArgument(f"format: unknown value {request.format}")
        if request.annotator_id and kind != "predictions":
            raise InvalidArgument(
                f"annotator_id: only predictions are exported as an annotator, not {kind}"
            )
        if request.format in (pb.EXPORT_FORMAT_GEOJSON, pb.EXPORT_FORMAT_PNG):
            if request.format == pb.EXPORT_FORMAT_GEOJSON:
                exported = export_geojson(
                    self._repo,
                    request.project_id,
                    request.dataset_id,
                    kind,  # type: ignore[arg-type]
                    queryset_id=request.queryset_id,
                    annotator_id=request.annotator_id,
                )
            elif kind != "queryset":
                raise InvalidArgument(f"format: a PNG picture is of a query set, not of {kind}")
            else:
                exported = export_png(
                    self._repo,
                    request.project_id,
                    request.dataset_id,
                    queryset_id=request.queryset_id,
                )
            return pb.ExportLabelsResponse(
                n_rows=exported.n_rows,
                filename=f"{request.project_id}_{request.dataset_id}_{kind}.{exported.extension}",
                content=exported.content,
                media_type=exported.media_type,
            )
        if kind == "labels":
            data, n = self._repo.export_labels(
                request.project_id, request.dataset_id, group=request.group_name
            )
        elif kind == "queryset":
            data, n = self._repo.export_query_set(
                request.project_id,
                request.dataset_id,
                group=request.group_name,
                queryset_id=request.queryset_id,
            )
        elif request.annotator_id:
            data, n = predictions_csv_as(
                self._repo,
                request.project_id,
                request.dataset_id,
                request.annotator_id,
                group=request.group_name,
                queryset_id=request.queryset_id,
            )
        else:
            data, n = self._repo.export_predictions(
                request.project_id,
                request.dataset_id,
                group=request.group_name,
                queryset_id=request.queryset_id,
            )
        return pb.ExportLabelsResponse(
            csv=data,
            n_rows=n,
            filename=f"{request.project_id}_{request.dataset_id}_{kind}.csv",
            content=data,
            media_type="text/csv",
        )

    def ImportGeoJson(
        self, request: pb.ImportGeoJsonRequest, context: grpc.ServicerContext
    ) -> pb.SubmitLabelsResponse:
        """Import QuPath GeoJSON annotations as one label batch (members)."""

        def commit(**options: Any) -> BatchResult:
            parsed = geojson_labels(
                self._repo, request.project_id, request.dataset_id, request.geojson
            )
            return self._repo.submit_labels(
                request.project_id,
                request.dataset_id,
                request.batch_id,
                parsed.labels,
                source="geojson",
                n_placeholders=len(parsed.placeholders),
                **options,
            )

        return self._import_file(request, request.geojson, "geojson", commit)

    # listing -------------------------------------------------------------------------------
    def ListProjects(
        self, request: pb.ListProjectsRequest, context: grpc.ServicerContext
    ) -> pb.ListProjectsResponse:
        """The caller's projects (every project for admins and services)."""
        identity = current_identity()
        infos = self._repo.list_projects(identity.projects)
        return pb.ListProjectsResponse(projects=[_project(i) for i in infos])

    def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext
    ) -> pb.ListDatasetsResponse:
        """A project's datasets (members)."""
        require_project(request.project_id)
        infos = self._repo.list_datasets(request.project_id)
        return pb.ListDatasetsResponse(datasets=[_dataset(i) for i in infos])

    # query sets ----------------------------------------------------------------------------
    def GetQuerySet(
        self, request: pb.GetQuerySetRequest, context: grpc.ServicerContext
    ) -> pb.QuerySet:
        """A query set, or the latest (members)."""
        require_project(request.project_id)
        return _query_set(self._repo.get_query_set(request.project_id, request.queryset_id))

    def ListQuerySets(
        self, request: pb.ListQuerySetsRequest, context: grpc.ServicerContext
    ) -> pb.ListQuerySetsResponse:
        """Every query set of a project, oldest first (members)."""
        require_project(request.project_id)
        records = self._repo.list_query_sets(request.project_id)
        return pb.ListQuerySetsResponse(query_sets=[_query_set(r) for _seq, r in records])

    def WatchQuerySets(
        self, request: pb.WatchQuerySetsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.QuerySet]:
        """Stream each new query set of a project as it arrives; ends when the server stops."""
        project_id = request.project_id
        require_project(project_id)
        self._repo.get_project(project_id)  # NotFound before the stream starts
        seen_hub = self._hub.seq
        known = self._repo.list_query_sets(project_id)
        last = known[-1][0] if known else 0
        if request.include_latest and known:
            yield _query_set(known[-1][1])
        idle = 0.0
        while not self._stopping.is_set() and not self._hub.closed and context.is_active():
            now_hub = self._hub.wait(seen_hub, _WAKE_SECONDS)
            idle += _WAKE_SECONDS
            if now_hub == seen_hub and idle < _REREAD_SECONDS:
                continue
            seen_hub, idle = now_hub, 0.0
            for seq, record in self._repo.list_query_sets(project_id, after=last):
                last = seq
                yield _query_set(record)

    # status, agreement ----------------------------------------------------------------------
    def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.ServicerContext
    ) -> pb.ProjectStatus:
        """Round, labels per class, latest model metrics, stopping signal, pending events (members)."""
        require_project(request.project_id)
        st = self._repo.status(request.project_id)
        reply = pb.ProjectStatus(
            project_id=st.project_id,
            round=st.round,
            labelled_per_class=dict(st.labelled_per_class),
            n_labelled=st.n_labelled,
            n_spots=st.n_spots,
            label_version=st.label_version,
            latest_model_version=st.latest_model_version,
            n_disputed=st.n_disputed,
            pending_events=st.pending_events,
            notice=st.notice,
        )
        message_from_json(st.latest_metrics, reply.latest_metrics)
        message_from_json(st.stopping, reply.stopping)
        reply.stages.extend(_stage_state(r) for r in self._recovery.stages(request.project_id))
        parked = self._recovery.parked(request.project_id)
        reply.n_parked = len(parked)
        reply.parked.extend(_parked_event(d) for d in parked)
        reply.config_history.extend(
            _config_change(c) for c in self._repo.config_history(request.project_id)
        )
        return reply

    # recovery --------------------------------------------------------------------------------
    def UpdateProject(
        self, request: pb.UpdateProjectRequest, context: grpc.ServicerContext
    ) -> pb.Project:
        """Change a project's loop config (admin); the next round uses it, the history keeps it."""
        identity = require_project(request.project_id)
        _require_role(identity, ("admin",), "change a project's loop config")
        current = self._repo.get_project(request.project_id).config
        config = merge_config(current, request.config, list(request.reset_fields))
        return _project(
            self._repo.update_project(
                request.project_id, config, changed_by=identity.subject, reason=request.reason
            )
        )

    def RetryStage(
        self, request: pb.RetryStageRequest, context: grpc.ServicerContext
    ) -> pb.RetryStageResponse:
        """Republish a stage's parked events once their cause is fixed (admin or service)."""
        identity = require_project(request.project_id)
        _require_role(identity, ("admin", "service"), "retry a stage")
        ids = self._recovery.retry(request.project_id, request.stage, request.dataset_id)
        return pb.RetryStageResponse(event_ids=ids, n_retried=len(ids))

    def RemoveDataset(
        self, request: pb.RemoveDatasetRequest, context: grpc.ServicerContext
    ) -> pb.Dataset:
        """Take a dataset out of the pool (admin); its labels stay in the history."""
        identity = require_project(request.project_id)
        _require_role(identity, ("admin",), "remove datasets")
        return _dataset(
            self._repo.remove_dataset(
                request.project_id,
                request.dataset_id,
                removed_by=identity.subject,
                reason=request.reason,
            )
        )

    def GetAgreement(
        self, request: pb.GetAgreementRequest, context: grpc.ServicerContext
    ) -> pb.Agreement:
        """Cohen's kappa per annotator pair, Fleiss' kappa, disputed spots (members)."""
        require_project(request.project_id)
        report = self._repo.agreement(request.project_id, request.dataset_id)
        return pb.Agreement(
            fleiss_kappa=report.fleiss_kappa,
            cohen=[
                pb.PairwiseKappa(
                    annotator_a=p.annotator_a,
                    annotator_b=p.annotator_b,
                    kappa=p.kappa,
                    n_common=p.n_common,
                )
                for p in report.cohen
            ],
            n_spots_multi_rated=report.n_spots_multi_rated,
            n_disputed=report.n_disputed,
            disputed_barcodes=list(report.disputed),
            annotator_reliability=dict(report.reliability),
            rater_confusion=[
                pb.RaterConfusion(
                    annotator_id=r.annotator,
                    counts=r.counts.ravel().tolist(),
                    n_spots=r.n_spots,
                    agreement=r.agreement,
                )
                for r in report.rater_confusion
            ],
            confusion_classes=list(report.confusion_classes),
        )

    def ListLabelEvents(
        self, request: pb.ListLabelEventsRequest, context: grpc.ServicerContext
    ) -> pb.ListLabelEventsResponse:
        """The label history, oldest first, filtered and paged (members)."""
        require_project(request.project_id)
        page = list_label_events(self._repo.db, history_query_from_proto(request))
        return history_page_to_proto(page)

    def GetUnitLayer(
        self, request: pb.GetUnitLayerRequest, context: grpc.ServicerContext
    ) -> pb.UnitLayer:
        """Every unit of a dataset as columns, for the browser overlay (members)."""
        identity = require_project(request.project_id)
        layer = unit_layer(
            self._repo,
            request.project_id,
            request.dataset_id,
            caller=identity.subject,
            header_only=request.header_only,
        )
        return pb.UnitLayer(
            project_id=layer.project_id,
            dataset_id=layer.dataset_id,
            kind=_KIND_TO_PROTO[layer.kind],
            slide_uri=layer.slide_uri,
            spatial_uri_prefix=layer.spatial_uri_prefix,
            slide_scale=layer.slide_scale,
            coordinates=layer.coordinates,
            classes=layer.classes,
            class_colors=layer.class_colors,
            unit_ids=layer.unit_ids,
            x=layer.x.tolist(),
            y=layer.y.tolist(),
            size=layer.size.tolist(),
            in_tissue=layer.in_tissue.tolist(),
            consensus=layer.consensus.tolist(),
            mine=layer.mine.tolist(),
            predicted=layer.predicted.tolist(),
            uncertainty=layer.uncertainty.tolist(),
            disputed=layer.disputed.tolist(),
            query_rank=layer.query_rank.tolist(),
            queryset_id=layer.queryset_id,
            round=layer.round,
            model_version=layer.model_version,
            caller=layer.caller,
            votes=[pb.UnitVote(unit=i, annotator_id=a, label=c) for i, a, c in layer.votes],
        )


def _project(info: ProjectInfo) -> pb.Project:
    return pb.Project(
        project_id=info.project_id,
        name=info.name,
        classes=[common_pb2.ClassDef(name=c.name, color=c.color) for c in info.classes],
        config=loop_settings_to_proto(info.config),
        created_at=timestamp(info.created_at),
        datasets=list(info.datasets),
        label_version=info.label_version,
    )


def _dataset(info: DatasetInfo) -> pb.Dataset:
    return pb.Dataset(
        project_id=info.project_id,
        dataset_id=info.dataset_id,
        kind=_KIND_TO_PROTO[info.kind],
        n_spots=info.n_spots,
        n_in_tissue=info.n_in_tissue,
        slide_uri=info.slide_uri,
        registered_at=timestamp(info.registered_at),
        spatial_uri_prefix=info.spatial_uri_prefix,
        expression_uri=info.expression_uri,
        embeddings_uri=info.embeddings_uri,
        removed_at=timestamp(info.removed_at) if info.removed_at is not None else None,
        removed_by=info.removed_by,
        embedding_model=info.embedding_model,
        embedding_model_version=info.embedding_model_version,
        embedding_dim=info.embedding_dim,
    )


_STAGE_STATUS = {
    "pending": common_pb2.STAGE_STATUS_PENDING,
    "running": common_pb2.STAGE_STATUS_RUNNING,
    "done": common_pb2.STAGE_STATUS_DONE,
    "failed": common_pb2.STAGE_STATUS_FAILED,
    "parked": common_pb2.STAGE_STATUS_PARKED,
}


def _ms_timestamp(ms: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def _stage_state(record: StageRecord) -> common_pb2.StageState:
    return common_pb2.StageState(
        stage=record.stage,
        dataset=record.dataset,
        status=_STAGE_STATUS.get(record.state, common_pb2.STAGE_STATUS_UNSPECIFIED),
        progress=record.progress,
        last_error=record.error,
        updated_at=_ms_timestamp(record.at_ms),
        event_id=record.event_id,
        attempts=record.attempts,
        topic=record.topic,
    )


def _parked_event(letter: DeadLetter) -> pb.ParkedEvent:
    return pb.ParkedEvent(
        stage=letter.stage,
        event_id=letter.event_id,
        topic=letter.topic,
        error=letter.error,
        attempts=letter.attempts,
        parked_at=_ms_timestamp(letter.at_ms),
        dataset=letter.dataset,
    )


def _config_change(change: ConfigChange) -> pb.ConfigChange:
    return pb.ConfigChange(
        before=loop_settings_to_proto(change.before),
        after=loop_settings_to_proto(change.after),
        changed_by=change.changed_by,
        changed_at=timestamp(change.changed_at),
        reason=change.reason,
        from_label_version=change.from_label_version,
    )


def _batch(result: BatchResult) -> pb.SubmitLabelsResponse:
    return pb.SubmitLabelsResponse(
        batch_id=result.batch_id,
        n_labels=result.n_labels,
        label_version=result.label_version,
        duplicate=result.duplicate,
        event_id=result.event_id,
        n_placeholders=result.n_placeholders,
        n_empty=result.n_empty,
    )


def _query_set(record: QuerySetRecord) -> pb.QuerySet:
    reply = pb.QuerySet(
        queryset_id=record.queryset_id,
        project_id=record.project_id,
        round=record.round,
        strategy=record.strategy,
        model_version=record.model_version,
        spots=[
            common_pb2.ScoredSpot(
                barcode=s.barcode, score=s.score, dataset=s.dataset, reason=s.reason
            )
            for s in record.spots
        ],
        created_at=timestamp(record.created_at),
    )
    message_from_json(record.metrics, reply.metrics)
    message_from_json(record.stopping, reply.stopping)
    return reply
