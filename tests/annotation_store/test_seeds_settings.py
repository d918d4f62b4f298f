"""The acquisition, uncertainty and stopping settings of a project (LoopConfig 30–37)."""

from __future__ import annotations

import pytest

from histoloop.annotation_store.convert import loop_settings_from_proto, loop_settings_to_proto
from histoloop.annotation_store.domain import ClassSpec, LoopSettings
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.errors import InvalidArgument
from histoloop.v1 import common_pb2


def test_unset_fields_take_the_documented_defaults() -> None:
    settings = loop_settings_from_proto(common_pb2.LoopConfig())
    assert (settings.hybrid_share, settings.kmeans_pick, settings.mc_dropout_samples) == (
        0.7,
        "closest_to_centroid",
        0,
    )
    assert (
        settings.stop_max_change,
        settings.stop_min_kappa,
        settings.stop_patience,
        settings.stop_max_uncertainty,
        settings.resampling_every,
        settings.harmony,
    ) == (0.02, 0.95, 2, 0.0, 5, False)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hybrid_share", 1.5),
        ("kmeans_pick", "middle"),
        ("mc_dropout_samples", 5000),
        ("stop_max_change", 2.0),
        ("stop_min_kappa", 1.2),
        ("stop_patience", 500),
        ("stop_max_uncertainty", 3.0),
        ("resampling_every", 5000),
    ],
)
def test_bad_values_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument, match=f"config.{field}"):
        loop_settings_from_proto(common_pb2.LoopConfig(**{field: value}))


def test_settings_are_stored_and_read_back(repo: AnnotationRepository) -> None:
    given = common_pb2.LoopConfig(
        hybrid_share=0.4,
        kmeans_pick="far_from_centre",
        mc_dropout_samples=12,
        stop_max_change=0.02,
        stop_min_kappa=0.9,
        stop_patience=3,
        stop_max_uncertainty=0.3,
        resampling_every=2,
        harmony=True,
    )
    repo.create_project(
        "p17", "p17", [ClassSpec("a"), ClassSpec("b")], loop_settings_from_proto(given)
    )
    stored = repo.get_project("p17").config
    back = loop_settings_to_proto(stored)
    for field in (
        "hybrid_share",
        "kmeans_pick",
        "mc_dropout_samples",
        "stop_max_change",
        "stop_min_kappa",
        "stop_patience",
        "stop_max_uncertainty",
        "resampling_every",
        "harmony",
    ):
        assert getattr(back, field) == pytest.approx(getattr(given, field)), field
    with pytest.raises(InvalidArgument, match="config.kmeans_pick"):
        repo.create_project("p18", "p18", [ClassSpec("a")], LoopSettings(kmeans_pick="edge"))
