"""QuPath GeoJSON in and out, on unit geometry alone (no server)."""

from __future__ import annotations

import json
import math

import pytest
from shapely.geometry import shape

from histoloop.annotation_store.geojson import (
    CIRCLE_VERTICES,
    GeoFeature,
    feature_collection,
    parse_geojson,
)
from histoloop.annotation_store.units import Unit
from histoloop.errors import InvalidArgument

SPOTS = [Unit(f"s{i}", 100.0 + 100 * i, 200.0, 55.0, "circle") for i in range(4)]
TILES = [Unit(f"r0_c{i}", 112.0 + 224 * i, 112.0, 224.0, "square") for i in range(3)]


def _doc(*features: dict) -> bytes:
    return json.dumps({"type": "FeatureCollection", "features": list(features)}).encode()


def _box(
    x0: float, y0: float, x1: float, y1: float, cls: str | None = "a", **props: object
) -> dict:
    ring = [[x0, y0], [x0, y1], [x1, y1], [x1, y0], [x0, y0]]
    if cls is not None:
        props["classification"] = {"name": cls, "color": [1, 2, 3]}
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": props,
    }


def test_spots_export_as_circles_at_their_true_diameter_and_round_trip() -> None:
    labels = {"s0": "a", "s1": "b", "s3": "a"}
    data = feature_collection(
        [GeoFeature(u, labels[u.barcode]) for u in SPOTS if u.barcode in labels],
        {"a": "#ff0000", "b": "#00ff00"},
        object_type="annotation",
    )
    doc = json.loads(data)
    first = doc["features"][0]
    assert first["properties"]["classification"] == {"name": "a", "color": [255, 0, 0]}
    polygon = shape(first["geometry"])
    assert len(first["geometry"]["coordinates"][0]) == CIRCLE_VERTICES + 1 and polygon.is_valid
    # a regular 32-gon inscribed in the spot: its area is within 1 % of the circle's
    assert polygon.area == pytest.approx(math.pi * 27.5**2, rel=0.01)
    parsed = parse_geojson(data, SPOTS, frame=(1000, 1000))
    assert {x.barcode: x.label for x in parsed.labels} == labels
    assert [x.row for x in parsed.labels] == ["features[0]", "features[1]", "features[2]"]


def test_a_polygon_labels_the_units_whose_centres_it_covers() -> None:
    qupath_array = json.dumps(
        [_box(0, 0, 400, 224, "tumour"), _box(400, 0, 700, 224, "help")]
    ).encode()
    parsed = parse_geojson(qupath_array, TILES)
    assert [(x.barcode, x.label) for x in parsed.labels] == [
        ("r0_c0", "tumour"),
        ("r0_c1", "tumour"),
    ]
    assert parsed.placeholders == ("r0_c2",)
    # a class drawn over a `help` square wins over the placeholder
    parsed = parse_geojson(
        _doc(_box(0, 0, 700, 224, "help"), _box(400, 0, 700, 224, "stroma")), TILES
    )
    assert [(x.barcode, x.label) for x in parsed.labels] == [("r0_c2", "stroma")]
    multi = {
        "type": "Feature",
        "properties": {"classification": {"name": "x"}},
        "geometry": {
            "type": "MultiPolygon",
            "coordinates": [
                [[[0, 0], [0, 224], [224, 224], [224, 0], [0, 0]]],
                [[[448, 0], [448, 224], [672, 224], [672, 0], [448, 0]]],
            ],
        },
    }
    assert [x.barcode for x in parse_geojson(json.dumps(multi).encode(), TILES).labels] == [
        "r0_c0",
        "r0_c2",
    ]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff", "not UTF-8"),
        (b"{", "not JSON"),
        (b'"text"', "not a JSON object or array"),
        (b'{"type": "GeometryCollection"}', "is not FeatureCollection or Feature"),
        (b'{"type": "FeatureCollection"}', "needs a 'features' array"),
        (_doc({"type": "Point"}), r"features\[0\]: not a Feature"),
        (
            _doc(
                _box(0, 0, 10, 10),
                {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}},
            ),
            r"features\[1\]: geometry 'Point' is not a Polygon",
        ),
        (
            _doc(
                {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1]]]}}
            ),
            r"features\[0\]: malformed coordinates",
        ),
        (
            _doc(
                {
                    "type": "Feature",
                    "properties": {"classification": {"name": "a"}},
                    "geometry": {
                        "type": "Polygon",
                        "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]],
                    },
                }
            ),
            r"features\[0\]: invalid polygon \(Self-intersection",
        ),
        (_doc(_box(0, 0, 10, 10, None)), r"features\[0\]: the polygon has no classification"),
        (_doc(_box(-5, 0, 10, 10)), r"features\[0\]: coordinates \(-5, 0\)"),
        (
            _doc(_box(0, 0, 10, 10), _box(0, 0, 2000, 10)),
            r"features\[1\]: coordinates .* off the 1000×1000 slide",
        ),
        (_doc(_box(0, 0, 10, 10, objectType="detection")), r"features\[0\]: a detection"),
        (
            _doc(_box(0, 0, 300, 224, "a"), _box(100, 0, 200, 224, "b")),
            r"features\[0\] \('a'\) and features\[1\] \('b'\) overlap over unit 'r0_c0'",
        ),
    ],
)
def test_bad_documents_name_the_feature(data: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_geojson(data, TILES, frame=(1000, 1000))
