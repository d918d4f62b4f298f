"""Visium: Space Ranger spatial files, spot → pixel mapping, patches stored by chunk."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histoloop.artifacts import ArtifactExists
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.errors import InvalidArgument, NotFound
from histoloop.tiling import (
    BadPositionsFile,
    BadScaleFactors,
    PatchSet,
    PositionsOutsideSlide,
    ScaleMismatch,
    SpatialFileMissing,
    read_spatial,
    tile_visium,
)
from tests.tiling.synthetic import write_pyramid
from tests.tiling.visium_fake import HEADER, make_visium


def _positions(spatial: Path) -> pd.DataFrame:
    return read_spatial(spatial).positions


# -- reading spatial/ --------------------------------------------------------------------


def test_real_dlpfc_spatial(shared_data: Path) -> None:
    data = read_spatial(shared_data / "dlpfc" / "151510" / "spatial")
    assert data.positions_file.name == "tissue_positions_list.csv"
    assert len(data.positions) == 4992
    assert int(data.positions["in_tissue"].sum()) == 4634
    assert list(data.positions.columns) == [
        "barcode",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]
    assert data.positions["array_row"].between(0, 77).all()
    assert data.positions["array_col"].between(0, 127).all()
    assert data.scalefactors.spot_diameter_fullres == pytest.approx(96.89, abs=0.01)
    assert data.scalefactors.tissue_lowres_scalef == pytest.approx(0.045004502)


def test_both_csv_flavours_read_the_same(tmp_path: Path, cmu_svs: Path) -> None:
    a = _positions(make_visium(cmu_svs, tmp_path / "a", flavour="header"))
    b = _positions(make_visium(cmu_svs, tmp_path / "b", flavour="list"))
    pd.testing.assert_frame_equal(a, b)
    # hexagonal array: array_col has the parity of array_row
    assert ((a["array_row"] - a["array_col"]) % 2 == 0).all()


def test_missing_scalefactors(visium: Path) -> None:
    (visium / "scalefactors_json.json").unlink()
    with pytest.raises(SpatialFileMissing, match="scalefactors_json.json") as err:
        read_spatial(visium)
    assert isinstance(err.value, NotFound)


def test_missing_spatial_folder_and_positions(tmp_path: Path, visium: Path) -> None:
    with pytest.raises(SpatialFileMissing, match="nowhere"):
        read_spatial(tmp_path / "nowhere")
    (visium / "tissue_positions.csv").unlink()
    with pytest.raises(SpatialFileMissing, match="tissue_positions_list.csv"):
        read_spatial(visium)


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"tissue_hires_scalef": 0.1}, "spot_diameter_fullres"),
        ({"spot_diameter_fullres": "big"}, "spot_diameter_fullres"),
        ({"spot_diameter_fullres": 90.0, "tissue_lowres_scalef": -1}, "tissue_lowres_scalef"),
    ],
)
def test_bad_scalefactors(visium: Path, content: dict, field: str) -> None:
    (visium / "scalefactors_json.json").write_text(json.dumps(content))
    with pytest.raises(BadScaleFactors, match=field) as err:
        read_spatial(visium)
    assert "scalefactors_json.json" in str(err.value)
    (visium / "scalefactors_json.json").write_text("{not json")
    with pytest.raises(BadScaleFactors, match="JSON"):
        read_spatial(visium)


def test_positions_with_wrong_columns(visium: Path) -> None:
    path = visium / "tissue_positions.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([HEADER.replace("pxl_row_in_fullres", "pxl_row"), *lines[1:]]))
    with pytest.raises(BadPositionsFile, match="pxl_row_in_fullres") as err:
        read_spatial(visium)
    assert "tissue_positions.csv" in str(err.value)
    assert isinstance(err.value, InvalidArgument)


def test_positions_without_header_and_too_few_columns(visium: Path) -> None:
    lines = (visium / "tissue_positions.csv").read_text().splitlines()[1:]
    (visium / "tissue_positions.csv").unlink()
    short = [",".join(line.split(",")[:5]) for line in lines]
    (visium / "tissue_positions_list.csv").write_text("\n".join(short))
    with pytest.raises(BadPositionsFile, match="5 columns") as err:
        read_spatial(visium)
    assert "tissue_positions_list.csv" in str(err.value)


@pytest.mark.parametrize(
    ("column", "value", "match"),
    [
        (4, "abc", "pxl_row_in_fullres"),
        (1, "2", "in_tissue"),
        (2, "1.5", "array_row"),
        (0, "", "barcode"),
    ],
)
def test_positions_with_bad_values(visium: Path, column: int, value: str, match: str) -> None:
    path = visium / "tissue_positions.csv"
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    cells[column] = value
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines))
    with pytest.raises(BadPositionsFile, match=match) as err:
        read_spatial(visium)
    assert "line 4" in str(err.value)


# -- tiling ------------------------------------------------------------------------------


def test_tile_visium_end_to_end(visium: Path, cmu_svs: Path, store: LocalArtifactStore) -> None:
    progress: list[tuple[int, int]] = []
    result = tile_visium(
        cmu_svs,
        visium,
        store,
        "proj/ds1/tiles",
        chunk_size=32,
        workers=1,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    positions = _positions(visium)
    n_in = int(positions["in_tissue"].sum())
    assert result.n_patches == n_in > 30
    assert result.level == 0 and result.direct
    assert result.region_size == round(55 / 0.499)  # one spot diameter at context 1
    assert len(result.patch_keys) == -(-n_in // 32)
    assert set(result.keys) <= {info.key for info in store.list("proj/ds1/tiles/")}
    assert progress[0] == (0, n_in) and progress[-1] == (n_in, n_in)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)

    patches = PatchSet.open(store, "proj/ds1/tiles")
    assert patches.n == n_in and patches.patch_size == 224
    index = patches.index
    assert set(index["id"]) == set(positions.loc[positions["in_tissue"] == 1, "barcode"])
    for column in ("id", "chunk", "offset", "level", "x", "y", "size", "array_row", "array_col"):
        assert column in index.columns
    seen = 0
    for chunk in patches.iter_chunks():
        assert chunk.patches.dtype == np.uint8 and chunk.patches.shape[1:] == (224, 224, 3)
        assert len(chunk.patches) == len(chunk.index) <= 32
        seen += len(chunk.patches)
    assert seen == n_in
    # a patch is the region around its spot centre, resized
    row = index.iloc[5]
    manifest = patches.manifest
    assert manifest["reader"] == "direct-jpeg" and manifest["kind"] == "visium"
    centre = np.array([row["cx"], row["cy"]])
    assert np.all(np.abs(centre - (np.array([row["x"], row["y"]]) + row["size"] / 2)) <= 1)
    overlay = Image.open(io.BytesIO(store.get(result.overlay_key)))
    assert overlay.format == "PNG" and max(overlay.size) == 1024
    # artifacts are immutable: the same prefix cannot be written twice
    with pytest.raises(ArtifactExists):
        tile_visium(cmu_svs, visium, store, "proj/ds1/tiles", workers=1)


@pytest.mark.parametrize("slide", ["cmu_svs", "generic_tiff"])
def test_direct_and_openslide_paths_give_identical_patches(
    slide: str, visium: Path, store: LocalArtifactStore, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(slide)
    fast = tile_visium(path, visium, store, "fast", workers=1, context=1.5)
    slow = tile_visium(path, visium, store, "slow", workers=1, context=1.5, backend="openslide")
    assert fast.direct and not slow.direct
    a, b = PatchSet.open(store, "fast"), PatchSet.open(store, "slow")
    pd.testing.assert_frame_equal(a.index, b.index)
    np.testing.assert_array_equal(a.read_all(), b.read_all())


@pytest.mark.integration  # spawns worker processes
def test_parallel_workers_give_the_same_result(
    visium: Path, cmu_svs: Path, store: LocalArtifactStore
) -> None:
    calls: list[int] = []
    tile_visium(cmu_svs, visium, store, "one", chunk_size=16, workers=1)
    tile_visium(
        cmu_svs,
        visium,
        store,
        "two",
        chunk_size=16,
        workers=2,
        on_progress=lambda done, total: calls.append(done),
    )
    one, two = PatchSet.open(store, "one"), PatchSet.open(store, "two")
    pd.testing.assert_frame_equal(one.index, two.index)
    np.testing.assert_array_equal(one.read_all(), two.read_all())
    assert calls[-1] == two.n and len(calls) == len(two.chunk_keys) + 1


def test_csv_flavours_and_scale_factor(
    tmp_path: Path, cmu_svs: Path, store: LocalArtifactStore
) -> None:
    # Space Ranger's image at twice the slide's resolution → scale 0.5 gives the same patches
    same = make_visium(cmu_svs, tmp_path / "same", flavour="list")
    double = make_visium(cmu_svs, tmp_path / "double", flavour="header", fullres_factor=2.0)
    tile_visium(cmu_svs, same, store, "same", workers=1, patch_size=64)
    tile_visium(cmu_svs, double, store, "double", workers=1, patch_size=64, scale=0.5)
    a, b = PatchSet.open(store, "same"), PatchSet.open(store, "double")
    np.testing.assert_array_equal(a.read_all(), b.read_all())
    np.testing.assert_array_equal(a.index["id"], b.index["id"])


def test_level_choice_for_large_context(
    exact_pyramid: Path, tmp_path: Path, store: LocalArtifactStore
) -> None:
    # spots of 110 px × context 4 = 441 px → 112 px patches: downsample 3.9 → level 1 (ds 2)
    spatial = make_visium(exact_pyramid, tmp_path / "v")
    result = tile_visium(
        exact_pyramid,
        spatial,
        store,
        "ctx",
        workers=1,
        context=4,
        patch_size=112,
        outside="skip",
        check_tissue=False,
    )
    assert result.level == 1 and result.downsample == 2.0 and result.direct
    assert result.region_size == round(55 / 0.5 * 4 / 2)


def test_most_spots_outside_means_wrong_scale(
    visium: Path, cmu_svs: Path, store: LocalArtifactStore
) -> None:
    with pytest.raises(ScaleMismatch, match="scale") as err:
        tile_visium(cmu_svs, visium, store, "x", scale=3.0, workers=1)
    assert "outside" in str(err.value) and "tissue_positions.csv" in str(err.value)
    assert isinstance(err.value, InvalidArgument)


def test_most_spots_on_background_means_wrong_scale(
    visium: Path, cmu_svs: Path, store: LocalArtifactStore
) -> None:
    # scale 0.3 squeezes every spot into the slide's empty top-left corner
    with pytest.raises(ScaleMismatch, match="fall on tissue"):
        tile_visium(cmu_svs, visium, store, "x", scale=0.3, workers=1)
    result = tile_visium(cmu_svs, visium, store, "x", scale=0.3, workers=1, check_tissue=False)
    assert result.n_patches > 0


def test_some_spots_outside_the_slide(
    visium: Path, cmu_svs: Path, store: LocalArtifactStore
) -> None:
    path = visium / "tissue_positions.csv"
    df = pd.read_csv(path)
    first = df.index[df["in_tissue"] == 1][0]
    df.loc[first, "pxl_col_in_fullres"] = 99999
    df.to_csv(path, index=False)
    barcode = df.loc[first, "barcode"]
    with pytest.raises(PositionsOutsideSlide, match=barcode) as err:
        tile_visium(cmu_svs, visium, store, "x", workers=1)
    assert "2220×2967" in str(err.value)
    result = tile_visium(cmu_svs, visium, store, "x", workers=1, outside="skip")
    assert result.n_patches == int(df["in_tissue"].sum()) - 1
    assert barcode in result.warnings[0]


def test_real_dlpfc_positions_on_the_lowres_image(
    shared_data: Path, tmp_path: Path, store: LocalArtifactStore
) -> None:
    # no full-res DLPFC image exists here: the lowres PNG (as a tiled TIFF) stands in for
    # the slide, and tissue_lowres_scalef maps the full-res positions onto it
    spatial = shared_data / "dlpfc" / "151510" / "spatial"
    image = np.asarray(Image.open(spatial / "tissue_lowres_image.png").convert("RGB"))
    slide = write_pyramid(tmp_path / "lowres.tiff", image, levels=1, mpp=None, compression="none")
    factors = read_spatial(spatial).scalefactors
    result = tile_visium(
        slide,
        spatial,
        store,
        "dlpfc",
        scale=factors.tissue_lowres_scalef,
        patch_size=16,
        workers=1,
        chunk_size=1024,
    )
    assert result.n_patches == 4634 and not result.direct
    index = PatchSet.open(store, "dlpfc").index
    assert index["on_tissue_mask"].mean() > 0.5
    # the hires scale factor instead puts almost every spot off the 600 px image
    with pytest.raises(ScaleMismatch, match="4634"):
        tile_visium(
            slide,
            spatial,
            store,
            "bad",
            scale=factors.tissue_hires_scalef,
            patch_size=16,
            workers=1,
        )


def test_bad_options(visium: Path, cmu_svs: Path, store: LocalArtifactStore) -> None:
    for kwargs in (
        {"context": 0},
        {"patch_size": -1},
        {"scale": float("nan")},
        {"outside": "ignore"},
        {"workers": 0},
    ):
        with pytest.raises(InvalidArgument):
            tile_visium(cmu_svs, visium, store, "x", **kwargs)
