"""The generated stubs are exactly what protoc makes of protos/ (never edited, never stale)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.conftest import REPO


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "tools" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = module
    spec.loader.exec_module(module)
    return module


def test_stubs_match_protos(tmp_path: Path) -> None:
    fresh = _gen_module().generate(tmp_path)
    in_tree = REPO / "services" / "common" / "histoloop" / "v1"
    assert fresh, "protoc produced nothing"
    names = sorted(p.name for p in fresh)
    assert names == sorted(p.name for p in in_tree.glob("*_pb2*.py*")), (
        "stub set differs: run `make protos`"
    )
    for path in fresh:
        assert path.read_bytes() == (in_tree / path.name).read_bytes(), (
            f"{path.name} is stale: run `make protos`"
        )


def test_every_service_and_event_is_defined() -> None:
    from histoloop.events import TOPICS
    from histoloop.v1 import (
        acquisition_pb2,
        annotation_store_pb2,
        embedding_pb2,
        prediction_pb2,
        tiling_pb2,
        training_pb2,
    )

    services = {
        annotation_store_pb2: "AnnotationStoreService",
        tiling_pb2: "TilingService",
        embedding_pb2: "EmbeddingService",
        training_pb2: "TrainingService",
        prediction_pb2: "PredictionService",
        acquisition_pb2: "AcquisitionService",
    }
    for module, name in services.items():
        assert module.DESCRIPTOR.package == "histoloop.v1"
        assert name in module.DESCRIPTOR.services_by_name
    assert set(TOPICS) == {
        "dataset.registered",
        "tiles.ready",
        "embeddings.ready",
        "labels.committed",
        "model.trained",
        "predictions.ready",
        "queryset.ready",
    }
    for cls in TOPICS.values():
        meta = cls.DESCRIPTOR.fields_by_name["meta"].message_type
        assert {"event_id", "project", "dataset", "source_versions", "created_at"} <= set(
            meta.fields_by_name
        )
