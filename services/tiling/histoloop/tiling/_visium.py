"""Space Ranger ``spatial/`` folder: spot positions and scale factors.

Two flavours of the positions table exist: ``tissue_positions_list.csv`` (Space Ranger
< 2.0, no header) and ``tissue_positions.csv`` (Space Ranger ≥ 2.0, with a header). Both
have the columns barcode, in_tissue, array_row, array_col, pxl_row_in_fullres,
pxl_col_in_fullres; pixel positions are in Space Ranger's full-resolution image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from histoloop.errors import InvalidArgument
from histoloop.formats import positions as _formats
from histoloop.formats.legacy_st import find_selection_file, read_selection, spot_diameter
from histoloop.formats.positions import (
    HIRES_IMAGE,
    POSITION_COLUMNS,
    POSITION_FILES,
    SCALEFACTORS_FILE,
    BadPositionsFile,
    BadScaleFactors,
    ScaleFactors,
    SpatialFileMissing,
    read_scalefactors,
)

__all__ = [
    "HIRES_IMAGE",
    "POSITION_COLUMNS",
    "ScaleFactors",
    "SpatialData",
    "read_positions",
    "read_scalefactors",
    "hires_scale",
    "read_spatial",
]


@dataclass(frozen=True)
class SpatialData:
    """One Space Ranger ``spatial/`` folder.

    Attributes:
        positions: one row per spot, the six :data:`POSITION_COLUMNS` (barcode unique).
        scalefactors: the parsed ``scalefactors_json.json``.
        positions_file: the CSV read.
    """

    positions: pd.DataFrame
    scalefactors: ScaleFactors
    positions_file: Path


def read_positions(path: str | Path) -> pd.DataFrame:
    """Read a tissue positions CSV of either flavour (:mod:`histoloop.formats.positions`).

    Returns:
        One row per spot, the six :data:`POSITION_COLUMNS`.

    Raises:
        SpatialFileMissing: no such file.
        BadPositionsFile: see :func:`histoloop.formats.positions.parse_positions`.
    """
    return _formats.read_positions(path).to_frame()


def read_spatial(spatial_dir: str | Path) -> SpatialData:
    """Read a Space Ranger ``spatial/`` folder (``tissue_positions.csv`` preferred).

    A legacy Spatial Transcriptomics spot file (``*_selection.tsv``, or a folder holding one
    and no Space Ranger positions) is read as the same table, with the spot diameter
    estimated from the spot pitch (:mod:`histoloop.formats.legacy_st`).

    Raises:
        SpatialFileMissing: the folder, the positions CSV or ``scalefactors_json.json`` is absent.
        BadPositionsFile: see :func:`read_positions`.
        BadScaleFactors: see :func:`read_scalefactors`.
    """
    spatial_dir = Path(spatial_dir)
    try:
        selection = find_selection_file(spatial_dir)
        if selection is not None:
            positions = read_selection(selection)
            return SpatialData(
                positions, ScaleFactors(spot_diameter(positions), None, None), selection
            )
    except InvalidArgument as exc:
        raise BadPositionsFile(str(exc)) from exc
    if not spatial_dir.is_dir():
        raise SpatialFileMissing(f"spatial folder {spatial_dir} does not exist")
    for name in POSITION_FILES:
        if (spatial_dir / name).is_file():
            positions_file = spatial_dir / name
            break
    else:
        raise SpatialFileMissing(
            f"spatial folder {spatial_dir} has neither {' nor '.join(POSITION_FILES)}"
        )
    scalefactors = read_scalefactors(spatial_dir / SCALEFACTORS_FILE)
    return SpatialData(read_positions(positions_file), scalefactors, positions_file)


def hires_scale(spatial_dir: str | Path) -> float:
    """``tissue_hires_scalef``: the slide scale of ``spatial/tissue_hires_image.png``.

    Raises:
        SpatialFileMissing: no ``scalefactors_json.json``.
        BadScaleFactors: it has no ``tissue_hires_scalef``.
    """
    path = Path(spatial_dir) / SCALEFACTORS_FILE
    factors = read_scalefactors(path)
    if factors.tissue_hires_scalef is None:
        raise BadScaleFactors(
            f"{path}: field 'tissue_hires_scalef' is missing; it is needed to use "
            f"{HIRES_IMAGE} as the slide (or register the dataset with its slide_scale)"
        )
    return factors.tissue_hires_scalef
