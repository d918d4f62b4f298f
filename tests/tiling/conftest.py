"""Fixtures for the tiling tests: the real slides, a Visium-like dataset, a store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest

from histoloop.artifacts.local import LocalArtifactStore
from tests.tiling.synthetic import write_pyramid
from tests.tiling.visium_fake import make_visium


@pytest.fixture(scope="session")
def cmu_svs(shared_data: Path) -> Path:
    """Aperio SVS, JPEG tiles (RGB-encoded), one level, mpp 0.499."""
    return shared_data / "wsi" / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def generic_tiff(shared_data: Path) -> Path:
    """Generic tiled JPEG (YCbCr) TIFF, three levels with fractional downsamples."""
    return shared_data / "wsi" / "CMU-1-Small-Region_pyramid_generic.tiff"


@pytest.fixture(scope="session")
def tcga_svs(shared_data: Path) -> Path:
    """Aperio SVS with JPEG 2000 tiles and no mpp property."""
    return shared_data / "wsi" / "tcga-cr-7395-01a-01-ts1.svs"


@pytest.fixture(scope="session")
def exact_pyramid(tmp_path_factory: pytest.TempPathFactory, cmu_svs: Path) -> Path:
    """A JPEG pyramid with exact downsamples 1, 2, 4 (1024×768 crop of the CMU slide)."""
    with openslide.OpenSlide(str(cmu_svs)) as osr:
        base = np.asarray(osr.read_region((100, 300), 0, (1024, 768)).convert("RGB"))
    return write_pyramid(tmp_path_factory.mktemp("pyr") / "exact.tiff", base)


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    """An empty local artifact store."""
    return LocalArtifactStore(tmp_path / "store")


@pytest.fixture
def visium(tmp_path: Path, cmu_svs: Path) -> Path:
    """A Visium-like ``spatial/`` folder (tissue_positions.csv) on the CMU slide."""
    return make_visium(cmu_svs, tmp_path / "visium", flavour="header")
