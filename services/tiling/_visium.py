"""Space Ranger ``spatial/`` folder: spot positions and scale factors.

Two flavours of the positions table exist: ``tissue_positions_list.csv`` (Space Ranger
< 2.0, no header) and ``tissue_positions.csv`` (Space Ranger ≥ 2.0, with a header). Both
have the columns barcode, in_tissue, array_row, array_col, pxl_row_in_fullres,
pxl_col_in_fullres; pixel positions are in Space Ranger's full-resolution image.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histoloop.errors import InvalidArgument
from histoloop.legacy_st import POSITION_COLUMNS, find_selection_file, read_selection, spot_diameter
from histoloop.tiling._errors import BadPositionsFile, BadScaleFactors, SpatialFileMissing

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

_INT_COLUMNS = ("in_tissue", "array_row", "array_col")
_PIXEL_COLUMNS = ("pxl_row_in_fullres", "pxl_col_in_fullres")
_POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
SCALEFACTORS_FILE = "scalefactors_json.json"
HIRES_IMAGE = "tissue_hires_image.png"
"""Space Ranger's high-resolution image: a plain PNG, usable as the slide."""


@dataclass(frozen=True)
class ScaleFactors:
    """``scalefactors_json.json``: the spot diameter and the hires/lowres image scales."""

    spot_diameter_fullres: float
    tissue_hires_scalef: float | None
    tissue_lowres_scalef: float | None
    fiducial_diameter_fullres: float | None = None


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
    """Read a tissue positions CSV of either flavour and check its columns and values.

    Raises:
        SpatialFileMissing: no such file.
        BadPositionsFile: wrong number or names of columns, non-numeric values, in_tissue
            outside {0, 1}, duplicate or empty barcodes; the message names file and field.
    """
    path = Path(path)
    if not path.is_file():
        raise SpatialFileMissing(f"positions file {path} does not exist")
    with open(path, encoding="utf-8-sig") as fh:
        first = fh.readline()
    header_cells = [c.strip().strip('"') for c in first.strip().split(",")]
    has_header = "barcode" in header_cells or not _looks_like_data(header_cells)
    try:
        df = pd.read_csv(path, header=0 if has_header else None, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BadPositionsFile(f"positions file {path} is not a readable CSV: {exc}") from exc
    if has_header:
        df.columns = [str(c).strip() for c in df.columns]
        missing = [c for c in POSITION_COLUMNS if c not in df.columns]
        if missing:
            raise BadPositionsFile(
                f"positions file {path}: missing column(s) {', '.join(map(repr, missing))}; "
                f"expected {', '.join(POSITION_COLUMNS)} (found {', '.join(map(str, df.columns))})"
            )
        df = df[list(POSITION_COLUMNS)]
    else:
        if df.shape[1] != len(POSITION_COLUMNS):
            raise BadPositionsFile(
                f"positions file {path}: {df.shape[1]} columns without a header; expected "
                f"{len(POSITION_COLUMNS)}: {', '.join(POSITION_COLUMNS)}"
            )
        df.columns = list(POSITION_COLUMNS)
    if df.empty:
        raise BadPositionsFile(f"positions file {path} has no spots")
    line0 = 2 if has_header else 1
    out = pd.DataFrame({"barcode": df["barcode"].str.strip()})
    for col in _INT_COLUMNS + _PIXEL_COLUMNS:
        values = pd.to_numeric(df[col].str.strip(), errors="coerce")
        bad = values.isna() | ~np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))
        if col in _INT_COLUMNS:
            bad |= values.fillna(0) % 1 != 0
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise BadPositionsFile(
                f"positions file {path}: column {col!r} has a non-numeric value "
                f"{df[col].iloc[i]!r} on line {i + line0}"
            )
        out[col] = values.astype(np.int64) if col in _INT_COLUMNS else values.astype(np.float64)
    bad_flag = ~out["in_tissue"].isin([0, 1])
    if bad_flag.any():
        i = int(np.flatnonzero(bad_flag.to_numpy())[0])
        raise BadPositionsFile(
            f"positions file {path}: column 'in_tissue' must be 0 or 1, got "
            f"{out['in_tissue'].iloc[i]} on line {i + line0}"
        )
    empty = out["barcode"] == ""
    if empty.any():
        i = int(np.flatnonzero(empty.to_numpy())[0])
        raise BadPositionsFile(f"positions file {path}: empty 'barcode' on line {i + line0}")
    dup = out["barcode"].duplicated()
    if dup.any():
        raise BadPositionsFile(
            f"positions file {path}: duplicate 'barcode' {out['barcode'][dup].iloc[0]!r}"
        )
    return out.reset_index(drop=True)


def _looks_like_data(cells: list[str]) -> bool:
    """A first line of a headerless file: a barcode, then numbers."""
    if len(cells) < 2:
        return False
    try:
        [float(c) for c in cells[1:]]
    except ValueError:
        return False
    return True


def read_scalefactors(path: str | Path) -> ScaleFactors:
    """Read ``scalefactors_json.json``.

    Raises:
        SpatialFileMissing: no such file.
        BadScaleFactors: not JSON, or ``spot_diameter_fullres`` missing or not a positive
            number (the scale fields are optional but must be positive numbers if present).
    """
    path = Path(path)
    if not path.is_file():
        raise SpatialFileMissing(
            f"{path} does not exist; Space Ranger writes {SCALEFACTORS_FILE} into spatial/ "
            "and it is needed for the spot diameter (spot_diameter_fullres)"
        )
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadScaleFactors(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BadScaleFactors(f"{path} must hold a JSON object")

    def number(name: str, required: bool) -> float | None:
        if name not in raw:
            if required:
                raise BadScaleFactors(f"{path}: field {name!r} is missing")
            return None
        value = raw[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0
        ):
            raise BadScaleFactors(f"{path}: field {name!r} must be a positive number, got {value!r}")
        return float(value)

    diameter = number("spot_diameter_fullres", True)
    assert diameter is not None
    return ScaleFactors(
        spot_diameter_fullres=diameter,
        tissue_hires_scalef=number("tissue_hires_scalef", False),
        tissue_lowres_scalef=number("tissue_lowres_scalef", False),
        fiducial_diameter_fullres=number("fiducial_diameter_fullres", False),
    )


def read_spatial(spatial_dir: str | Path) -> SpatialData:
    """Read a Space Ranger ``spatial/`` folder (``tissue_positions.csv`` preferred).

    A legacy Spatial Transcriptomics spot file (``*_selection.tsv``, or a folder holding one
    and no Space Ranger positions) is read as the same table, with the spot diameter
    estimated from the spot pitch (:mod:`histoloop.legacy_st`).

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
            return SpatialData(positions, ScaleFactors(spot_diameter(positions), None, None), selection)
    except InvalidArgument as exc:
        raise BadPositionsFile(str(exc)) from exc
    if not spatial_dir.is_dir():
        raise SpatialFileMissing(f"spatial folder {spatial_dir} does not exist")
    for name in _POSITION_FILES:
        if (spatial_dir / name).is_file():
            positions_file = spatial_dir / name
            break
    else:
        raise SpatialFileMissing(
            f"spatial folder {spatial_dir} has neither {' nor '.join(_POSITION_FILES)}"
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
