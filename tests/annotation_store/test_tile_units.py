"""A WSI dataset's units are the tiles of ``tiles.ready``, on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from histoloop.annotation_store.db import Database
from histoloop.annotation_store.domain import (
    ClassSpec,
    DatasetSpec,
    LoopSettings,
    QuerySetRecord,
    QuerySpot,
    SpotLabelInput,
)
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.annotation_store.units import TileUnit
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.errors import FailedPrecondition, InvalidArgument
from tests.annotation_store.conftest import new_project_id

TILES = [
    TileUnit(f"r{r}_c{c}", r, c, 112.0 + 224 * c, 112.0 + 224 * r, 224.0)
    for r in range(2)
    for c in range(3)
]


@pytest.fixture
def wsi_project(repo: AnnotationRepository, shared_data: Path) -> str:
    """A project with the WSI dataset ``slide``, its tiles not known yet."""
    project = new_project_id()
    repo.create_project(project, "wsi", [ClassSpec("tumour"), ClassSpec("stroma")], LoopSettings())
    repo.register_dataset(
        DatasetSpec(
            project_id=project,
            dataset_id="slide",
            kind="wsi",
            slide_path=str(shared_data / "wsi" / "CMU-1-Small-Region.svs"),
        )
    )
    return project


def test_tiles_become_units_and_a_second_replica_sees_them(
    repo: AnnotationRepository, db_url: str, artifacts: LocalArtifactStore, wsi_project: str
) -> None:
    other = AnnotationRepository(Database(db_url, pool_size=2), artifacts)  # another store replica
    label = [SpotLabelInput("r1_c2", "tumour", row="labels[0]")]
    with pytest.raises(InvalidArgument, match="'r1_c2' is not a spot"):
        other.submit_labels(
            wsi_project, "slide", "early", label, annotator="local", annotator_role="admin"
        )
    with pytest.raises(FailedPrecondition, match="tiles are not known yet"):
        repo.unit_layout(wsi_project, "slide")

    assert repo.add_tiles(wsi_project, "slide", TILES, source="index.csv") == 6
    assert (
        repo.add_tiles(wsi_project, "slide", TILES[:2], source="again.csv") == 0
    )  # re-tiling: nothing new
    info = repo.get_dataset(wsi_project, "slide")
    assert (info.n_spots, info.n_in_tissue) == (6, 6)
    units = {u.barcode: u for u in repo.unit_layout(wsi_project, "slide").units}
    assert units["r1_c2"].x == 560 and units["r1_c2"].y == 336 and units["r1_c2"].shape == "square"
    # the replica that cached the dataset before the tiles arrived accepts them now
    reply = other.submit_labels(
        wsi_project, "slide", "b1", label, annotator="local", annotator_role="admin"
    )
    assert reply.n_labels == 1
    assert repo.status(wsi_project).n_spots == 6
    other.db.close()


def test_tiles_of_a_visium_or_unknown_dataset_are_ignored(
    repo: AnnotationRepository, project: str
) -> None:
    before = repo.get_dataset(project, "ds1")
    assert repo.add_tiles(project, "ds1", TILES, source="x") == 0
    assert repo.add_tiles(project, "nope", TILES, source="x") == 0
    assert repo.add_tiles("no-project", "ds1", TILES, source="x") == 0
    assert repo.get_dataset(project, "ds1") == before


def test_a_replica_that_cached_the_dataset_before_its_tiles_exports_them_in_unit_order(
    repo: AnnotationRepository, db_url: str, artifacts: LocalArtifactStore, wsi_project: str
) -> None:
    other = AnnotationRepository(Database(db_url, pool_size=2), artifacts)  # another store replica
    assert other.unit_order(wsi_project, "slide") == []  # cached with no tiles yet
    tiles = TILES[::-1]  # unit order is not barcode order
    repo.add_tiles(wsi_project, "slide", tiles, source="index.csv")
    repo.record_query_set(
        QuerySetRecord(
            queryset_id="qs-1",
            project_id=wsi_project,
            round=1,
            strategy="entropy",
            model_version="m1",
            spots=(QuerySpot(barcode="r0_c1", dataset="slide"),),
            predictions_uri="file:///p.npz",
        ),
        event_id="ev-1",
    )
    other.predictions_loader = lambda _uri, _dataset: {t.tile_id: "tumour" for t in tiles}
    data, n = other.export_predictions(wsi_project, "slide")
    rows = [line.split(",")[0] for line in data.decode().splitlines()[1:]]
    assert n == 6 and rows == [t.tile_id for t in tiles]
    other.db.close()
