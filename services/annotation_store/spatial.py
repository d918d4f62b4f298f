"""Space Ranger ``spatial/`` folder: the spot table (barcodes, grid, pixels, in-tissue flag).

Space Ranger < 2.0 writes ``tissue_positions_list.csv`` without a header; 2.0 and later
write ``tissue_positions.csv`` with the header
``barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres``.
Both hold one row per array spot (in tissue or not).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

from histoloop.errors import InvalidArgument, NotFound
from histoloop.legacy_st import POSITION_COLUMNS

__all__ = ["POSITION_FILES", "SpotRow", "find_positions_file", "parse_positions"]

POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv")
_HEADER = list(POSITION_COLUMNS)
_MAX_POSITIONS_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class SpotRow:
    """One spot of the positions file."""

    barcode: str
    in_tissue: bool
    array_row: int
    array_col: int
    pxl_row: float
    pxl_col: float


def find_positions_file(spatial_dir: str | Path) -> Path:
    """The positions file of a ``spatial/`` folder (the newer name first).

    Raises:
        NotFound: the folder or both file names are missing.
    """
    folder = Path(spatial_dir)
    if not folder.is_dir():
        raise NotFound(f"spatial_dir: {str(folder)!r} is not a folder")
    for name in POSITION_FILES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    raise NotFound(f"spatial_dir: {str(folder)!r} has neither {' nor '.join(POSITION_FILES)}")


def parse_positions(data: bytes, *, source: str = "tissue_positions") -> list[SpotRow]:
    """Parse a positions file (with or without its header).

    Raises:
        InvalidArgument: naming the file and line of the first bad row (wrong column
            count, a non-number, an in-tissue flag other than 0/1, a repeated barcode), or
            an empty file.
    """
    if len(data) > _MAX_POSITIONS_BYTES:
        raise InvalidArgument(f"{source}: {len(data)} bytes is larger than {_MAX_POSITIONS_BYTES}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{source}: not UTF-8 (byte {exc.start})") from None
    rows: list[SpotRow] = []
    seen: dict[str, int] = {}
    for line_no, cells in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not cells or all(not c.strip() for c in cells):
            continue
        cells = [c.strip() for c in cells]
        if line_no == 1 and cells[0].lower() == "barcode":
            if [c.lower() for c in cells] != _HEADER:
                raise InvalidArgument(f"{source} line 1: header {cells} is not {_HEADER}")
            continue
        if len(cells) != 6:
            raise InvalidArgument(f"{source} line {line_no}: {len(cells)} columns, expected 6")
        barcode = cells[0]
        if not barcode:
            raise InvalidArgument(f"{source} line {line_no}: empty barcode")
        if barcode in seen:
            raise InvalidArgument(
                f"{source} line {line_no}: barcode {barcode} repeats line {seen[barcode]}"
            )
        seen[barcode] = line_no
        if cells[1] not in ("0", "1"):
            raise InvalidArgument(f"{source} line {line_no}: in_tissue {cells[1]!r} is not 0 or 1")
        try:
            rows.append(
                SpotRow(
                    barcode=barcode,
                    in_tissue=cells[1] == "1",
                    array_row=int(cells[2]),
                    array_col=int(cells[3]),
                    pxl_row=float(cells[4]),
                    pxl_col=float(cells[5]),
                )
            )
        except ValueError:
            raise InvalidArgument(
                f"{source} line {line_no}: a position is not a number: {cells[2:]}"
            ) from None
    if not rows:
        raise InvalidArgument(f"{source}: no spots")
    return rows
