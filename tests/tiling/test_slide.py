"""Slide reading: direct JPEG decoding equals OpenSlide pixel for pixel; bad slides fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from histoloop.errors import InvalidArgument, NotFound
from histoloop.tiling import MissingMpp, SlideNotFound, SlideReader, SlideUnreadable, _jpeg


def _random_regions(rng: np.random.Generator, width: int, height: int, n: int) -> list[tuple]:
    regions = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(1, 400, 2))
        x = int(rng.integers(-w // 2, width - w // 2))
        y = int(rng.integers(-h // 2, height - h // 2))
        regions.append((x, y, w, h))
    # the corners and the far edges, partly outside the level
    regions += [(0, 0, 300, 300), (width - 100, height - 50, 300, 300), (-20, height - 10, 50, 50)]
    return regions


@pytest.mark.parametrize("slide", ["cmu_svs", "generic_tiff"])
def test_direct_level0_equals_openslide(slide: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(slide)
    rng = np.random.default_rng(0)
    with SlideReader(path) as reader:
        assert reader.direct_levels == [0]
        width, height = reader.dimensions
        for x, y, w, h in _random_regions(rng, width, height, 40):
            direct = reader.read(0, x, y, w, h)
            assert direct.shape == (h, w, 3) and direct.dtype == np.uint8
            np.testing.assert_array_equal(
                direct,
                reader.read_openslide(0, x, y, w, h),
                err_msg=f"{path.name} region {(x, y, w, h)}",
            )


def test_direct_upper_levels_equal_openslide_when_downsample_is_exact(exact_pyramid: Path) -> None:
    rng = np.random.default_rng(1)
    with SlideReader(exact_pyramid) as reader:
        assert reader.level_downsamples == [1.0, 2.0, 4.0]
        assert reader.direct_levels == [0, 1, 2]
        for level, (width, height) in enumerate(reader.level_dimensions):
            for x, y, w, h in _random_regions(rng, width, height, 15):
                np.testing.assert_array_equal(
                    reader.read(level, x, y, w, h), reader.read_openslide(level, x, y, w, h)
                )


def test_fractional_downsample_levels_use_openslide(generic_tiff: Path) -> None:
    # OpenSlide renders such levels at a sub-pixel offset, so only OpenSlide can match itself
    with SlideReader(generic_tiff) as reader:
        assert reader.level_downsamples[1] != 2.0
        assert 1 not in reader.direct_levels and 2 not in reader.direct_levels
        np.testing.assert_array_equal(
            reader.read(1, 100, 100, 64, 64), reader.read_openslide(1, 100, 100, 64, 64)
        )


def test_j2k_slide_falls_back_to_openslide(tcga_svs: Path) -> None:
    with SlideReader(tcga_svs) as reader:
        assert reader.direct_levels == []
        assert reader.level_count == 2
        patch = reader.read(1, 500, 500, 128, 128)
        assert patch.shape == (128, 128, 3) and patch.std() > 5  # real tissue, not blank
    with pytest.raises(SlideUnreadable, match="directly"):
        SlideReader(tcga_svs, backend="direct")


def test_verification_disables_a_level_that_decodes_differently(
    cmu_svs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # simulate a colour-transform mismatch: mark the Aperio RGB tiles as YCbCr
    real = _jpeg._adobe_app14
    monkeypatch.setattr(_jpeg, "_adobe_app14", lambda transform: real(1 - transform))
    with SlideReader(cmu_svs) as reader:
        assert reader.direct_levels == []
        np.testing.assert_array_equal(
            reader.read(0, 10, 10, 50, 50), reader.read_openslide(0, 10, 10, 50, 50)
        )
    with SlideReader(cmu_svs, verify=False) as reader:
        assert reader.direct_levels == [0]
        assert not np.array_equal(
            reader.read(0, 900, 900, 50, 50), reader.read_openslide(0, 900, 900, 50, 50)
        )


def test_openslide_backend_never_reads_directly(cmu_svs: Path) -> None:
    with SlideReader(cmu_svs, backend="openslide") as reader:
        assert reader.direct_levels == []


def test_best_level_is_the_lowest_resolution_not_above_the_need(generic_tiff: Path) -> None:
    with SlideReader(generic_tiff) as reader:
        assert reader.best_level(0.5) == 0
        assert reader.best_level(1.9) == 0
        assert reader.best_level(2.0) == 1  # 2.000337 within tolerance
        assert reader.best_level(3.9) == 1
        assert reader.best_level(4.0) == 2
        assert reader.best_level(100.0) == 2


def test_mpp(cmu_svs: Path, tcga_svs: Path) -> None:
    with SlideReader(cmu_svs) as reader:
        assert reader.mpp == pytest.approx(0.499)
        assert reader.require_mpp() == pytest.approx(0.499)
        assert reader.require_mpp(0.25) == 0.25
    with SlideReader(tcga_svs) as reader:
        assert reader.mpp is None
        with pytest.raises(MissingMpp) as err:
            reader.require_mpp(purpose="tile at 0.5 µm/px")
        message = str(err.value)
        assert str(tcga_svs) in message and "openslide.mpp-x" in message
        assert "slide_mpp=" in message
        assert isinstance(err.value, InvalidArgument)
        assert reader.require_mpp(0.5) == 0.5
        with pytest.raises(MissingMpp):
            reader.require_mpp(-1.0)


def test_missing_slide(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFound, match="nope.svs") as err:
        SlideReader(tmp_path / "nope.svs")
    assert isinstance(err.value, NotFound)


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.svs"
    path.write_text("not a slide\n" * 100)
    with pytest.raises(SlideUnreadable, match="notes.svs"):
        SlideReader(path)


@pytest.mark.parametrize("slide", ["cmu_svs", "generic_tiff"])
@pytest.mark.parametrize("fraction", [0.5, 0.97])
def test_truncated_slide(
    slide: str, fraction: float, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    src: Path = request.getfixturevalue(slide)
    data = src.read_bytes()
    path = tmp_path / f"truncated{src.suffix}"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SlideUnreadable, match="truncated") as err:
        SlideReader(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, InvalidArgument)


def test_tile_offsets_beyond_the_end_are_reported(tmp_path: Path, generic_tiff: Path) -> None:
    # the direct reader checks tile offsets itself: a file cut after its last directory
    # but before its last tiles keeps a readable TIFF structure
    data = generic_tiff.read_bytes()
    path = tmp_path / "cut.tiff"
    path.write_bytes(data[: int(len(data) * 0.97)])
    sizes = [(2220, 2967), (1110, 1483), (555, 741)]
    with pytest.raises(SlideUnreadable, match="truncated"):
        _jpeg.JpegTileReader(path, sizes)


def test_close_twice(cmu_svs: Path) -> None:
    reader = SlideReader(cmu_svs)
    reader.close()
    reader.close()
