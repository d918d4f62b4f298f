"""Direct reading of JPEG-tiled TIFF levels: raw tile bytes (tifffile) + libjpeg-turbo.

OpenSlide spends most of a small region's cost outside JPEG decoding. For pyramid levels
stored as JPEG tiles in a TIFF (Aperio SVS, generic tiled TIFF, …) this module reads the
compressed tile bytes at the offsets the TIFF directory records, joins them with the
level's shared ``JPEGTables``, decodes them with simplejpeg (libjpeg-turbo, accurate
integer IDCT and fancy upsampling like OpenSlide's libjpeg defaults) and crops regions
from a small LRU cache of decoded tiles.

Colour space: OpenSlide tells libjpeg the colour space from the TIFF ``Photometric`` tag
rather than letting it guess from the JPEG stream. Aperio tiles are RGB-encoded without
a JFIF or Adobe marker and with component ids 0,1,2, which libjpeg would take for YCbCr.
An Adobe APP14 marker with the matching transform flag (0 = RGB, 1 = YCbCr) is inserted
after SOI so that libjpeg-turbo decodes exactly as OpenSlide does. :class:`SlideReader`
verifies one tile per level against OpenSlide when it opens a slide and falls back to
OpenSlide for any level that does not match.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
import tifffile

from histoloop.tiling._errors import SlideUnreadable

__all__ = ["JpegTiledLevel", "JpegTileReader"]

log = logging.getLogger(__name__)

_COMPRESSION_JPEG = 7
_PHOTOMETRIC_RGB = 2
_PHOTOMETRIC_YCBCR = 6
_PLANAR_CONTIG = 1


def _adobe_app14(transform: int) -> bytes:
    # APP14 "Adobe": version 100, flags0 0, flags1 0, colour transform (0 RGB, 1 YCbCr)
    return b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00" + bytes([transform])


@dataclass(frozen=True)
class JpegTiledLevel:
    """Where one pyramid level's JPEG tiles lie in the file."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    tiles_across: int
    tiles_down: int
    offsets: tuple[int, ...]
    byte_counts: tuple[int, ...]
    prefix: bytes
    """JPEG tables (without EOI) and the colour-transform marker, prepended to each tile."""


def _page_level(page: tifffile.TiffPage) -> JpegTiledLevel | None:
    """The direct-read description of a TIFF page, or None if it is not a JPEG-tiled RGB page."""
    if not page.is_tiled or page.compression != _COMPRESSION_JPEG:
        return None
    if page.samplesperpixel != 3 or page.bitspersample != 8 or page.planarconfig != _PLANAR_CONTIG:
        return None
    if page.photometric not in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
        return None
    if getattr(page, "imagedepth", 1) not in (0, 1):
        return None
    transform = 0 if page.photometric == _PHOTOMETRIC_RGB else 1
    tables = page.jpegtables or b""
    if tables and not (tables.startswith(b"\xff\xd8") and tables.endswith(b"\xff\xd9")):
        return None
    # SOI + APP14 + the tables' markers (without their SOI/EOI); each tile adds its own
    # markers after dropping its SOI
    prefix = b"\xff\xd8" + _adobe_app14(transform) + (tables[2:-2] if tables else b"")
    across = -(-page.imagewidth // page.tilewidth)
    down = -(-page.imagelength // page.tilelength)
    if len(page.dataoffsets) != across * down:
        return None
    return JpegTiledLevel(
        width=int(page.imagewidth),
        height=int(page.imagelength),
        tile_width=int(page.tilewidth),
        tile_height=int(page.tilelength),
        tiles_across=across,
        tiles_down=down,
        offsets=tuple(int(o) for o in page.dataoffsets),
        byte_counts=tuple(int(c) for c in page.databytecounts),
        prefix=prefix,
    )


def _candidate_pages(tif: tifffile.TiffFile) -> list[tifffile.TiffPage]:
    pages: list[tifffile.TiffPage] = []
    for page in tif.pages:
        if not isinstance(page, tifffile.TiffPage):
            continue
        pages.append(page)
        for sub in page.pages or []:  # SubIFD pyramids
            if isinstance(sub, tifffile.TiffPage):
                pages.append(sub)
    return pages


class JpegTileReader:
    """Reads regions of JPEG-tiled levels of one TIFF file without OpenSlide.

    Levels are numbered like OpenSlide's: ``level_sizes`` gives OpenSlide's level
    dimensions, and each is matched to the TIFF page of the same size. Levels without a
    JPEG-tiled page are absent from :attr:`levels`.

    Args:
        path: the slide file.
        level_sizes: OpenSlide's ``level_dimensions``.
        cache_tiles: how many decoded tiles to keep (LRU).
    """

    def __init__(
        self, path: str | Path, level_sizes: list[tuple[int, int]], *, cache_tiles: int = 128
    ) -> None:
        self.path = Path(path)
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_tiles = max(1, int(cache_tiles))
        self.levels: dict[int, JpegTiledLevel] = {}
        size = self.path.stat().st_size
        try:
            with tifffile.TiffFile(self.path) as tif:
                by_size: dict[tuple[int, int], JpegTiledLevel] = {}
                for page in _candidate_pages(tif):
                    key = (int(page.imagewidth), int(page.imagelength))
                    if key in by_size:
                        continue
                    level = _page_level(page)
                    if level is not None:
                        by_size[key] = level
        except (
            tifffile.TiffFileError,
            ValueError,
            OSError,
            KeyError,
            IndexError,
            struct.error,
        ) as exc:
            log.debug("%s: not readable by tifffile (%s); no direct JPEG levels", self.path, exc)
            by_size = {}
        for index, dims in enumerate(level_sizes):
            level = by_size.get((int(dims[0]), int(dims[1])))
            if level is None:
                continue
            ends = [o + c for o, c in zip(level.offsets, level.byte_counts, strict=True)]
            if ends and max(ends) > size:
                raise SlideUnreadable(
                    f"slide {self.path}: level {index} tiles extend to byte {max(ends)} but the "
                    f"file has {size} bytes (truncated file?)"
                )
            self.levels[index] = level
        self._fd = os.open(self.path, os.O_RDONLY) if self.levels else -1

    def close(self) -> None:
        """Close the file; safe to call twice."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._cache.clear()

    def disable(self, level: int) -> None:
        """Stop serving ``level`` (used when verification against OpenSlide fails)."""
        self.levels.pop(level, None)
        for key in [k for k in self._cache if k[0] == level]:
            del self._cache[key]

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        key = (level, index)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        lv = self.levels[level]
        count = lv.byte_counts[index]
        if count == 0:  # sparse tile: nothing stored, OpenSlide paints it transparent
            return None
        raw = os.pread(self._fd, count, lv.offsets[index])
        if len(raw) != count or not raw.startswith(b"\xff\xd8"):
            raise SlideUnreadable(
                f"slide {self.path}: level {level} tile {index} at byte {lv.offsets[index]} "
                "is not a JPEG stream (corrupt file?)"
            )
        try:
            tile = simplejpeg.decode_jpeg(
                lv.prefix + raw[2:], colorspace="RGB", fastdct=False, fastupsample=False
            )
        except ValueError as exc:
            raise SlideUnreadable(
                f"slide {self.path}: level {level} tile {index} cannot be decoded: {exc}"
            ) from exc
        self._cache[key] = tile
        if len(self._cache) > self._cache_tiles:
            self._cache.popitem(last=False)
        return tile

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels of a region in ``level``'s own pixel grid, white outside the level.

        Args:
            level: an index in :attr:`levels`.
            x: left edge, level pixels (may be negative).
            y: top edge, level pixels (may be negative).
            w: width in pixels.
            h: height in pixels.

        Returns:
            uint8 array (h, w, 3).
        """
        lv = self.levels[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, lv.width), min(y + h, lv.height)
        if x0 >= x1 or y0 >= y1:
            return out
        tw, th = lv.tile_width, lv.tile_height
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(level, ty * lv.tiles_across + tx)
                if tile is None:
                    continue
                # intersection of region, level bounds and this tile, in level pixels
                ix0, iy0 = max(x0, tx * tw), max(y0, ty * th)
                ix1, iy1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = tile[
                    iy0 - ty * th : iy1 - ty * th, ix0 - tx * tw : ix1 - tx * tw
                ]
        return out
