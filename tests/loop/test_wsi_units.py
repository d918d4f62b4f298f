"""Whole-slide tiles are labelled units: register a WSI → cold start of tiles → labels →
model, predictions and a new query set, in the embedded default."""

from __future__ import annotations

import openslide
import pytest

from histoloop.annotation_store.units import parse_tile_index
from histoloop.errors import InvalidArgument
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import common_pb2
from tests.loop.conftest import Watch

CLASSES = ("tumour", "stroma", "background")


def test_a_wsi_loop_runs_on_its_tiles(server, store, shared_data) -> None:
    slide = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    store.CreateProject(
        pb.CreateProjectRequest(
            project_id="wsi-a",
            classes=[common_pb2.ClassDef(name=n) for n in CLASSES],
            config=common_pb2.LoopConfig(query_size=6, head="logreg", seed=2),
        )
    )
    watch = Watch(store, "wsi-a")
    store.RegisterDataset(
        pb.RegisterDatasetRequest(
            project_id="wsi-a",
            dataset_id="cmu",
            kind=common_pb2.DATASET_KIND_WSI,
            slide_path=str(slide),
        )
    )
    cold = watch.next_round(-1)
    assert cold.round == 0 and len(cold.spots) == 6
    assert all(s.barcode.startswith("r") and "_c" in s.barcode for s in cold.spots)

    # the store knows every tissue tile, with its bounds inside the slide
    repo = next(p for p in server.parts if p.name == "annotation_store").repository
    layout = repo.unit_layout("wsi-a", "cmu")
    width, height = openslide.OpenSlide(str(slide)).dimensions
    assert layout.kind == "wsi" and len(layout.units) > 20
    for unit in layout.units:
        assert unit.shape == "square" and unit.size == 224
        assert 0 <= unit.x - unit.size / 2 and unit.x + unit.size / 2 <= width
        assert 0 <= unit.y - unit.size / 2 and unit.y + unit.size / 2 <= height
    dataset = store.ListDatasets(pb.ListDatasetsRequest(project_id="wsi-a")).datasets[0]
    assert dataset.n_spots == dataset.n_in_tissue == len(layout.units)

    labels = [
        pb.SpotLabel(barcode=s.barcode, label=CLASSES[i % 3]) for i, s in enumerate(cold.spots)
    ]
    reply = store.SubmitLabels(
        pb.SubmitLabelsRequest(
            project_id="wsi-a", dataset_id="cmu", batch_id="tiles-1", labels=labels
        )
    )
    assert reply.n_labels == 6
    first = watch.next_round(0)
    watch.close()
    assert first.model_version and len(first.spots) == 6
    assert not {s.barcode for s in first.spots} & {s.barcode for s in cold.spots}
    status = store.GetStatus(pb.GetStatusRequest(project_id="wsi-a"))
    assert status.n_spots == len(layout.units) and status.n_labelled == 6
    assert dict(status.labelled_per_class) == {c: 2 for c in CLASSES}
    predictions = store.ExportLabels(
        pb.ExportLabelsRequest(
            project_id="wsi-a", dataset_id="cmu", kind=pb.EXPORT_KIND_PREDICTIONS
        )
    )
    rows = predictions.csv.decode().splitlines()[1:]
    assert len(rows) == len(layout.units)
    assert {r.split(",")[1] for r in rows} <= {*CLASSES, "help"}


def test_a_bad_tile_index_names_row_and_field() -> None:
    good = b"id,chunk,cx,cy,size0\nr0_c1,0,336,112,224\n"
    assert parse_tile_index(good, source="idx.csv")[0].bounds == (224, 0, 448, 224)
    with pytest.raises(InvalidArgument, match=r"idx.csv row 2: cy 'x' is not a number"):
        parse_tile_index(b"id,cx,cy,size0\nr0_c1,1,x,224\n", source="idx.csv")
    with pytest.raises(InvalidArgument, match=r"row 3: id 'tile' is not r<row>_c<col>"):
        parse_tile_index(b"id,cx,cy,size0\nr0_c1,1,1,224\ntile,1,1,1\n", source="idx.csv")
    with pytest.raises(InvalidArgument, match="lacks column"):
        parse_tile_index(b"id,cx\n", source="idx.csv")


def test_geojson_round_trip_and_query_picture_on_tiles(server, store, shared_data) -> None:
    """Labels exported as QuPath GeoJSON import back as the same labels; the query is a PNG."""
    import io
    import json

    from PIL import Image

    export = store.ExportLabels(
        pb.ExportLabelsRequest(
            project_id="wsi-a",
            dataset_id="cmu",
            kind=pb.EXPORT_KIND_LABELS,
            format=pb.EXPORT_FORMAT_GEOJSON,
        )
    )
    doc = json.loads(export.content)
    assert export.media_type == "application/geo+json" and export.filename.endswith(".geojson")
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == export.n_rows == 6
    feature = doc["features"][0]
    assert feature["properties"]["objectType"] == "annotation"
    assert set(feature["properties"]["classification"]) == {"name", "color"}
    ring = feature["geometry"]["coordinates"][0]
    assert len(ring) == 5 and ring[0] == ring[-1]  # a closed square
    before = store.ExportLabels(pb.ExportLabelsRequest(project_id="wsi-a", dataset_id="cmu")).csv
    again = store.ImportGeoJson(
        pb.ImportGeoJsonRequest(
            project_id="wsi-a", dataset_id="cmu", batch_id="geo-back", geojson=export.content
        )
    )
    assert again.n_labels == 6
    assert (
        store.ExportLabels(pb.ExportLabelsRequest(project_id="wsi-a", dataset_id="cmu")).csv
        == before
    )

    query = store.ExportLabels(
        pb.ExportLabelsRequest(
            project_id="wsi-a",
            dataset_id="cmu",
            kind=pb.EXPORT_KIND_QUERY_SET,
            format=pb.EXPORT_FORMAT_GEOJSON,
        )
    )
    features = json.loads(query.content)["features"]
    assert [f["properties"]["measurements"]["query_rank"] for f in features] == list(range(1, 7))
    assert {f["properties"]["classification"]["name"] for f in features} == {"help"}
    png = store.ExportLabels(
        pb.ExportLabelsRequest(
            project_id="wsi-a",
            dataset_id="cmu",
            kind=pb.EXPORT_KIND_QUERY_SET,
            format=pb.EXPORT_FORMAT_PNG,
        )
    )
    image = Image.open(io.BytesIO(png.content))
    assert png.media_type == "image/png" and png.n_rows == 6 and max(image.size) >= 1000
    predictions = store.ExportLabels(
        pb.ExportLabelsRequest(
            project_id="wsi-a",
            dataset_id="cmu",
            kind=pb.EXPORT_KIND_PREDICTIONS,
            format=pb.EXPORT_FORMAT_GEOJSON,
        )
    )
    assert {f["properties"]["objectType"] for f in json.loads(predictions.content)["features"]} == {
        "detection"
    }
