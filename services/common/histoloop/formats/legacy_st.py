"""Legacy Spatial Transcriptomics spot files (``*_selection.tsv``) as a positions format.

The ST pipeline (st_spot_detector) writes one tab-separated row per spot::

    x  y  new_x  new_y  pixel_x  pixel_y  selected

``x``, ``y`` are the integer array coordinates (count matrices name spots ``<x>x<y>``),
``new_x``, ``new_y`` the adjusted (fractional) array coordinates, ``pixel_x``, ``pixel_y``
the spot centre in pixels of the H&E image the spots were detected on, and ``selected``
whether the spot is under tissue. :func:`read_selection` returns the same table as the
Space Ranger parser (barcode, in_tissue, array_row, array_col, pxl_row_in_fullres,
pxl_col_in_fullres), with ``barcode = "<x>x<y>"``; an image saved at another size than the
detection image is handled, as for Visium, with the dataset's slide scale (image px per
positions px). :func:`spot_diameter` estimates the spot diameter from the spot pitch (ST
spots are 100 µm across at a 200 µm centre-to-centre pitch), and :func:`write_spaceranger`
writes both as a Space Ranger ``spatial/`` folder, so every later stage reads one format.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from histoloop.errors import InvalidArgument, NotFound

__all__ = [
    "LEGACY_ST_COLUMNS",
    "POSITIONS_FORMATS",
    "SELECTION_SUFFIX",
    "find_selection_file",
    "is_selection_file",
    "read_selection",
    "spaceranger_folder",
    "spot_diameter",
    "write_spaceranger",
]

LEGACY_ST_COLUMNS = ("x", "y", "pixel_x", "pixel_y")
"""The columns a selection file must have (``new_x``, ``new_y``, ``selected`` are optional)."""
SELECTION_SUFFIX = "_selection.tsv"
POSITIONS_FORMATS = ("", "spaceranger", "legacy-st")
"""Values of ``RegisterDatasetRequest.positions_format`` ("" = detect)."""
DIAMETER_PER_PITCH = 0.5
"""ST spot diameter / centre-to-centre pitch (100 µm / 200 µm)."""


def is_selection_file(path: str | Path) -> bool:
    """Whether ``path`` is a legacy ST spot file: named ``*_selection.tsv``, or a TSV whose
    header has x, y, pixel_x and pixel_y."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.name.endswith(SELECTION_SUFFIX):
        return True
    if path.suffix.lower() not in (".tsv", ".txt"):
        return False
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        header = [c.strip().strip('"') for c in fh.readline().rstrip("\n").split("\t")]
    return set(LEGACY_ST_COLUMNS) <= set(header)


def find_selection_file(spatial: str | Path) -> Path | None:
    """The legacy ST spot file of ``spatial``: the file itself, or the single
    ``*_selection.tsv`` in a folder without Space Ranger positions; None otherwise.

    Raises:
        InvalidArgument: a folder holds several ``*_selection.tsv`` files.
    """
    spatial = Path(spatial)
    if spatial.is_file():
        return spatial if is_selection_file(spatial) else None
    if not spatial.is_dir() or any(
        (spatial / n).is_file() for n in ("tissue_positions.csv", "tissue_positions_list.csv")
    ):
        return None
    found = sorted(spatial.glob("*" + SELECTION_SUFFIX))
    if len(found) > 1:
        raise InvalidArgument(
            f"spatial folder {spatial} holds several legacy ST spot files "
            f"({', '.join(p.name for p in found)}); keep one per dataset"
        )
    return found[0] if found else None


def read_selection(path: str | Path, *, keep_extra: bool = False) -> pd.DataFrame:
    """Read a legacy ST ``*_selection.tsv`` as the Space Ranger positions table.

    Args:
        path: the spot file.
        keep_extra: also return the file's other columns (``new_x``, ``new_y``, …) after
            the six position columns.

    Returns:
        One row per spot: ``barcode`` (``"<x>x<y>"``), ``in_tissue`` (``selected``, 1 when
        the column is absent), ``array_row`` = y, ``array_col`` = x,
        ``pxl_row_in_fullres`` = pixel_y, ``pxl_col_in_fullres`` = pixel_x.

    Raises:
        NotFound: no such file.
        InvalidArgument: a missing column, a non-numeric or non-integer value, a
            ``selected`` flag other than 0/1, or a repeated spot; the message names the
            file, column and line.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"legacy ST spot file {path} does not exist")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"legacy ST spot file {path} is not a readable TSV: {exc}") from exc
    df.columns = [str(c).strip().strip('"') for c in df.columns]
    missing = [c for c in LEGACY_ST_COLUMNS if c not in df.columns]
    if missing:
        raise InvalidArgument(
            f"legacy ST spot file {path}: missing column(s) {', '.join(map(repr, missing))}; "
            f"expected {', '.join(LEGACY_ST_COLUMNS)} (found {', '.join(df.columns)})"
        )
    if df.empty:
        raise InvalidArgument(f"legacy ST spot file {path} has no spots")
    numbers: dict[str, np.ndarray] = {}
    for col in (*LEGACY_ST_COLUMNS, *(["selected"] if "selected" in df.columns else [])):
        values = pd.to_numeric(df[col].str.strip(), errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if col in ("x", "y", "selected"):
            bad |= np.where(np.isfinite(values), values % 1 != 0, True)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            kind = "an integer" if col in ("x", "y", "selected") else "a number"
            raise InvalidArgument(
                f"legacy ST spot file {path}: column {col!r} on line {i + 2} is "
                f"{df[col].iloc[i]!r}, not {kind}"
            )
        numbers[col] = values
    selected = numbers.get("selected", np.ones(len(df)))
    if not np.isin(selected, (0, 1)).all():
        i = int(np.flatnonzero(~np.isin(selected, (0, 1)))[0])
        raise InvalidArgument(
            f"legacy ST spot file {path}: column 'selected' on line {i + 2} is "
            f"{df['selected'].iloc[i]!r}, not 0 or 1"
        )
    x, y = numbers["x"].astype(np.int64), numbers["y"].astype(np.int64)
    out = pd.DataFrame(
        {
            "barcode": [f"{a}x{b}" for a, b in zip(x.tolist(), y.tolist(), strict=True)],
            "in_tissue": selected.astype(np.int64),
            "array_row": y,
            "array_col": x,
            "pxl_row_in_fullres": numbers["pixel_y"],
            "pxl_col_in_fullres": numbers["pixel_x"],
        }
    )
    dup = out["barcode"].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise InvalidArgument(
            f"legacy ST spot file {path}: spot {out['barcode'].iloc[i]} (x, y) repeats on line {i + 2}"
        )
    if keep_extra:
        extra = [c for c in df.columns if c not in LEGACY_ST_COLUMNS and c != "selected"]
        for col in extra:
            converted = pd.to_numeric(df[col], errors="coerce")
            out[col] = converted if converted.notna().all() else df[col]
    return out


def spot_diameter(positions: pd.DataFrame) -> float:
    """The spot diameter in position pixels: half the spot pitch.

    The pitch is the median distance from each spot to its nearest neighbour (ST spots are
    100 µm across on a 200 µm grid).

    Raises:
        InvalidArgument: fewer than two spots, or every spot at one place.
    """
    from scipy.spatial import cKDTree

    xy = positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=float)
    if len(xy) < 2:
        raise InvalidArgument("a spot diameter needs at least two spots to measure the pitch")
    dist, _ = cKDTree(xy).query(xy, k=2)
    pitch = float(np.median(dist[:, 1]))
    if not pitch > 0:
        raise InvalidArgument("every spot of the positions table lies at one place")
    return pitch * DIAMETER_PER_PITCH


def write_spaceranger(selection: str | Path, out_dir: str | Path) -> Path:
    """Write a legacy ST spot file as a Space Ranger ``spatial/`` folder.

    Writes ``tissue_positions.csv`` (with header) and ``scalefactors_json.json``
    (``spot_diameter_fullres`` from :func:`spot_diameter`; no image scale factors).

    Returns:
        ``out_dir``.

    Raises:
        NotFound, InvalidArgument: see :func:`read_selection` and :func:`spot_diameter`.
    """
    positions = read_selection(selection)
    diameter = spot_diameter(positions)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    positions.to_csv(
        out / "tissue_positions.csv", index=False, quoting=csv.QUOTE_MINIMAL, float_format="%.4f"
    )
    (out / "scalefactors_json.json").write_text(
        json.dumps(
            {
                "spot_diameter_fullres": diameter,
                "legacy_st_source": Path(selection).name,
            }
        )
    )
    return out


@contextmanager
def spaceranger_folder(spatial: str, positions_format: str = "") -> Iterator[str]:
    """``spatial`` as a Space Ranger ``spatial/`` folder, converted while the block runs.

    Args:
        spatial: a Space Ranger folder, a legacy ST spot file, or a folder holding one.
        positions_format: see :data:`POSITIONS_FORMATS`; "" detects legacy ST files.

    Yields:
        ``spatial`` itself for Space Ranger input (or ""), else a temporary folder with the
        converted ``tissue_positions.csv`` and ``scalefactors_json.json``.

    Raises:
        InvalidArgument: an unknown format, or ``legacy-st`` without a spot file; and the
            errors of :func:`write_spaceranger`.
    """
    if positions_format not in POSITIONS_FORMATS:
        raise InvalidArgument(
            f"positions_format: {positions_format!r} is not one of "
            f"{', '.join(repr(f) for f in POSITIONS_FORMATS)}"
        )
    selection = None
    if spatial and positions_format != "spaceranger":
        selection = find_selection_file(spatial)
        if selection is None and positions_format == "legacy-st":
            raise InvalidArgument(
                f"spatial_dir: {spatial!r} is not a legacy ST spot file (*{SELECTION_SUFFIX} with "
                f"columns {', '.join(LEGACY_ST_COLUMNS)}) nor a folder holding one"
            )
    if selection is None:
        yield spatial
        return
    with tempfile.TemporaryDirectory(prefix="histoloop-legacy-st-") as tmp:
        yield str(write_spaceranger(selection, Path(tmp) / "spatial"))
