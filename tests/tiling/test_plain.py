"""Plain images as slides (PNG, JPEG, stripped TIFF), legacy ST spot files, and a Visium
``spatial/`` folder whose only image is ``tissue_hires_image.png``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from histoloop.artifacts.local import LocalArtifactStore
from histoloop.errors import InvalidArgument
from histoloop.formats.legacy_st import read_selection, spot_diameter, write_spaceranger
from histoloop.tiling import (
    BadPositionsFile,
    PatchSet,
    PlainImageReader,
    SlideReader,
    SlideUnreadable,
    open_slide,
    read_spatial,
    tile_visium,
)
from histoloop.tiling._visium import hires_scale


@pytest.fixture(scope="module")
def a1(shared_data: Path) -> Path:
    return shared_data / "her2st" / "A1"


@pytest.fixture(scope="module")
def a1_pixels(a1: Path) -> np.ndarray:
    return np.asarray(Image.open(a1 / "A1_HE_image_dark.png").convert("RGB"))


def test_png_reads_by_region_padded_with_white(a1: Path, a1_pixels: np.ndarray) -> None:
    with open_slide(a1 / "A1_HE_image_dark.png") as slide:
        assert isinstance(slide, PlainImageReader) and slide.vendor == "plain-pillow"
        assert slide.dimensions == (2000, 2138) and slide.level_count == 1 and slide.mpp is None
        np.testing.assert_array_equal(slide.read(0, 700, 900, 64, 32), a1_pixels[900:932, 700:764])
        edge = slide.read(0, 1990, -4, 20, 10)
        np.testing.assert_array_equal(edge[4:, :10], a1_pixels[0:6, 1990:2000])
        assert (edge[:4] == 255).all() and (edge[:, 10:] == 255).all()
        thumb, ds = slide.thumbnail(500)
        assert max(thumb.shape[:2]) == 500 and ds == pytest.approx(2138 / 500, rel=0.01)
    assert slide.require_mpp(0.5) == 0.5


@pytest.mark.parametrize("compression", [None, "zlib"], ids=["memmap", "deflate"])
def test_stripped_tiff_is_read_where_openslide_refuses_it(
    tmp_path: Path, a1_pixels: np.ndarray, compression: str | None
) -> None:
    crop = a1_pixels[800:1312, 600:1112]
    path = tmp_path / "he.tif"
    tifffile.imwrite(
        path,
        crop,
        photometric="rgb",
        compression=compression,
        rowsperstrip=64,
        resolution=(1e4 / 3.4767, 1e4 / 3.4767),
        resolutionunit="CENTIMETER",
    )
    with open_slide(path) as slide:
        assert isinstance(slide, PlainImageReader)
        assert slide.vendor == ("plain-tiff-memmap" if compression is None else "plain-tiff")
        assert slide.mpp == pytest.approx(3.4767, rel=1e-4)
        np.testing.assert_array_equal(slide.read(0, 10, 20, 100, 50), crop[20:70, 10:110])


def test_jpeg_and_pyramids_pick_their_reader(
    tmp_path: Path, a1_pixels: np.ndarray, shared_data: Path
) -> None:
    path = tmp_path / "he.jpg"
    Image.fromarray(a1_pixels[:256, :256]).save(path, quality=95)
    with open_slide(path) as slide:
        assert isinstance(slide, PlainImageReader) and slide.dimensions == (256, 256)
    with open_slide(shared_data / "wsi" / "CMU-1-Small-Region_pyramid_generic.tiff") as slide:
        assert isinstance(slide, SlideReader) and slide.level_count == 3


def test_truncated_png_fails_naming_the_file(tmp_path: Path, a1: Path) -> None:
    path = tmp_path / "cut.png"
    path.write_bytes((a1 / "A1_HE_image_dark.png").read_bytes()[:5000])
    with pytest.raises(SlideUnreadable, match="cut.png"):
        open_slide(path)


def test_legacy_st_selection_reads_as_space_ranger_positions(a1: Path, tmp_path: Path) -> None:
    spots = read_selection(a1 / "A1_selection.tsv")
    assert list(spots.columns) == [
        "barcode",
        "in_tissue",
        "array_row",
        "array_col",
        "pxl_row_in_fullres",
        "pxl_col_in_fullres",
    ]
    assert len(spots) == 348 and spots["barcode"].iloc[0] == "22x12" and spots["in_tissue"].all()
    # ST spots: 100 µm across on a 200 µm pitch; 31 px in the 2000-px PNG (SOURCES.md)
    assert spot_diameter(spots) * 2000 / 6954 == pytest.approx(31, abs=3)
    folder = write_spaceranger(a1 / "A1_selection.tsv", tmp_path / "spatial")
    again = read_spatial(folder)
    pd.testing.assert_frame_equal(again.positions, spots, check_exact=False, atol=1e-3)
    assert read_spatial(a1).positions_file.name == "A1_selection.tsv"  # detected in a folder

    bad = tmp_path / "X_selection.tsv"
    bad.write_text("x\ty\tpixel_x\tpixel_y\tselected\n1\t2\t3\t4\t1\n2\t2\tn/a\t4\t1\n")
    with pytest.raises(InvalidArgument, match=r"X_selection.tsv: column 'pixel_x' on line 3"):
        read_selection(bad)
    with pytest.raises(BadPositionsFile, match="pixel_x"):
        read_spatial(bad)


def test_visium_hires_png_is_the_slide_with_its_scale_factor(
    shared_data: Path, tmp_path: Path
) -> None:
    """A spatial/ folder with only tissue_hires_image.png tiles at slide_scale = tissue_hires_scalef."""
    source = shared_data / "dlpfc" / "151673" / "spatial"
    spatial = tmp_path / "spatial"
    shutil.copytree(source, spatial)
    factors = json.loads((source / "scalefactors_json.json").read_text())
    lowres = Image.open(source / "tissue_lowres_image.png").convert("RGB")
    ratio = factors["tissue_hires_scalef"] / factors["tissue_lowres_scalef"]
    hires = lowres.resize((round(lowres.width * ratio), round(lowres.height * ratio)))
    hires.save(spatial / "tissue_hires_image.png")
    scale = hires_scale(spatial)
    assert scale == factors["tissue_hires_scalef"]
    store = LocalArtifactStore(tmp_path / "store")
    result = tile_visium(
        spatial / "tissue_hires_image.png",
        spatial,
        store,
        "p/hires",
        scale=scale,
        patch_size=32,
        workers=1,
        chunk_size=4096,
    )
    patches = PatchSet.open(store, result.prefix)
    assert result.n_patches == 3639 and patches.patch_size == 32
    assert patches.index["on_tissue_mask"].mean() > 0.9


def test_tiling_step_uses_the_hires_png_when_no_slide_is_registered(
    shared_data: Path, tmp_path: Path
) -> None:
    from histoloop import events
    from histoloop.bus.embedded import EmbeddedBus
    from histoloop.tiling.step import TilingStep
    from histoloop.v1 import common_pb2, events_pb2

    source = shared_data / "dlpfc" / "151673" / "spatial"
    factors = json.loads((source / "scalefactors_json.json").read_text())
    positions = pd.read_csv(source / "tissue_positions_list.csv", header=None)
    positions = positions[positions[1] == 1].iloc[::40]  # 91 in-tissue spots
    lowres = Image.open(source / "tissue_lowres_image.png").convert("RGB")
    ratio = factors["tissue_hires_scalef"] / factors["tissue_lowres_scalef"]
    hires = lowres.resize((round(lowres.width * ratio), round(lowres.height * ratio)))
    store = LocalArtifactStore(tmp_path / "store")
    buffer = tmp_path / "hires.png"
    hires.save(buffer)
    store.put("in/spatial/tissue_hires_image.png", buffer.read_bytes())
    store.put(
        "in/spatial/tissue_positions_list.csv", positions.to_csv(header=False, index=False).encode()
    )
    store.put("in/spatial/scalefactors_json.json", json.dumps(factors).encode())
    bus = EmbeddedBus(tmp_path / "events.sqlite")
    TilingStep(store, bus, workers=1).on_registered(
        events_pb2.DatasetRegistered(
            meta=events.new_meta(project="p", dataset="d", producer="test"),
            kind=common_pb2.DATASET_KIND_VISIUM,
            spatial_uri_prefix=store.uri("in/spatial"),
        )
    )
    (record,) = bus.consumer("t", [events.TILES_READY]).poll(1.0)
    ready = events.decode(record)
    assert ready.n_tiles == len(positions) and ready.patches_uri  # patches cut from the hires PNG
