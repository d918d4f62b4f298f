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

from histoloop.formats import positions as _formats
from histoloop.formats.positions import (
    POSITION_COLUMNS,
    POSITION_FILES,
    SCALEFACTORS_FILE,
    ScaleFactors,
    SpatialFileMissing,
    read_scalefactors,
)

__all__ = [
    "POSITION_COLUMNS",
    "ScaleFactors",
    "SpatialData",
    "read_positions",
    "read_scalefactors",
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

    Raises:
        SpatialFileMissing: the folder, the positions CSV or ``scalefactors_json.json`` is absent.
        BadPositionsFile: see :func:`read_positions`.
        BadScaleFactors: see :func:`read_scalefactors`.
    """
    spatial_dir = Path(spatial_dir)
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
