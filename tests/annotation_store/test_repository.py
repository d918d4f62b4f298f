"""The store's domain operations on SQLite and PostgreSQL: projects, datasets, labels, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from histoloop.annotation_store import models
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
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.errors import AlreadyExists, InvalidArgument, NotFound
from histoloop.presets import DEFAULTS
from tests.annotation_store.conftest import LAYERS, barcode, new_project_id, write_spatial


def counts(db: Database) -> dict[str, int]:
    """Rows per table: the whole store's state."""
    with db.read() as s:
        return {
            t.name: s.scalar(select(func.count()).select_from(t))
            for t in models.Base.metadata.sorted_tables
        }


def labels(*pairs: tuple[int | str, str]) -> list[SpotLabelInput]:
    return [
        SpotLabelInput(
            barcode=b if isinstance(b, str) else barcode(b), label=lab, row=f"labels[{i}]"
        )
        for i, (b, lab) in enumerate(pairs)
    ]


# projects --------------------------------------------------------------------------------------
def test_create_project_defaults_and_class_schema(repo: AnnotationRepository) -> None:
    pid = new_project_id()
    info = repo.create_project(
        pid, "DLPFC", [ClassSpec("Layer1", "#AABBCC"), ClassSpec("WM")], LoopSettings()
    )
    assert [(c.name, c.color) for c in info.classes] == [("Layer1", "#aabbcc"), ("WM", "#ff7f0e")]
    cfg = info.config
    assert (
        cfg.strategy,
        cfg.cold_start_strategy,
        cfg.query_size,
        cfg.seed,
        cfg.head,
        cfg.features,
    ) == (
        DEFAULTS["strategy"],
        DEFAULTS["cold_start_strategy"],
        DEFAULTS["query_size"],
        0,
        DEFAULTS["head"],
        "morphology",
    )
    assert (cfg.spatial_neighbours, cfg.resampling, cfg.consensus) == (
        DEFAULTS["spatial_neighbours"],
        "off",
        "latest_expert",
    )
    assert repo.get_project(pid) == info
    with pytest.raises(AlreadyExists):
        repo.create_project(pid, "again", [], LoopSettings())
    info = repo.add_classes(
        pid, [ClassSpec("Layer2"), ClassSpec("WM")]
    )  # WM exists: kept, not renamed
    assert [c.name for c in info.classes] == ["Layer1", "WM", "Layer2"]
    with pytest.raises(InvalidArgument, match=r"classes\[0\]: 'WM' exists with colour #ff7f0e"):
        repo.add_classes(pid, [ClassSpec("WM", "#000000")])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"project_id": "Bad_Id"}, "project_id"),
        ({"classes": [ClassSpec("A"), ClassSpec("A")]}, r"classes\[1\]: 'A' is given twice"),
        ({"classes": [ClassSpec("help")]}, r"classes\[0\]: 'help' is Loupe's placeholder"),
        ({"classes": [ClassSpec("A", "red")]}, r"classes\[0\].color"),
        ({"config": LoopSettings(consensus="loudest")}, "config.consensus"),
        ({"config": LoopSettings(query_size=0)}, "config.query_size"),
    ],
)
def test_create_project_rejects_bad_input(
    repo: AnnotationRepository, db: Database, kwargs: dict, match: str
) -> None:
    args = {
        "project_id": new_project_id(),
        "name": "x",
        "classes": [ClassSpec("A")],
        "config": LoopSettings(),
    }
    before = counts(db)
    with pytest.raises(InvalidArgument, match=match):
        repo.create_project(**{**args, **kwargs})
    assert counts(db) == before


# datasets --------------------------------------------------------------------------------------
def test_register_real_dlpfc_dataset(
    repo: AnnotationRepository, db: Database, artifacts: LocalArtifactStore, dlpfc_spatial: Path
) -> None:
    pid = new_project_id()
    repo.create_project(pid, "dlpfc", [ClassSpec(c) for c in LAYERS], LoopSettings())
    info = repo.register_dataset(
        DatasetSpec(
            project_id=pid, dataset_id="151510", kind="visium", spatial_dir=str(dlpfc_spatial)
        )
    )
    assert (info.n_spots, info.n_in_tissue) == (4992, 4634)  # SOURCES.md: 4634 in-tissue spots
    keys = {a.key for a in artifacts.list(f"datasets/{pid}/151510/input/")}
    assert keys == {
        f"datasets/{pid}/151510/input/spatial/{name}"
        for name in (
            "tissue_positions_list.csv",
            "scalefactors_json.json",
            "tissue_lowres_image.png",
        )
    }
    assert info.spatial_uri_prefix == artifacts.uri(f"datasets/{pid}/151510/input/spatial")
    with db.read() as s:
        spot = s.scalars(
            select(models.Spot).where(models.Spot.barcode == "ACGCCTGACACGCGCT-1")
        ).one()
        assert (spot.in_tissue, spot.array_row, spot.array_col, spot.pxl_row, spot.pxl_col) == (
            False,
            0,
            0,
            2629,
            2222,
        )
    assert repo.get_project(pid).datasets == ("151510",)
    with pytest.raises(AlreadyExists):
        repo.register_dataset(
            DatasetSpec(
                project_id=pid, dataset_id="151510", kind="visium", spatial_dir=str(dlpfc_spatial)
            )
        )


def test_register_dataset_copies_slide_and_expression(
    repo: AnnotationRepository,
    artifacts: LocalArtifactStore,
    shared_data: Path,
    small_spatial: Path,
) -> None:
    pid = new_project_id()
    repo.create_project(pid, "x", [ClassSpec("A")], LoopSettings())
    expression = shared_data / "dlpfc/151510/filtered_feature_bc_matrix_500genes.h5"
    slide = shared_data / "dlpfc/151510/spatial/tissue_lowres_image.png"
    info = repo.register_dataset(
        DatasetSpec(
            project_id=pid,
            dataset_id="d1",
            kind="visium",
            spatial_dir=str(small_spatial),
            slide_path=str(slide),
            expression_path=str(expression),
        )
    )
    assert info.slide_uri == artifacts.uri(f"datasets/{pid}/d1/input/slide/tissue_lowres_image.png")
    assert info.expression_uri.endswith("/input/expression/filtered_feature_bc_matrix_500genes.h5")
    assert artifacts.get(artifacts.key_from_uri(info.expression_uri)) == expression.read_bytes()


def test_register_dataset_rejects_bad_input(
    repo: AnnotationRepository, db: Database, tmp_path: Path, small_spatial: Path
) -> None:
    pid = new_project_id()
    repo.create_project(pid, "x", [ClassSpec("A")], LoopSettings())
    bad = tmp_path / "bad" / "spatial"
    bad.mkdir(parents=True)
    (bad / "tissue_positions.csv").write_text(
        "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\nA-1,1,0,0,1,2\nA-1,1,0,2,3,4\n"
    )
    before = counts(db)
    cases = [
        (
            DatasetSpec(
                project_id="nope", dataset_id="d", kind="visium", spatial_dir=str(small_spatial)
            ),
            NotFound,
            "project 'nope' not found",
        ),
        (
            DatasetSpec(
                project_id=pid, dataset_id="d", kind="visium", spatial_dir=str(tmp_path / "missing")
            ),
            NotFound,
            "spatial_dir",
        ),
        (
            DatasetSpec(project_id=pid, dataset_id="d", kind="visium", spatial_dir=str(bad)),
            InvalidArgument,
            "tissue_positions.csv line 3: barcode A-1 repeats line 2",
        ),
        (
            DatasetSpec(
                project_id=pid,
                dataset_id="d",
                kind="visium",
                spatial_dir=str(small_spatial),
                slide_path=str(tmp_path / "none.svs"),
            ),
            NotFound,
            "slide_path",
        ),
        (DatasetSpec(project_id=pid, dataset_id="d", kind="wsi"), InvalidArgument, "slide_path"),
        (
            DatasetSpec(project_id=pid, dataset_id="bad id", kind="visium"),
            InvalidArgument,
            "dataset_id",
        ),
    ]
    for spec, error, match in cases:
        with pytest.raises(error, match=match):
            repo.register_dataset(spec)
    assert counts(db) == before


# labels ---------------------------------------------------------------------------------------
def test_submit_labels_and_idempotent_resubmission(
    repo: AnnotationRepository, db: Database, project: str
) -> None:
    first = repo.submit_labels(
        project,
        "ds1",
        "batch-1",
        labels((1, "Layer1"), (2, "Layer2"), (2, "Layer2")),
        annotator="alice",
    )
    assert (first.n_labels, first.label_version, first.duplicate) == (
        2,
        1,
        False,
    )  # same label twice: once
    before = counts(db)
    again = repo.submit_labels(
        project, "ds1", "batch-1", labels((1, "Layer1"), (2, "Layer2")), annotator="alice"
    )
    assert again.duplicate and (again.n_labels, again.label_version, again.event_id) == (
        2,
        1,
        first.event_id,
    )
    assert counts(db) == before
    with pytest.raises(
        AlreadyExists, match="batch_id: 'batch-1' was committed before with different"
    ):
        repo.submit_labels(project, "ds1", "batch-1", labels((3, "WM")), annotator="alice")
    assert counts(db) == before
    second = repo.submit_labels(project, "ds1", "batch-2", labels((3, "WM")), annotator="alice")
    assert second.label_version == 2 and second.event_id != first.event_id
    assert counts(db)["label_events"] == 3 and counts(db)["outbox"] == 3  # + dataset.registered


def test_bad_batches_are_rejected_atomically(
    repo: AnnotationRepository, db: Database, project: str, other_spatial: Path
) -> None:
    repo.register_dataset(
        DatasetSpec(
            project_id=project, dataset_id="ds2", kind="visium", spatial_dir=str(other_spatial)
        )
    )
    repo.submit_labels(project, "ds1", "ok", labels((1, "Layer1")), annotator="alice")
    before = counts(db)
    good = [(i, "Layer2") for i in range(2, 12)]
    cases = [
        (
            labels(*good, ("GGGGGGGGGGGGGGGG-1", "Layer1")),
            InvalidArgument,
            r"labels\[10\]: barcode 'GGGGGGGGGGGGGGGG-1' is not a spot of dataset 'ds1'$",
        ),
        (
            labels(*good, (barcode(3, "2"), "Layer1"), ("X-9", "WM")),
            InvalidArgument,
            r"labels\[10\]: barcode '.*-2' is not a spot of dataset 'ds1' \(it is a spot of dataset ds2\); "
            r"1 more unknown barcodes",
        ),
        (
            labels(*good, (20, "Tumour")),
            InvalidArgument,
            r"labels\[10\]: class 'Tumour' is not in the schema of project .* pass add_missing_classes",
        ),
        (
            labels(*good, (5, "Layer3")),
            InvalidArgument,
            r"labels\[10\]: barcode '.*' is labelled 'Layer3' here but 'Layer2' at labels\[3\]",
        ),
        (labels(*good, (21, "")), InvalidArgument, r"labels\[10\]: empty label"),
        (
            labels(*good, (21, "help")),
            InvalidArgument,
            r"labels\[10\]: 'help' is Loupe's placeholder",
        ),
        (labels(*good, ("", "WM")), InvalidArgument, r"labels\[10\]: empty barcode"),
        ([], InvalidArgument, "labels: the batch is empty"),
    ]
    for batch, error, match in cases:
        with pytest.raises(error, match=match):
            repo.submit_labels(project, "ds1", "bad", batch, annotator="alice")
    with pytest.raises(NotFound, match="project 'nope' not found"):
        repo.submit_labels("nope", "ds1", "bad", labels((1, "WM")), annotator="alice")
    with pytest.raises(NotFound, match="dataset 'nope' not found in project"):
        repo.submit_labels(project, "nope", "bad", labels((1, "WM")), annotator="alice")
    with pytest.raises(InvalidArgument, match="batch_id"):
        repo.submit_labels(project, "ds1", "", labels((1, "WM")), annotator="alice")
    assert counts(db) == before
    assert repo.get_project(project).label_version == 1
    # the same batch id is still free: nothing of the rejected attempts was kept
    assert not repo.submit_labels(project, "ds1", "bad", labels(*good), annotator="alice").duplicate


def test_loupe_import_errors_change_nothing(
    repo: AnnotationRepository, db: Database, project: str
) -> None:
    before = counts(db)
    bad_files = {
        b"": "empty",
        b"Barcode;G\nx;y\n": "delimiter",
        "Barcode,G\nx,\u00e9\n".encode("latin-1"): "UTF-8",
        f"Barcode,G\n{barcode(1)},Layer1\n{barcode(2)},Nope\n".encode(): "csv line 3: class 'Nope'",
        f"Barcode,G\n{barcode(1)},Layer1\n{barcode(1)},Layer2\n".encode(): "csv line 3: barcode .* at csv line 2",
        f"Barcode,G\n{barcode(1)},Layer1\nZZZZ-1,Layer2\n".encode(): "csv line 3: barcode 'ZZZZ-1'",
    }
    for data, match in bad_files.items():
        with pytest.raises(InvalidArgument, match=match):
            repo.import_loupe_csv(project, "ds1", "csv-1", data, annotator="alice")
    assert counts(db) == before


def test_add_missing_classes(repo: AnnotationRepository, project: str) -> None:
    result = repo.submit_labels(
        project,
        "ds1",
        "b",
        labels((1, "Tumour"), (2, "Layer1"), (3, "Stroma")),
        annotator="alice",
        add_missing_classes=True,
    )
    assert result.n_labels == 3
    info = repo.get_project(project)
    assert [c.name for c in info.classes] == [*LAYERS, "Tumour", "Stroma"]
    snapshot = repo.labels_snapshot(project, 1)
    assert [c["name"] for c in snapshot["classes"]] == [*LAYERS, "Tumour", "Stroma"]


def test_multi_rater_consensus_status_and_agreement(
    db: Database, artifacts: LocalArtifactStore, small_spatial: Path
) -> None:
    repo = AnnotationRepository(db, artifacts)
    pid = new_project_id()
    repo.create_project(
        pid, "mr", [ClassSpec(c) for c in ("A", "B")], LoopSettings(consensus="majority")
    )
    repo.register_dataset(
        DatasetSpec(project_id=pid, dataset_id="ds1", kind="visium", spatial_dir=str(small_spatial))
    )
    repo.register_annotator("expert1", role="expert", projects=[pid])
    given = {  # spot -> labels of ann1, ann2, expert1
        1: ("A", "A", "A"),
        2: ("A", "B", "B"),
        3: ("B", "B", "A"),
        4: ("A", "A", "B"),
    }
    for j, who in enumerate(("ann1", "ann2", "expert1")):
        repo.submit_labels(
            pid,
            "ds1",
            f"b-{who}",
            labels(*[(spot, lab[j]) for spot, lab in given.items()]),
            annotator=who,
        )
    majority = repo.consensus(pid)
    assert {bc: c.label for (_d, bc), c in majority.labels.items()} == {
        barcode(1): "A",
        barcode(2): "B",
        barcode(3): "B",
        barcode(4): "A",
    }
    assert majority.labels[("ds1", barcode(2))].disagreement == pytest.approx(1 / 3)

    status = repo.status(pid)
    assert status.labelled_per_class == {"A": 2, "B": 2}
    assert (status.n_labelled, status.n_disputed, status.label_version, status.n_spots) == (
        4,
        3,
        3,
        36,
    )

    report = repo.agreement(pid)
    assert report.n_spots_multi_rated == 4 and report.n_disputed == 3
    assert report.disputed == tuple(sorted(f"ds1/{barcode(i)}" for i in (2, 3, 4)))
    assert [(p.annotator_a, p.annotator_b, p.n_common) for p in report.cohen] == [
        ("ann1", "ann2", 4),
        ("ann1", "expert1", 4),
        ("ann2", "expert1", 4),
    ]
    assert set(report.reliability) == {"ann1", "ann2", "expert1"}
    assert repo.agreement(pid, "ds1").disputed == tuple(sorted(barcode(i) for i in (2, 3, 4)))
    # computed once per label version: a repeat is the same report, a new label a new one
    assert repo.agreement(pid) is report
    repo.submit_labels(pid, "ds1", "b-settle", labels((4, "A"), (5, "B")), annotator="expert1")
    after = repo.agreement(pid)
    assert after is not report and after.n_disputed == 2  # spot 4 is now A, A, A
    status = repo.status(pid)
    assert (status.labelled_per_class, status.n_labelled, status.n_disputed) == (
        {"A": 2, "B": 3},
        5,
        2,
    )

    # latest_expert in a second project over the same votes: the expert's word wins
    pid2 = new_project_id()
    repo.create_project(pid2, "le", [ClassSpec(c) for c in ("A", "B")], LoopSettings())
    repo.register_dataset(
        DatasetSpec(
            project_id=pid2, dataset_id="ds1", kind="visium", spatial_dir=str(small_spatial)
        )
    )
    for j, who in enumerate(("ann1", "ann2", "expert1")):
        repo.submit_labels(
            pid2,
            "ds1",
            f"b-{who}",
            labels(*[(spot, lab[j]) for spot, lab in given.items()]),
            annotator=who,
        )
    expert = repo.consensus(pid2)
    assert {bc: c.label for (_d, bc), c in expert.labels.items()} == {
        barcode(i): given[i][2] for i in given
    }


def test_snapshot_is_as_of_its_version(repo: AnnotationRepository, project: str) -> None:
    repo.submit_labels(
        project, "ds1", "b1", labels((1, "Layer1"), (2, "Layer2")), annotator="alice"
    )
    repo.submit_labels(project, "ds1", "b2", labels((2, "WM"), (3, "Layer3")), annotator="alice")
    v1 = repo.labels_snapshot(project, 1)
    assert v1["datasets"]["ds1"]["labels"] == {barcode(1): "Layer1", barcode(2): "Layer2"}
    assert v1["n_labelled_spots"] == 2 and v1["label_version"] == 1
    v2 = repo.labels_snapshot(project, 2)
    assert v2["datasets"]["ds1"]["labels"] == {
        barcode(1): "Layer1",
        barcode(2): "WM",
        barcode(3): "Layer3",
    }
    assert json.dumps(repo.labels_snapshot(project, 1)) == json.dumps(v1)


def test_annotators_and_tokens(repo: AnnotationRepository, db: Database, project: str) -> None:
    token = repo.register_annotator(
        "bob", display_name="Dr Bob", role="annotator", projects=[project]
    )
    identity = repo.resolve_token(token)
    assert identity is not None
    assert (identity.subject, identity.role, identity.projects) == (
        "bob",
        "annotator",
        frozenset({project}),
    )
    assert repo.resolve_token("not-a-token") is None
    with db.read() as s:
        stored = s.scalars(select(models.AnnotatorToken.token_hash)).all()
    assert token not in stored and len(stored[0]) == 64  # only the hash is stored
    assert token.startswith("hl_")  # never "-…", which `histoloop --token` would take for a flag
    second = repo.register_annotator("bob", role="expert")
    assert (
        repo.resolve_token(token).role == "expert" and repo.resolve_token(second).subject == "bob"
    )
    admin = repo.resolve_token(repo.register_annotator("root1", role="admin"))
    assert admin is not None and admin.projects is None
    before = counts(db)
    with pytest.raises(NotFound, match=r"projects\[1\]: project 'nope' not found"):
        repo.register_annotator("carol", projects=[project, "nope"])
    with pytest.raises(NotFound, match="annotator_id: annotator 'ghost' not found"):
        repo.submit_labels(
            project, "ds1", "b1", labels((1, "WM")), annotator="ghost", create_annotator=False
        )
    assert counts(db) == before
    repo.submit_labels(
        project, "ds1", "b1", labels((1, "WM")), annotator="local", annotator_role="admin"
    )
    assert (
        counts(db)["annotators"] == before["annotators"] + 1
    )  # the local user's row, made on first use


def test_query_sets_rounds_and_embeddings(repo: AnnotationRepository, project: str) -> None:
    record = QuerySetRecord(
        queryset_id="qs-1",
        project_id=project,
        round=1,
        strategy="coldstart_kmeans",
        model_version="",
        spots=(QuerySpot(barcode(1), 0.9, "ds1", "cold_start"),),
        metrics={"balanced_accuracy": 0.5},
        stopping={"recommend_stop": False},
    )
    assert repo.record_query_set(record, event_id="e1")
    assert not repo.record_query_set(record, event_id="e1")  # same event
    assert not repo.record_query_set(record, event_id="e2")  # same query set id
    assert not repo.record_query_set(
        QuerySetRecord(
            queryset_id="x", project_id="nope", round=1, strategy="s", model_version="", spots=()
        ),
        event_id="e3",
    )
    second = QuerySetRecord(
        queryset_id="qs-2",
        project_id=project,
        round=2,
        strategy="activevisium",
        model_version="m2",
        spots=(QuerySpot(barcode(2), 0.7, "ds1", "uncertainty"),),
        metrics={"balanced_accuracy": 0.8, "macro_f1": 0.7},
    )
    assert repo.record_query_set(second, event_id="e4")
    latest = repo.get_query_set(project)
    assert (latest.queryset_id, latest.round, latest.spots[0].barcode) == ("qs-2", 2, barcode(2))
    assert repo.get_query_set(project, "qs-1").metrics == {"balanced_accuracy": 0.5}
    assert [r.queryset_id for _s, r in repo.list_query_sets(project)] == ["qs-1", "qs-2"]
    status = repo.status(project)
    assert (status.round, status.latest_model_version, status.latest_metrics["macro_f1"]) == (
        2,
        "m2",
        0.7,
    )
    with pytest.raises(NotFound, match="query set 'zz' not found"):
        repo.get_query_set(project, "zz")

    assert repo.set_embeddings(project, "ds1", "file:///emb/v1.h5ad", "emb-1")
    assert not repo.set_embeddings(project, "ds1", "file:///emb/v1.h5ad", "emb-1")
    assert not repo.set_embeddings(project, "nope", "file:///x", "emb-2")
    assert repo.get_dataset(project, "ds1").embeddings_uri == "file:///emb/v1.h5ad"


def test_headerless_and_header_positions_files(tmp_path: Path) -> None:
    from histoloop.formats.positions import find_positions_file, parse_positions

    new = write_spatial(tmp_path / "new", ["A-1", "B-1"], header=True)
    old = write_spatial(tmp_path / "old", ["A-1", "B-1"], header=False)
    rows_new = parse_positions(find_positions_file(new).read_bytes())
    rows_old = parse_positions(find_positions_file(old).read_bytes())
    assert rows_new == rows_old and [r.barcode for r in rows_new] == ["A-1", "B-1"]
    with pytest.raises(InvalidArgument, match="line 1: 3 columns"):
        parse_positions(b"A-1,1,0\n")
    with pytest.raises(InvalidArgument, match="in_tissue 'yes'"):
        parse_positions(b"A-1,yes,0,0,1,1\n")
