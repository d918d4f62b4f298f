"""QuPath GeoJSON, in and out: units as polygons in level-0 slide pixels.

Out: a ``FeatureCollection`` QuPath opens as objects — spots as circles (polygons of
:data:`CIRCLE_VERTICES` vertices at their true diameter), tiles as squares —
``properties.objectType`` (``annotation`` for labels and query sets, which the pathologist
edits; ``detection`` for predictions), ``properties.classification = {name, color}`` with
the project's class colours, the query rank, score and reason as measurements. Query
units are classified ``help``, Loupe's placeholder: the pathologist re-classifies them.

In: annotations drawn (or re-classified) in QuPath. Each unit whose centre a classified
polygon covers takes that class; ``help`` polygons are placeholders. The document must
follow RFC 7946's structure (a FeatureCollection, a Feature or QuPath's plain array of
Features) with valid Polygon/MultiPolygon geometry; an unclassified polygon, polygons of
different classes over one unit, coordinates off the slide or a detection are errors that
name the feature index.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import shapely
from shapely.geometry import shape
from shapely.validation import explain_validity

from histoloop.annotation_store.domain import HELP_LABEL, SpotLabelInput
from histoloop.annotation_store.units import Unit
from histoloop.errors import InvalidArgument

__all__ = [
    "CIRCLE_VERTICES",
    "MAX_GEOJSON_BYTES",
    "GeoFeature",
    "GeoJsonImport",
    "feature_collection",
    "parse_geojson",
    "unit_polygon",
]

CIRCLE_VERTICES = 32
"""Vertices of the polygon drawn for a spot (QuPath's own ellipse ROIs export ~ this many)."""
MAX_GEOJSON_BYTES = 64 * 1024 * 1024
_POLYGONS = ("Polygon", "MultiPolygon")


@dataclass(frozen=True)
class GeoFeature:
    """One unit to export.

    Attributes:
        unit: the unit (its geometry).
        label: the class name (``help`` for a query unit).
        measurements: numbers QuPath shows in its measurement table.
        extra: further plain properties (the query reason, the dataset).
    """

    unit: Unit
    label: str
    measurements: Mapping[str, float] = field(default_factory=dict)
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GeoJsonImport:
    """Labels read from a QuPath GeoJSON document.

    Attributes:
        labels: one per unit covered by a classified polygon (row = ``features[i]``).
        placeholders: units covered only by ``help`` polygons.
        n_features: features in the document.
    """

    labels: tuple[SpotLabelInput, ...]
    placeholders: tuple[str, ...]
    n_features: int


def _rgb(color: str) -> list[int]:
    value = color.lstrip("#")
    if len(value) != 6:
        return [128, 128, 128]
    return [int(value[i : i + 2], 16) for i in (0, 2, 4)]


def unit_polygon(unit: Unit) -> list[list[list[float]]]:
    """The unit's outline as GeoJSON Polygon coordinates (one closed ring, counter-clockwise
    in image axes as RFC 7946's right-hand rule asks for the exterior)."""
    r = unit.size / 2
    if unit.shape == "square":
        ring = [
            [unit.x - r, unit.y - r],
            [unit.x - r, unit.y + r],
            [unit.x + r, unit.y + r],
            [unit.x + r, unit.y - r],
        ]
    else:
        ring = [
            [
                unit.x + r * math.cos(2 * math.pi * k / CIRCLE_VERTICES),
                unit.y - r * math.sin(2 * math.pi * k / CIRCLE_VERTICES),
            ]
            for k in range(CIRCLE_VERTICES)
        ]
    ring = [[round(x, 2), round(y, 2)] for x, y in ring]
    return [[*ring, ring[0]]]


def feature_collection(
    features: Sequence[GeoFeature],
    colors: Mapping[str, str],
    *,
    object_type: Literal["annotation", "detection"],
) -> bytes:
    """A QuPath-readable FeatureCollection of the given units.

    Args:
        features: the units with their class and measurements.
        colors: class name → ``#rrggbb`` (``help`` is drawn yellow).
        object_type: ``annotation`` (editable) or ``detection`` (many, read-only).
    """
    out = []
    for f in features:
        color = "#ffd700" if f.label == HELP_LABEL else colors.get(f.label, "#808080")
        props: dict[str, Any] = {
            "objectType": object_type,
            "name": f.unit.barcode,
            "classification": {"name": f.label, "color": _rgb(color)},
            "isLocked": False,
            "barcode": f.unit.barcode,
            **f.extra,
        }
        if f.measurements:
            props["measurements"] = {k: float(v) for k, v in f.measurements.items()}
        out.append(
            {
                "type": "Feature",
                "id": f.unit.barcode,
                "geometry": {"type": "Polygon", "coordinates": unit_polygon(f.unit)},
                "properties": props,
            }
        )
    return (json.dumps({"type": "FeatureCollection", "features": out}, indent=1) + "\n").encode()


def _features(doc: Any) -> list[Any]:
    if isinstance(doc, list):
        return doc
    if not isinstance(doc, dict):
        raise InvalidArgument("geojson: the document is not a JSON object or array")
    kind = doc.get("type")
    if kind == "FeatureCollection":
        features = doc.get("features")
        if not isinstance(features, list):
            raise InvalidArgument("geojson: a FeatureCollection needs a 'features' array")
        return features
    if kind == "Feature":
        return [doc]
    raise InvalidArgument(
        f"geojson: type {kind!r} is not FeatureCollection or Feature (RFC 7946 §3)"
    )


def _class_name(i: int, props: Mapping[str, Any]) -> str:
    cls = props.get("classification")
    name = cls.get("name") if isinstance(cls, dict) else cls if isinstance(cls, str) else None
    if not isinstance(name, str) or not name.strip():
        raise InvalidArgument(
            f"features[{i}]: the polygon has no classification; give it a class in QuPath "
            "(or delete it)"
        )
    return name.strip()


def parse_geojson(
    data: bytes,
    units: Sequence[Unit],
    *,
    frame: tuple[float, float] | None = None,
) -> GeoJsonImport:
    """Labels of the units whose centres classified polygons cover.

    Args:
        data: the GeoJSON document (UTF-8).
        units: the dataset's units, level-0 pixels.
        frame: the slide's ``(width, height)`` in level-0 pixels, if known; coordinates
            outside it (or negative ones) are refused.

    Raises:
        InvalidArgument: naming the feature index — see the module docstring.
    """
    if len(data) > MAX_GEOJSON_BYTES:
        raise InvalidArgument(f"geojson: {len(data)} bytes; at most {MAX_GEOJSON_BYTES}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidArgument("geojson: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"geojson: not JSON (line {exc.lineno}: {exc.msg})") from None
    features = _features(doc)
    polygons, classes = [], []
    for i, feature in enumerate(features):
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise InvalidArgument(f"features[{i}]: not a Feature object (RFC 7946 §3.2)")
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            raise InvalidArgument(f"features[{i}]: properties must be an object or null")
        if props.get("objectType") == "detection":
            raise InvalidArgument(
                f"features[{i}]: a detection (predictions are exported as detections); "
                "import annotations only"
            )
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict) or geometry.get("type") not in _POLYGONS:
            kind = geometry.get("type") if isinstance(geometry, dict) else geometry
            raise InvalidArgument(
                f"features[{i}]: geometry {kind!r} is not a Polygon or MultiPolygon"
            )
        try:
            polygon = shape(geometry)
        except (ValueError, TypeError, AttributeError, IndexError) as exc:
            raise InvalidArgument(f"features[{i}]: malformed coordinates ({exc})") from None
        if polygon.is_empty or not polygon.is_valid:
            raise InvalidArgument(f"features[{i}]: invalid polygon ({explain_validity(polygon)})")
        x0, y0, x1, y1 = polygon.bounds
        if (
            not all(math.isfinite(v) for v in (x0, y0, x1, y1))
            or x0 < 0
            or y0 < 0
            or (frame is not None and (x1 > frame[0] or y1 > frame[1]))
        ):
            where = f"the {frame[0]:.0f}×{frame[1]:.0f} slide" if frame else "the slide"
            raise InvalidArgument(
                f"features[{i}]: coordinates ({x0:.0f}, {y0:.0f})–({x1:.0f}, {y1:.0f}) lie off "
                f"{where} (level-0 pixels expected)"
            )
        classes.append(_class_name(i, props))
        polygons.append(polygon)

    points = shapely.points(np.array([[u.x, u.y] for u in units], dtype=float).reshape(-1, 2))
    tree = shapely.STRtree(polygons)
    unit_idx, poly_idx = tree.query(points, predicate="covered_by") if len(units) else ([], [])
    chosen: dict[int, int] = {}  # unit → the feature giving its class
    helped: set[int] = set()  # units under a ``help`` placeholder
    for u, p in sorted(
        zip(np.asarray(unit_idx).tolist(), np.asarray(poly_idx).tolist(), strict=True)
    ):
        if classes[p].lower() == HELP_LABEL:
            helped.add(u)
            continue
        held = chosen.setdefault(u, p)
        if classes[held] != classes[p]:
            a, b = sorted((held, p))
            raise InvalidArgument(
                f"features[{a}] ({classes[a]!r}) and features[{b}] ({classes[b]!r}) overlap "
                f"over unit {units[u].barcode!r}; one unit, one class"
            )
    labels = [
        SpotLabelInput(units[u].barcode, classes[p], row=f"features[{p}]")
        for u, p in sorted(chosen.items())
    ]
    placeholders = [units[u].barcode for u in sorted(helped - set(chosen))]
    return GeoJsonImport(
        labels=tuple(labels), placeholders=tuple(placeholders), n_features=len(features)
    )
