"""Loupe Browser CSV: parsing and its errors (pure), and round trips through the store."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from histoloop.annotation_store.domain import (
    ClassSpec,
    DatasetSpec,
    LoopSettings,
    QuerySetRecord,
    QuerySpot,
)
from histoloop.annotation_store.loupe import (
    MAX_CSV_BYTES,
    check_upload_size,
    labels_csv,
    parse_loupe_csv,
    predictions_csv,
    query_set_csv,
)
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.errors import InvalidArgument
from tests.annotation_store.conftest import DLPFC, LAYERS, new_project_id


# parsing --------------------------------------------------------------------------------------
def test_parse_a_loupe_export_with_placeholders_and_empty_cells() -> None:
    data = (
        "\ufeffBarcode,Pathologist Annotations\r\n"
        'AAAC-1,Layer1\r\nAAAG-1,help\r\nAAAT-1,\r\n"AACA-1","Layer 2, upper"\r\nAACC-1,HELP\r\n'
    ).encode()
    parsed = parse_loupe_csv(data)
    assert parsed.group == "Pathologist Annotations"
    assert [(x.barcode, x.label) for x in parsed.labels] == [
        ("AAAC-1", "Layer1"),
        ("AACA-1", "Layer 2, upper"),
    ]
    assert parsed.labels[0].row == "csv line 2"
    assert parsed.placeholders == ("AAAG-1", "AACC-1")
    assert parsed.n_empty == 1


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"   \n\n", "empty"),
        (b"Barcode,Pathologist Annotations\n", "no rows"),
        (b"Spot,Pathologist Annotations\nAAAC-1,Layer1\n", "line 1: header"),
        (b"Barcode\nAAAC-1\n", "line 1: header .* one column"),
        (b"Barcode,Group,Extra\nAAAC-1,Layer1,x\n", "line 1: header"),
        (b"Barcode;Pathologist Annotations\nAAAC-1;Layer1\n", "delimiter looks like ';'"),
        (b"Barcode\tPathologist Annotations\nAAAC-1\tLayer1\n", "delimiter looks like a tab"),
        (b"Barcode,Group\nAAAC-1,Layer1\nAAAG-1;Layer2\n", "line 3: 1 cells.*';'"),
        (b"Barcode,Group\nAAAC-1,Layer1,extra\n", "line 2: 3 cells"),
        (b"Barcode,Group\n,Layer1\n", "line 2: empty barcode"),
        ("Barcode,Group\nAAAC-1,Couche\u00e9\n".encode("latin-1"), "line 2: not UTF-8"),
        ("Barcode,Group\n".encode("utf-16"), "line 1: not UTF-8"),
    ],
    ids=[
        "empty",
        "blank",
        "header-only",
        "wrong-header",
        "one-column",
        "three-columns",
        "semicolon",
        "tab",
        "semicolon-row",
        "extra-cell",
        "empty-barcode",
        "latin-1",
        "utf-16",
    ],
)
def test_parse_rejects_bad_files_naming_the_line(data: bytes, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        parse_loupe_csv(data)


def test_uploads_are_rejected_by_size_before_parsing() -> None:
    two_gb = 2 * 1024**3
    with pytest.raises(InvalidArgument, match=f"{two_gb} bytes is larger than the 64 MiB limit"):
        check_upload_size(two_gb)
    check_upload_size(MAX_CSV_BYTES)  # the limit itself is fine
    with pytest.raises(InvalidArgument, match="larger than"):
        parse_loupe_csv(b"Barcode,G\n" + b"A-1,L\n" * 200, limit=1024)


def test_exports_have_loupe_columns_and_round_trip() -> None:
    order = ["B-1", "A-1", "C-1", "D-1"]
    data, n = labels_csv({"A-1": "Layer1", "B-1": "Layer 2, upper", "D-1": "WM"}, order=order)
    assert n == 3
    assert data == b'Barcode,Pathologist Annotations\nB-1,"Layer 2, upper"\nA-1,Layer1\nD-1,WM\n'
    again = parse_loupe_csv(data)
    assert labels_csv({x.barcode: x.label for x in again.labels}, order=order)[0] == data
    query, n = query_set_csv(["C-1", "A-1"], order=order)
    assert (query, n) == (b"Barcode,Pathologist Annotations\nA-1,help\nC-1,help\n", 2)
    preds, n = predictions_csv(
        {"A-1": "Layer1", "B-1": "WM", "C-1": "Layer3"}, ["C-1"], order=order
    )
    assert preds == b"Barcode,Predictions\nB-1,WM\nA-1,Layer1\nC-1,help\n" and n == 3


# through the store -----------------------------------------------------------------------------
def _dlpfc_labels(shared_data: Path) -> dict[str, str]:
    """The real manual layer annotation of DLPFC 151510 (spatialLIBD), NA as empty."""
    with open(shared_data / DLPFC / "metadata.tsv", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        return {
            row["barcode"]: (
                "" if row["layer_guess_reordered"] == "NA" else row["layer_guess_reordered"]
            )
            for row in reader
        }


def _loupe(labels: dict[str, str], group: str = "Pathologist Annotations") -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Barcode", group])
    writer.writerows(labels.items())
    return out.getvalue().encode()


@pytest.fixture
def dlpfc_project(repo: AnnotationRepository, dlpfc_spatial: Path) -> str:
    project_id = new_project_id()
    repo.create_project(project_id, "dlpfc", [ClassSpec(c) for c in LAYERS], LoopSettings())
    repo.register_dataset(
        DatasetSpec(
            project_id=project_id,
            dataset_id="151510",
            kind="visium",
            spatial_dir=str(dlpfc_spatial),
        )
    )
    return project_id


def test_loupe_round_trip_on_real_dlpfc_labels(
    repo: AnnotationRepository, dlpfc_project: str, shared_data: Path
) -> None:
    truth = _dlpfc_labels(shared_data)
    labelled = {b: lab for b, lab in truth.items() if lab}
    first = repo.import_loupe_csv(
        dlpfc_project, "151510", "import-1", _loupe(truth), annotator="path1"
    )
    assert (first.n_labels, first.label_version, first.duplicate) == (len(labelled), 1, False)
    assert len(labelled) == 4595  # 4634 in tissue, 39 NA (SOURCES.md)

    exported, n_rows = repo.export_labels(dlpfc_project, "151510")
    assert n_rows == len(labelled)
    lines = exported.decode().splitlines()
    assert lines[0] == "Barcode,Pathologist Annotations"
    assert dict(line.split(",") for line in lines[1:]) == labelled

    second = repo.import_loupe_csv(dlpfc_project, "151510", "import-2", exported, annotator="path1")
    assert second.n_labels == len(labelled) and second.label_version == 2
    again, _ = repo.export_labels(dlpfc_project, "151510")
    assert again == exported  # byte-identical: columns, order, quoting, line ends

    custom, _ = repo.export_labels(dlpfc_project, "151510", group="Layers")
    assert custom.splitlines()[0] == b"Barcode,Layers"


def test_query_set_export_reimports_as_placeholders_only(
    repo: AnnotationRepository, dlpfc_project: str, shared_data: Path
) -> None:
    truth = _dlpfc_labels(shared_data)
    query = [b for b, lab in truth.items() if lab][:20]
    repo.record_query_set(
        QuerySetRecord(
            queryset_id="qs-1",
            project_id=dlpfc_project,
            round=1,
            strategy="activevisium",
            model_version="m1",
            spots=tuple(
                QuerySpot(barcode=b, score=1.0 - i / 100, dataset="151510")
                for i, b in enumerate(query)
            ),
        ),
        event_id="ev-qs-1",
    )
    data, n = repo.export_query_set(dlpfc_project, "151510")
    assert n == 20
    rows = data.decode().splitlines()
    assert rows[0] == "Barcode,Pathologist Annotations"
    assert {line.split(",")[1] for line in rows[1:]} == {"help"}
    assert {line.split(",")[0] for line in rows[1:]} == set(query)

    result = repo.import_loupe_csv(
        dlpfc_project, "151510", "reimport-help", data, annotator="path1"
    )
    assert (result.n_labels, result.n_placeholders, result.label_version, result.event_id) == (
        0,
        20,
        0,
        "",
    )
    assert repo.status(dlpfc_project).n_labelled == 0
    assert (
        repo.pending_count() == 1
    )  # only dataset.registered: no labels.committed for placeholders
    assert repo.import_loupe_csv(
        dlpfc_project, "151510", "reimport-help", data, annotator="path1"
    ).duplicate

    # answered in Loupe: the pathologist replaces help with labels
    answered = data.decode().replace("help", "Layer3").encode()
    result = repo.import_loupe_csv(
        dlpfc_project, "151510", "answer-1", answered, annotator="path1", queryset_id="qs-1"
    )
    assert (result.n_labels, result.n_placeholders, result.label_version) == (20, 0, 1)


def test_predictions_export_marks_query_spots_help(
    repo: AnnotationRepository, dlpfc_project: str
) -> None:
    repo.record_query_set(
        QuerySetRecord(
            queryset_id="qs-1",
            project_id=dlpfc_project,
            round=2,
            strategy="activevisium",
            model_version="m1",
            spots=(QuerySpot(barcode="TACCGATCCAACACTT-1", dataset="151510"),),
            predictions_uri="file:///p.h5ad",
        ),
        event_id="ev-1",
    )
    seen: list[tuple[str, str]] = []

    def loader(uri: str, dataset: str) -> dict[str, str]:
        seen.append((uri, dataset))
        return {
            "ACGCCTGACACGCGCT-1": "WM",
            "TACCGATCCAACACTT-1": "Layer1",
            "ATTAAAGCGGACGAGC-1": "Layer2",
        }

    repo.predictions_loader = loader
    data, n = repo.export_predictions(dlpfc_project, "151510")
    assert seen == [("file:///p.h5ad", "151510")]
    assert data == (
        b"Barcode,Predictions\nACGCCTGACACGCGCT-1,WM\nTACCGATCCAACACTT-1,help\n"
        b"ATTAAAGCGGACGAGC-1,Layer2\n"
    )
    assert n == 3


_label = (
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=30)
    .map(str.strip)
    .filter(lambda s: bool(s) and s.lower() != "help")
)
_barcode = st.from_regex(r"[ACGT]{16}-[12]", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_barcode, _label, min_size=1, max_size=30))
def test_any_labels_round_trip_byte_identically(labels: dict[str, str]) -> None:
    data, n = labels_csv(labels)
    parsed = parse_loupe_csv(data)
    assert n == len(labels) and parsed.group == "Pathologist Annotations"
    assert {x.barcode: x.label for x in parsed.labels} == labels
    assert labels_csv({x.barcode: x.label for x in parsed.labels})[0] == data
