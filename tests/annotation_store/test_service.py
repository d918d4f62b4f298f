"""``build(runtime)``: migrations at start-up, the parts the scaffold runs, the handlers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from histoloop import events
from histoloop.annotation_store.db import current_revision, head_revision
from histoloop.annotation_store.domain import ClassSpec, DatasetSpec, LoopSettings
from histoloop.annotation_store.service import AnnotationStoreParts, build
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.base import Record
from histoloop.bus.embedded import EmbeddedBus
from histoloop.config import Settings
from histoloop.runtime import Runtime
from histoloop.v1 import events_pb2


def test_build_migrates_an_empty_database_and_wires_the_parts(
    new_database: Callable[..., str], tmp_path: Path, small_spatial: Path
) -> None:
    url = new_database(migrated=False)
    bus = EmbeddedBus(tmp_path / "events.sqlite")
    runtime = Runtime(
        settings=Settings(data_dir=tmp_path, database_url=url),
        bus=bus,
        store=LocalArtifactStore(tmp_path / "artifacts"),
    )
    parts = build(runtime)
    try:
        assert isinstance(parts, AnnotationStoreParts)
        assert current_revision(url) == head_revision()
        assert (parts.name, parts.grpc_service) == (
            "annotation_store",
            "histoloop.v1.AnnotationStoreService",
        )
        assert set(parts.handlers) == {
            events.QUERYSET_READY,
            events.EMBEDDINGS_READY,
            events.TILES_READY,
        }
        assert parts.relay is not None and list(parts.background) == [parts.relay]
        for check in parts.checks:
            check()
        repo = parts.repository
        assert repo is not None and parts.token_resolver is not None
        token = repo.register_annotator("ann", role="expert")
        identity = parts.token_resolver(token)
        assert identity is not None and identity.subject == "ann" and identity.role == "expert"
        assert parts.token_resolver("unknown") is None

        # the handlers, fed decoded events as the scaffold's worker does (twice: idempotent)
        repo.create_project("p1", "p", [ClassSpec("A")], LoopSettings())
        repo.register_dataset(
            DatasetSpec(
                project_id="p1", dataset_id="d1", kind="visium", spatial_dir=str(small_spatial)
            )
        )
        qs = events_pb2.QuerySetReady(
            meta=events.new_meta(project="p1", dataset="d1", producer="acquisition"),
            queryset_id="q1",
            round=1,
            strategy="coldstart_kmeans",
        )
        emb = events_pb2.EmbeddingsReady(
            meta=events.new_meta(project="p1", dataset="d1", producer="embedding"),
            embeddings_uri="file:///e.h5ad",
        )
        for message in (qs, qs, emb, emb):
            record = Record(
                topic=events.topic_of(message),
                key="p1",
                value=message.SerializeToString(),
                event_id=message.meta.event_id,
                partition=0,
                offset=0,
                timestamp_ms=0,
            )
            parts.handlers[record.topic](message, record)
        assert [r.queryset_id for _s, r in repo.list_query_sets("p1")] == ["q1"]
        assert repo.status("p1").round == 1
        assert repo.get_dataset("p1", "d1").embeddings_uri == "file:///e.h5ad"
    finally:
        for loop in parts.background:
            loop.stop(1.0)
        parts.close()
        bus.close()
