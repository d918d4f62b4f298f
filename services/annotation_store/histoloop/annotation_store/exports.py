"""Exports beyond the Loupe CSV (QuPath GeoJSON, a picture of the query) and GeoJSON labels.

Built on the repository's public operations; the servicer calls these for
``ExportLabels(format=…)``, for predictions "as annotator X" (``annotator_id``: each
unit's class by that annotator's model, which the prediction service stores with the
predictions) and ``ImportGeoJson`` (which commits the labels like any batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from histoloop.annotation_store.domain import HELP_LABEL, QuerySetRecord
from histoloop.annotation_store.geojson import (
    GeoFeature,
    GeoJsonImport,
    feature_collection,
    parse_geojson,
)
from histoloop.annotation_store.loupe import DEFAULT_PREDICTIONS_GROUP, predictions_csv
from histoloop.annotation_store.picture import query_png, slide_view
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.annotation_store.units import Unit
from histoloop.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "ExportFile",
    "ExportKind",
    "export_geojson",
    "export_png",
    "geojson_labels",
    "predictions_csv_as",
]

ExportKind = Literal["labels", "queryset", "predictions"]


@dataclass(frozen=True)
class ExportFile:
    """An exported file: its bytes, rows (units) and media type."""

    content: bytes
    n_rows: int
    media_type: str
    extension: str


def _query_units(
    repo: AnnotationRepository, project_id: str, dataset_id: str, queryset_id: str
) -> tuple[list[tuple[Unit, float, str]], str]:
    """The query set's units of this dataset, in query order: (unit, score, reason)."""
    record = repo.get_query_set(project_id, queryset_id)
    by_barcode = {u.barcode: u for u in repo.unit_layout(project_id, dataset_id).units}
    chosen = [
        (by_barcode[q.barcode], q.score, q.reason)
        for q in record.spots
        if q.dataset in ("", dataset_id) and q.barcode in by_barcode
    ]
    title = (
        f"{project_id}/{dataset_id}: round {record.round} query ({record.strategy}), "
        f"{len(chosen)} units in query order"
    )
    return chosen, title


def _predicted(
    repo: AnnotationRepository, record: QuerySetRecord, dataset_id: str, annotator_id: str
) -> dict[str, str]:
    """Barcode → predicted class of the query set's predictions, or as ``annotator_id``."""
    if not record.predictions_uri:
        raise FailedPrecondition(
            f"query set {record.queryset_id!r} carries no predictions (cold start?)"
        )
    if annotator_id:
        from histoloop.datasets import predicted_classes, read_predictions  # numpy: only here

        predictions = read_predictions(repo.artifacts, record.predictions_uri)
        return predicted_classes(predictions, dataset_id, annotator_id)
    if repo.predictions_loader is None:
        raise FailedPrecondition("the predictions export is not wired to a predictions reader")
    return dict(repo.predictions_loader(record.predictions_uri, dataset_id))


def predictions_csv_as(
    repo: AnnotationRepository,
    project_id: str,
    dataset_id: str,
    annotator_id: str,
    *,
    group: str = "",
    queryset_id: str = "",
) -> tuple[bytes, int]:
    """A dataset's predicted classes as ``annotator_id`` would label them, query spots ``help``.

    The Loupe CSV of :meth:`AnnotationRepository.export_predictions`, from the annotator's
    model instead of the consensus model.

    Raises:
        NotFound: the project, dataset, query set, or an annotator the model does not know.
        FailedPrecondition: no predictions yet, or a model without a per-annotator model.
    """
    record = repo.get_query_set(project_id, queryset_id)
    predicted = _predicted(repo, record, dataset_id, annotator_id)
    query = [q.barcode for q in record.spots if q.dataset in ("", dataset_id)]
    order = repo.unit_order(project_id, dataset_id, including=[*predicted, *query])
    return predictions_csv(predicted, query, group=group or DEFAULT_PREDICTIONS_GROUP, order=order)


def export_geojson(
    repo: AnnotationRepository,
    project_id: str,
    dataset_id: str,
    kind: ExportKind,
    *,
    queryset_id: str = "",
    annotator_id: str = "",
) -> ExportFile:
    """Labels, the query set or predictions of a dataset as a QuPath FeatureCollection.

    ``annotator_id`` (predictions only): the classes as that annotator would label the units.

    Raises:
        NotFound: the project, dataset, query set or annotator.
        FailedPrecondition: no predictions yet; tiles not known yet; no per-annotator model.
    """
    colors = {c.name: c.color for c in repo.get_project(project_id).classes}
    layout = repo.unit_layout(project_id, dataset_id)
    features: list[GeoFeature] = []
    if kind == "labels":
        consensus = repo.consensus(project_id, dataset_id=dataset_id).labels
        labels = {barcode: c.label for (_ds, barcode), c in consensus.items()}
        features = [GeoFeature(u, labels[u.barcode]) for u in layout.units if u.barcode in labels]
        object_type: Literal["annotation", "detection"] = "annotation"
    elif kind == "queryset":
        chosen, _title = _query_units(repo, project_id, dataset_id, queryset_id)
        features = [
            GeoFeature(
                u,
                HELP_LABEL,
                measurements={"query_rank": rank, "query_score": score},
                extra={"query_reason": reason},
            )
            for rank, (u, score, reason) in enumerate(chosen, start=1)
        ]
        object_type = "annotation"
    else:
        record = repo.get_query_set(project_id, queryset_id)
        predicted = _predicted(repo, record, dataset_id, annotator_id)
        ranks = {
            q.barcode: i
            for i, q in enumerate(
                (q for q in record.spots if q.dataset in ("", dataset_id)), start=1
            )
        }
        features = [
            GeoFeature(
                u,
                predicted[u.barcode],
                measurements={"query_rank": ranks[u.barcode]} if u.barcode in ranks else {},
            )
            for u in layout.units
            if u.barcode in predicted
        ]
        object_type = "detection"
    return ExportFile(
        content=feature_collection(features, colors, object_type=object_type),
        n_rows=len(features),
        media_type="application/geo+json",
        extension="geojson",
    )


def export_png(
    repo: AnnotationRepository, project_id: str, dataset_id: str, *, queryset_id: str = ""
) -> ExportFile:
    """The query units numbered in query order over the slide thumbnail or low-res image."""
    chosen, title = _query_units(repo, project_id, dataset_id, queryset_id)
    view = slide_view(repo.unit_layout(project_id, dataset_id), repo.artifacts)
    png = query_png(view, [u for u, _s, _r in chosen], title=title)
    return ExportFile(content=png, n_rows=len(chosen), media_type="image/png", extension="png")


def geojson_labels(
    repo: AnnotationRepository, project_id: str, dataset_id: str, data: bytes
) -> GeoJsonImport:
    """The labels QuPath annotations give a dataset's units (see :func:`geojson.parse_geojson`).

    Raises:
        InvalidArgument: a bad document or feature (named by index), nothing covered.
        NotFound: the project or dataset.
    """
    layout = repo.unit_layout(project_id, dataset_id)
    frame = slide_view(layout, repo.artifacts, image=False).size
    parsed = parse_geojson(data, layout.units, frame=frame)
    if not parsed.labels and not parsed.placeholders:
        raise InvalidArgument(
            f"geojson: none of its {parsed.n_features} features covers the centre of a unit of "
            f"dataset {dataset_id!r} (coordinates must be level-0 slide pixels)"
        )
    return parsed
