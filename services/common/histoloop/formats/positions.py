"""Space Ranger ``spatial/`` folder: the spot positions table and the scale factors.

The one parser of these files; the annotation store (at registration) and tiling both
call it, so a folder that registers is a folder that tiles.

Space Ranger < 2.0 writes ``tissue_positions_list.csv`` without a header; 2.0 and later
write ``tissue_positions.csv`` with a header naming the six columns
``barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres``. With a
header the columns may come in any order (extra columns are ignored); without one they
must be exactly those six, in that order. Pixel positions are in Space Ranger's
full-resolution image. Every error names the file and the line.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histoloop.errors import InvalidArgument, NotFound

__all__ = [
    "POSITION_COLUMNS",
    "POSITION_FILES",
    "HIRES_IMAGE",
    "SCALEFACTORS_FILE",
    "BadPositionsFile",
    "BadScaleFactors",
    "Positions",
    "ScaleFactors",
    "SpatialFileMissing",
    "SpotRow",
    "find_positions_file",
    "parse_positions",
    "parse_scalefactors",
    "read_positions",
    "read_scalefactors",
]

HIRES_IMAGE = "tissue_hires_image.png"
"""Space Ranger's high-resolution image: a plain PNG, usable as the slide (``tissue_hires_scalef``)."""
POSITION_COLUMNS = (
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
)
POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
"""The positions file names, the newer first (it wins when both are present)."""
SCALEFACTORS_FILE = "scalefactors_json.json"
_MAX_POSITIONS_BYTES = 512 * 1024 * 1024


class SpatialFileMissing(NotFound):
    """A Space Ranger ``spatial/`` file (positions CSV, ``scalefactors_json.json``) is absent."""


class BadPositionsFile(InvalidArgument):
    """The tissue positions CSV has wrong columns or values; the message names file and line."""


class BadScaleFactors(InvalidArgument):
    """``scalefactors_json.json`` is not valid JSON or lacks a needed numeric field."""


@dataclass(frozen=True)
class SpotRow:
    """One spot of the positions file."""

    barcode: str
    in_tissue: bool
    array_row: int
    array_col: int
    pxl_row: float
    pxl_col: float


@dataclass(frozen=True)
class Positions:
    """A parsed positions file: one entry per spot, in file order (barcodes unique).

    Attributes:
        rows: the spots.
        source: the file it was read from (for messages).
    """

    rows: tuple[SpotRow, ...]
    source: str

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[SpotRow]:
        return iter(self.rows)

    def to_frame(self) -> pd.DataFrame:
        """The six :data:`POSITION_COLUMNS` as a DataFrame (ints for flags and grid)."""
        return pd.DataFrame(
            {
                "barcode": pd.Series([r.barcode for r in self.rows], dtype=object),
                "in_tissue": np.fromiter(
                    (r.in_tissue for r in self.rows), np.int64, len(self.rows)
                ),
                "array_row": np.fromiter(
                    (r.array_row for r in self.rows), np.int64, len(self.rows)
                ),
                "array_col": np.fromiter(
                    (r.array_col for r in self.rows), np.int64, len(self.rows)
                ),
                "pxl_row_in_fullres": np.fromiter(
                    (r.pxl_row for r in self.rows), np.float64, len(self.rows)
                ),
                "pxl_col_in_fullres": np.fromiter(
                    (r.pxl_col for r in self.rows), np.float64, len(self.rows)
                ),
            }
        )


def find_positions_file(spatial_dir: str | Path) -> Path:
    """The positions file of a ``spatial/`` folder (the newer name first).

    Raises:
        SpatialFileMissing: the folder or both file names are missing (a :class:`NotFound`).
    """
    folder = Path(spatial_dir)
    if not folder.is_dir():
        raise SpatialFileMissing(f"spatial_dir: {str(folder)!r} is not a folder")
    for name in POSITION_FILES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    raise SpatialFileMissing(
        f"spatial_dir: {str(folder)!r} has neither {' nor '.join(POSITION_FILES)}"
    )


def _header_columns(cells: list[str], source: str) -> list[int]:
    """Column index of each of :data:`POSITION_COLUMNS` in a header line."""
    names = [c.strip().strip('"').lower() for c in cells]
    missing = [c for c in POSITION_COLUMNS if c not in names]
    if missing:
        raise BadPositionsFile(
            f"{source} line 1: missing column(s) {', '.join(map(repr, missing))}; expected "
            f"{', '.join(POSITION_COLUMNS)} in any order (found {', '.join(cells)})"
        )
    repeated = sorted({c for c in POSITION_COLUMNS if names.count(c) > 1})
    if repeated:
        raise BadPositionsFile(
            f"{source} line 1: column(s) {', '.join(map(repr, repeated))} repeat"
        )
    return [names.index(c) for c in POSITION_COLUMNS]


def _integer(value: str, column: str, where: str) -> int:
    try:
        number = float(value)
    except ValueError:
        raise BadPositionsFile(f"{where}: {column} {value!r} is not a number") from None
    if not math.isfinite(number) or number != int(number):
        raise BadPositionsFile(f"{where}: {column} {value!r} is not an integer")
    return int(number)


def _pixel(value: str, column: str, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise BadPositionsFile(f"{where}: {column} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise BadPositionsFile(f"{where}: {column} {value!r} is not a finite number")
    return number


def parse_positions(data: bytes, *, source: str = "tissue_positions") -> Positions:
    """Parse a positions file of either flavour.

    Args:
        data: the file's bytes (UTF-8, an optional BOM).
        source: the file's name for messages.

    Raises:
        BadPositionsFile: naming ``source`` and the line of the first bad row (a missing
            header column, a wrong column count, a non-number, an in-tissue flag other than
            0/1, an empty or repeated barcode), or an empty file. An :class:`InvalidArgument`.
    """
    if len(data) > _MAX_POSITIONS_BYTES:
        raise BadPositionsFile(f"{source}: {len(data)} bytes is larger than {_MAX_POSITIONS_BYTES}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadPositionsFile(f"{source}: not UTF-8 (byte {exc.start})") from None
    rows: list[SpotRow] = []
    seen: dict[str, int] = {}
    order: list[int] | None = None
    width = len(POSITION_COLUMNS)
    first = True
    for line_no, raw_cells in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not raw_cells or all(not c.strip() for c in raw_cells):
            continue
        cells = [c.strip() for c in raw_cells]
        if first:
            first = False
            if any(c.strip('"').lower() in POSITION_COLUMNS for c in cells):
                order = _header_columns(cells, source)
                width = len(cells)
                continue
        where = f"{source} line {line_no}"
        if len(cells) != width:
            raise BadPositionsFile(f"{where}: {len(cells)} columns, expected {width}")
        if order is not None:
            cells = [cells[i] for i in order]
        barcode = cells[0]
        if not barcode:
            raise BadPositionsFile(f"{where}: empty barcode")
        if barcode in seen:
            raise BadPositionsFile(f"{where}: barcode {barcode} repeats line {seen[barcode]}")
        seen[barcode] = line_no
        if cells[1] not in ("0", "1"):
            raise BadPositionsFile(f"{where}: in_tissue {cells[1]!r} is not 0 or 1")
        rows.append(
            SpotRow(
                barcode=barcode,
                in_tissue=cells[1] == "1",
                array_row=_integer(cells[2], "array_row", where),
                array_col=_integer(cells[3], "array_col", where),
                pxl_row=_pixel(cells[4], "pxl_row_in_fullres", where),
                pxl_col=_pixel(cells[5], "pxl_col_in_fullres", where),
            )
        )
    if not rows:
        raise BadPositionsFile(f"{source}: no spots")
    return Positions(rows=tuple(rows), source=source)


def read_positions(path: str | Path) -> Positions:
    """Read and parse a positions file (messages name its full path).

    Raises:
        SpatialFileMissing: no such file.
        BadPositionsFile: see :func:`parse_positions`.
    """
    path = Path(path)
    if not path.is_file():
        raise SpatialFileMissing(f"positions file {path} does not exist")
    return parse_positions(path.read_bytes(), source=str(path))


@dataclass(frozen=True)
class ScaleFactors:
    """``scalefactors_json.json``: the spot diameter and the hires/lowres image scales."""

    spot_diameter_fullres: float
    tissue_hires_scalef: float | None
    tissue_lowres_scalef: float | None
    fiducial_diameter_fullres: float | None = None


def parse_scalefactors(data: bytes, *, source: str = SCALEFACTORS_FILE) -> ScaleFactors:
    """Parse a ``scalefactors_json.json`` document.

    Raises:
        BadScaleFactors: not JSON, or ``spot_diameter_fullres`` missing or not a positive
            number (the scale fields are optional but must be positive numbers if present).
    """
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadScaleFactors(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BadScaleFactors(f"{source} must hold a JSON object")

    def number(name: str) -> float | None:
        if name not in raw:
            return None
        value = raw[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not (math.isfinite(value) and value > 0)
        ):
            raise BadScaleFactors(
                f"{source}: field {name!r} must be a positive number, got {value!r}"
            )
        return float(value)

    diameter = number("spot_diameter_fullres")
    if diameter is None:
        raise BadScaleFactors(f"{source}: field 'spot_diameter_fullres' is missing")
    return ScaleFactors(
        spot_diameter_fullres=diameter,
        tissue_hires_scalef=number("tissue_hires_scalef"),
        tissue_lowres_scalef=number("tissue_lowres_scalef"),
        fiducial_diameter_fullres=number("fiducial_diameter_fullres"),
    )


def read_scalefactors(path: str | Path) -> ScaleFactors:
    """Read ``scalefactors_json.json``.

    Raises:
        SpatialFileMissing: no such file.
        BadScaleFactors: see :func:`parse_scalefactors`.
    """
    path = Path(path)
    if not path.is_file():
        raise SpatialFileMissing(
            f"{path} does not exist; Space Ranger writes {SCALEFACTORS_FILE} into spatial/ "
            "and it is needed for the spot diameter (spot_diameter_fullres)"
        )
    return parse_scalefactors(path.read_bytes(), source=str(path))
