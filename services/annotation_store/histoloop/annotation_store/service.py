"""The annotation store as the server scaffold runs it: ``build(runtime) -> ServiceParts``.

At build the database is migrated to the latest revision (start-up step), then the parts
are wired: the servicer, the ``queryset.ready`` and ``embeddings.ready`` handlers, the
database and relay health checks, the outbox relay as a background loop, and
``token_resolver`` (annotator bearer tokens) which :class:`histoloop.server.Server` adds
to its auth interceptor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message

from histoloop import events
from histoloop.annotation_store.access import AnnotatorTokenResolver
from histoloop.annotation_store.convert import query_set_from_event
from histoloop.annotation_store.db import Database, migrate
from histoloop.annotation_store.outbox import OutboxRelay
from histoloop.annotation_store.recovery import Recovery
from histoloop.annotation_store.repository import AnnotationRepository, PredictionsLoader
from histoloop.annotation_store.servicer import AnnotationStoreServicer
from histoloop.annotation_store.units import parse_tile_index
from histoloop.annotation_store.watch import QuerySetHub
from histoloop.artifacts.base import ArtifactStore
from histoloop.auth import TokenResolver
from histoloop.bus.base import Record
from histoloop.runtime import Runtime, ServiceParts
from histoloop.v1 import annotation_store_pb2_grpc, events_pb2

__all__ = [
    "GRPC_SERVICE",
    "NAME",
    "AnnotationStoreParts",
    "EventHandlers",
    "build",
    "predictions_from_artifacts",
]

log = logging.getLogger(__name__)

NAME = "annotation_store"
GRPC_SERVICE = "histoloop.v1.AnnotationStoreService"


@dataclass
class AnnotationStoreParts(ServiceParts):
    """:class:`ServiceParts` plus what the scaffold and tests may use beyond it."""

    token_resolver: TokenResolver | None = None
    """Annotator tokens → identities; the scaffold adds it to its auth interceptor."""
    repository: AnnotationRepository | None = None
    relay: OutboxRelay | None = None


class EventHandlers:
    """The store's event handlers (idempotent: both dedupe on the event id)."""

    def __init__(self, repo: AnnotationRepository, hub: QuerySetHub) -> None:
        self._repo = repo
        self._hub = hub

    def on_queryset_ready(self, message: Message, record: Record) -> None:
        """Record the query set and its round, then wake WatchQuerySets streams."""
        assert isinstance(message, events_pb2.QuerySetReady)
        query_set = query_set_from_event(message)
        if self._repo.record_query_set(
            query_set, event_id=message.meta.event_id or record.event_id
        ):
            log.info(
                "recorded query set %s (round %d) of project %s",
                query_set.queryset_id,
                query_set.round,
                query_set.project_id,
            )
            self._hub.notify(query_set.project_id)

    def on_tiles_ready(self, message: Message, record: Record) -> None:
        """A WSI dataset's tissue tiles become its labelled units (the tiling grid is the truth)."""
        assert isinstance(message, events_pb2.TilesReady)
        meta = message.meta
        if not message.index_uri or message.spots_uri:  # Visium: units come from the positions
            return
        store = self._repo.artifacts
        data = store.get(store.key_from_uri(message.index_uri))
        tiles = parse_tile_index(data, source=message.index_uri)
        self._repo.add_tiles(meta.project, meta.dataset, tiles, source=message.index_uri)

    def on_embeddings_ready(self, message: Message, record: Record) -> None:
        """Remember the dataset's latest embeddings URI (carried by ``labels.committed``)."""
        assert isinstance(message, events_pb2.EmbeddingsReady)
        meta = message.meta
        if not self._repo.set_embeddings(
            meta.project,
            meta.dataset,
            message.embeddings_uri,
            meta.event_id or record.event_id,
            model=message.model_name,
            model_version=message.model_version,
            dim=message.dim,
        ):
            log.info(
                "embeddings event %s for %s/%s: unknown dataset or seen before",
                record.event_id,
                meta.project,
                meta.dataset,
            )


def predictions_from_artifacts(store: ArtifactStore) -> PredictionsLoader:
    """Reads the predicted class of each spot of a dataset from a predictions artifact.

    The artifact is the prediction service's ``.npz``
    (:func:`histoloop.datasets.read_predictions`).
    """

    def load(uri: str, dataset_id: str) -> dict[str, str]:
        # numpy/anndata: only when exporting
        from histoloop.datasets import predicted_classes, read_predictions

        return predicted_classes(read_predictions(store, uri), dataset_id)

    return load


def build(
    runtime: Runtime, *, predictions_loader: PredictionsLoader | None = None
) -> AnnotationStoreParts:
    """Migrate the database and wire the annotation store.

    Args:
        runtime: settings (``sqlalchemy_url``), bus, artifact store, the stopping flag.
        predictions_loader: reads a predictions artifact for the predictions export
            (``(uri, dataset) → barcode → class``); default: the prediction service's
            ``.npz`` from the artifact store (:func:`predictions_from_artifacts`).

    Raises:
        Unavailable: the database cannot be reached.
        ConfigError: the database URL is unusable.
    """
    url = runtime.settings.sqlalchemy_url
    migrate(url)
    db = Database(url)
    hub = QuerySetHub()
    loader = predictions_loader or predictions_from_artifacts(runtime.store)
    repo = AnnotationRepository(db, runtime.store, predictions_loader=loader)
    relay = OutboxRelay(repo, runtime.bus, runtime.store)
    repo.on_commit = relay.notify  # a commit with an outbox row wakes the relay at once
    resolver = AnnotatorTokenResolver(repo)
    servicer = AnnotationStoreServicer(
        repo,
        hub,
        runtime.stopping,
        on_annotators_changed=resolver.clear,
        recovery=Recovery(repo, runtime.bus),
    )
    handlers = EventHandlers(repo, hub)

    def register(server: grpc.Server) -> None:
        annotation_store_pb2_grpc.add_AnnotationStoreServiceServicer_to_server(servicer, server)

    def close() -> None:
        hub.close()
        db.close()

    return AnnotationStoreParts(
        name=NAME,
        grpc_service=GRPC_SERVICE,
        register=register,
        handlers={
            events.QUERYSET_READY: handlers.on_queryset_ready,
            events.EMBEDDINGS_READY: handlers.on_embeddings_ready,
            events.TILES_READY: handlers.on_tiles_ready,
        },
        checks=[db.ping, relay.check],
        background=[relay],
        close=close,
        token_resolver=resolver,
        repository=repo,
        relay=relay,
    )
