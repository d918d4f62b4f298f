"""Checked at the door: what the loop could never use is refused up front, naming the field.

Every item of issue 12's list of smaller surprises has its careful-user behaviour here:
unknown names and ranges at CreateProject, datasets that cannot feed the feature set or
whose pixel columns are swapped, Loupe rows with empty labels, a reused batch id with other
content, a typo class, a bogus query set id, one query-size limit, the labels metric.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from PIL import Image
from prometheus_client import REGISTRY

from histoloop.acquisition.step import check_query_args
from histoloop.annotation_store.domain import ClassSpec, DatasetSpec, LoopSettings, SpotLabelInput
from histoloop.annotation_store.doors import check_feeds_features
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from histoloop.formats.vocab import MAX_QUERY_SIZE
from tests.annotation_store.conftest import LAYERS, barcode, new_project_id, write_spatial


@pytest.mark.parametrize(
    ("config", "field", "says"),
    [
        ({"strategy": "uncertainty"}, "config.strategy", "least_confidence"),
        ({"cold_start_strategy": "margin"}, "config.cold_start_strategy", "without a model"),
        ({"head": "mlpp"}, "config.head", "mlp"),
        ({"resampling": "sometimes"}, "config.resampling", "offline"),
        ({"consensus": "vote"}, "config.consensus", "majority"),
        ({"features": "rna"}, "config.features", "expression"),
        ({"query_size": MAX_QUERY_SIZE + 1}, "config.query_size", f"1..{MAX_QUERY_SIZE}"),
        ({"compactness": 2.0}, "config.compactness", "[0, 1]"),
        ({"smoothing": -0.1}, "config.smoothing", "[0, 1]"),
        ({"head": "multimodal"}, "config.head", "config.features"),
    ],
)
def test_create_project_refuses_names_and_ranges_no_service_implements(config, field, says) -> None:
    with pytest.raises(InvalidArgument) as err:
        LoopSettings.with_defaults(**config)
    assert str(err.value).startswith(field) and says in str(err.value)


def test_one_query_size_limit_for_projects_and_what_if_queries() -> None:
    LoopSettings.with_defaults(query_size=MAX_QUERY_SIZE)
    check_query_args("p", MAX_QUERY_SIZE)
    check_query_args("p", 0)  # 0: the project's own size
    with pytest.raises(InvalidArgument, match=f"1..{MAX_QUERY_SIZE}"):
        check_query_args("p", MAX_QUERY_SIZE + 1)


@pytest.mark.parametrize(
    ("features", "kind", "slide", "counts", "field"),
    [
        ("morphology", "visium", "", "counts.h5", "slide_path"),
        ("expression", "visium", "slide.svs", "", "expression_path"),
        ("multimodal", "visium", "slide.svs", "", "expression_path"),
        ("multimodal", "visium", "", "counts.h5", "slide_path"),
        ("expression", "wsi", "slide.svs", "", "kind"),
    ],
)
def test_a_dataset_that_cannot_feed_the_feature_set_is_refused(
    features, kind, slide, counts, field
) -> None:
    with pytest.raises(FailedPrecondition) as err:
        check_feeds_features(features=features, kind=kind, slide_path=slide, expression_path=counts)
    assert str(err.value).startswith(field) and "UpdateProject" in str(err.value)
    check_feeds_features(
        features="multimodal", kind="visium", slide_path="s.svs", expression_path="c.h5"
    )


def test_swapped_pixel_columns_are_refused_and_nothing_is_stored(
    repo: AnnotationRepository, artifacts: LocalArtifactStore, tmp_path: Path
) -> None:
    codes = [barcode(i) for i in range(40)]
    good = write_spatial(tmp_path / "good" / "spatial", codes)  # pxl_row ≤ 490, pxl_col ≤ 395
    swapped = tmp_path / "swapped" / "spatial"
    swapped.mkdir(parents=True)
    lines = (good / "tissue_positions.csv").read_text().splitlines()
    header, rows = lines[0].split(","), [line.split(",") for line in lines[1:]]
    swapped_rows = [r[:4] + [r[5], r[4]] for r in rows]
    (swapped / "tissue_positions.csv").write_text(
        "\n".join([",".join(header)] + [",".join(r) for r in swapped_rows]) + "\n"
    )
    (swapped / "scalefactors_json.json").write_text((good / "scalefactors_json.json").read_text())
    slide = tmp_path / "slide.png"
    Image.new("RGB", (420, 520), "white").save(slide)  # width 420 (columns), height 520 (rows)
    pid = new_project_id()
    repo.create_project(pid, "x", [ClassSpec("A")], LoopSettings())
    with pytest.raises(InvalidArgument) as err:
        repo.register_dataset(
            DatasetSpec(
                project_id=pid,
                dataset_id="d1",
                kind="visium",
                spatial_dir=str(swapped),
                slide_path=str(slide),
            )
        )
    assert "tissue_positions.csv" in str(err.value) and "swapped" in str(err.value)
    assert repo.get_project(pid).datasets == ()
    assert not list(artifacts.list(f"datasets/{pid}/"))
    info = repo.register_dataset(
        DatasetSpec(
            project_id=pid,
            dataset_id="d1",
            kind="visium",
            spatial_dir=str(good),
            slide_path=str(slide),
        )
    )
    assert info.n_spots == 40


def test_loupe_rows_with_empty_labels_are_skipped_and_said_so(
    repo: AnnotationRepository, project: str
) -> None:
    csv = f"Barcode,Pathologist\n{barcode(1)},Layer1\n{barcode(2)},\n{barcode(3)},help\n".encode()
    result = repo.import_loupe_csv(project, "ds1", "b1", csv, annotator="alice")
    assert (result.n_labels, result.n_placeholders, result.n_empty) == (1, 1, 1)


def test_a_reused_batch_id_with_other_content_is_an_error(
    repo: AnnotationRepository, project: str
) -> None:
    first = [SpotLabelInput(barcode(1), "Layer1", "labels[0]")]
    repo.submit_labels(project, "ds1", "b1", first, annotator="alice")
    again = repo.submit_labels(project, "ds1", "b1", first, annotator="alice")
    assert again.duplicate  # a retry of the same batch is a no-op
    other = [SpotLabelInput(barcode(1), "Layer2", "labels[0]")]
    with pytest.raises(
        AlreadyExists, match=r"batch_id: 'b1' was committed before with different content"
    ):
        repo.submit_labels(project, "ds1", "b1", other, annotator="alice")
    assert repo.get_project(project).label_version == 1


def test_a_typo_class_is_not_created_even_with_add_missing_classes(
    repo: AnnotationRepository, project: str
) -> None:
    typo = [SpotLabelInput(barcode(1), "layer3 ", "csv line 2")]
    with pytest.raises(InvalidArgument, match=r"csv line 2: class 'layer3'.*did you mean 'Layer3'"):
        repo.submit_labels(project, "ds1", "b1", typo, annotator="alice", add_missing_classes=True)
    assert [c.name for c in repo.get_project(project).classes] == list(LAYERS)
    trailing = [SpotLabelInput(barcode(1), "Layer3 ", "csv line 2")]  # only a trailing space: fine
    assert repo.submit_labels(project, "ds1", "b2", trailing, annotator="alice").n_labels == 1


def test_a_bogus_queryset_id_is_refused(repo: AnnotationRepository, project: str) -> None:
    labels = [SpotLabelInput(barcode(1), "Layer1", "labels[0]")]
    with pytest.raises(NotFound, match="queryset_id: 'no-such-set'"):
        repo.submit_labels(
            project, "ds1", "b1", labels, annotator="alice", queryset_id="no-such-set"
        )
    assert repo.get_project(project).label_version == 0


def test_labels_committed_total_counts_every_committed_label(
    repo: AnnotationRepository, project: str
) -> None:
    def sample() -> float:
        return (
            REGISTRY.get_sample_value("histoloop_labels_committed_total", {"project": project})
            or 0.0
        )

    repo.submit_labels(
        project, "ds1", "b1", [SpotLabelInput(barcode(1), "Layer1", "r")], annotator="a"
    )
    repo.submit_labels(
        project,
        "ds1",
        "b2",
        [SpotLabelInput(barcode(2), "Layer1", "r"), SpotLabelInput(barcode(3), "WM", "r")],
        annotator="a",
    )
    repo.submit_labels(
        project,
        "ds1",
        "b2",
        [SpotLabelInput(barcode(2), "Layer1", "r"), SpotLabelInput(barcode(3), "WM", "r")],
        annotator="a",
    )
    assert sample() == 3  # the duplicate adds nothing


def test_model_metric_help_names_the_labels_it_has() -> None:
    from histoloop.metrics import MODEL_METRIC

    assert (
        "kappa" in MODEL_METRIC._documentation and "cohen_kappa" not in MODEL_METRIC._documentation
    )


def test_tiling_errors_name_the_users_file(tmp_path: Path) -> None:
    from histoloop import events
    from histoloop.bus.embedded import EmbeddedBus
    from histoloop.tiling.step import TilingStep
    from histoloop.v1 import common_pb2, events_pb2

    store = LocalArtifactStore(tmp_path / "artifacts")
    key = f"datasets/p/d/input/slide/my-scan-{uuid.uuid4().hex[:6]}.svs"
    store.put(key, b"not a slide at all")
    step = TilingStep(store, EmbeddedBus(tmp_path / "events.sqlite"))
    msg = events_pb2.DatasetRegistered(
        meta=events.new_meta(project="p", dataset="d", producer="t"),
        kind=common_pb2.DATASET_KIND_WSI,
        slide_uri=store.uri(key),
    )
    with pytest.raises(InvalidArgument) as err:
        step.on_registered(msg)
    name = key.rsplit("/", 1)[-1]
    assert name in str(err.value) and "histoloop-tiling-" not in str(err.value)
