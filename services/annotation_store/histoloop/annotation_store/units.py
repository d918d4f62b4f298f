"""Labelled units and their geometry: Visium spots and whole-slide tissue tiles.

A WSI dataset's units are the tissue tiles the tiling service chose (its ``tiles.ready``
index is the one source of truth for the grid): the store ingests that index and keeps
one unit row per tile, ``r<row>_c<col>``, with its centre and side in level-0 pixels.
A Visium dataset's units are its spots (Space Ranger full-resolution pixels, mapped to
the slide's level-0 pixels by the dataset's ``slide_scale``).
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass
from typing import Literal

from histoloop.errors import InvalidArgument

__all__ = ["TILE_ID", "TileUnit", "Unit", "UnitLayout", "parse_tile_index"]

TILE_ID = re.compile(r"^r(\d+)_c(\d+)$")
"""A tile's id: ``r<grid row>_c<grid column>``."""

_REQUIRED = ("id", "cx", "cy", "size0")


@dataclass(frozen=True)
class TileUnit:
    """A tissue tile of a WSI grid, level-0 pixels."""

    tile_id: str
    grid_row: int
    grid_col: int
    cx: float
    cy: float
    side: float

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` in level-0 pixels."""
        h = self.side / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Unit:
    """A labelled unit as drawn: its centre and size in level-0 pixels of the slide.

    Attributes:
        barcode: the spot barcode or tile id.
        x: centre, level-0 pixels (column).
        y: centre, level-0 pixels (row).
        size: the spot's diameter or the tile's side, level-0 pixels.
        shape: ``circle`` (a spot) or ``square`` (a tile).
        in_tissue: whether Space Ranger (or the tissue mask) put it on tissue.
    """

    barcode: str
    x: float
    y: float
    size: float
    shape: Literal["circle", "square"]
    in_tissue: bool = True


@dataclass(frozen=True)
class UnitLayout:
    """Every unit of a dataset with what is needed to find it on the slide.

    Attributes:
        project_id: the project.
        dataset_id: the dataset.
        kind: ``visium`` or ``wsi``.
        slide_uri: the copied slide (empty: none).
        spatial_uri_prefix: the copied Space Ranger files (Visium; empty otherwise).
        slide_scale: slide level-0 pixels per Space Ranger full-resolution pixel.
        units: in registration order.
    """

    project_id: str
    dataset_id: str
    kind: str
    slide_uri: str
    spatial_uri_prefix: str
    slide_scale: float
    units: tuple[Unit, ...]


def parse_tile_index(data: bytes, *, source: str) -> list[TileUnit]:
    """The tiles of a ``tiles.ready`` index CSV (``id, …, size0, cx, cy[, grid_row, grid_col]``).

    Args:
        data: the CSV.
        source: its URI, for error messages.

    Raises:
        InvalidArgument: a missing column, a bad id or number — naming the row and field.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"{source}: the tile index is not UTF-8") from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in _REQUIRED if c not in (reader.fieldnames or ())]
    if missing:
        raise InvalidArgument(f"{source}: the tile index lacks column(s) {', '.join(missing)}")
    tiles: list[TileUnit] = []
    for line, row in enumerate(reader, start=2):
        tile_id = (row["id"] or "").strip()
        match = TILE_ID.match(tile_id)
        if match is None:
            raise InvalidArgument(f"{source} row {line}: id {tile_id!r} is not r<row>_c<col>")
        numbers = {}
        for name in ("cx", "cy", "size0"):
            try:
                value = float(row[name])
            except (TypeError, ValueError):
                raise InvalidArgument(
                    f"{source} row {line}: {name} {row[name]!r} is not a number"
                ) from None
            if not math.isfinite(value) or (name == "size0" and value <= 0):
                raise InvalidArgument(f"{source} row {line}: {name} {value!r} is out of range")
            numbers[name] = value
        tiles.append(
            TileUnit(
                tile_id=tile_id,
                grid_row=int(match.group(1)),
                grid_col=int(match.group(2)),
                cx=numbers["cx"],
                cy=numbers["cy"],
                side=numbers["size0"],
            )
        )
    return tiles
