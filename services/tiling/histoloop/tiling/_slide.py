"""Slide access: OpenSlide for every format, direct JPEG decoding where it is exact.

A region is addressed in one level's own pixel grid: ``(level, x, y, w, h)``. The
OpenSlide path asks ``read_region`` for the level-0 location ``round(x * downsample)``;
the direct path (:mod:`histoloop.tiling._jpeg`) crops decoded tiles. Both give the same
pixels wherever ``x * downsample`` is an integer, i.e. on level 0 and on levels whose
downsample is an exact integer. On a level with a fractional downsample (2.000337 for a
pyramid whose level sizes were rounded) OpenSlide renders the level at a sub-pixel offset
and so blends neighbouring pixels; such levels are therefore always read through OpenSlide.
Every direct level is also checked against OpenSlide on one tile when the slide is
opened, and falls back to OpenSlide if a single pixel differs.

Direct decoding is only tried for vendors whose OpenSlide levels are the TIFF pages'
tiles as stored (``aperio``, ``generic-tiff``); formats that OpenSlide stitches with
overlaps or offsets (Ventana, Philips, Leica, …) and non-TIFF formats (MRXS, NDPI strips,
DICOM, …) always go through OpenSlide.

Pixels outside the slide (and transparent pixels) are white. A reader is not thread-safe:
use one per thread or process.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import numpy as np
import openslide

from histoloop.tiling._errors import MissingMpp, SlideNotFound, SlideUnreadable
from histoloop.tiling._jpeg import JpegTileReader

__all__ = ["Backend", "BaseSlide", "SlideReader", "composite_on_white", "open_slide"]

log = logging.getLogger(__name__)

Backend = Literal["auto", "openslide", "direct"]
"""``auto``: direct JPEG decoding where exact, OpenSlide elsewhere; ``openslide``: always
OpenSlide; ``direct``: like auto, but fail if no level can be read directly."""

MPP_PROPERTY = openslide.PROPERTY_NAME_MPP_X
DIRECT_VENDORS = frozenset({"aperio", "generic-tiff"})


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (un-premultiplied, as openslide-python returns it) → RGB over a white background."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.uint16)
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class BaseSlide:
    """Geometry shared by every slide reader: levels, downsamples, mpp, level choice.

    Subclasses set ``path``, ``level_dimensions``, ``level_downsamples`` and ``properties``
    (``openslide.mpp-x`` when the resolution is known) and implement ``read``,
    ``thumbnail`` and ``close``.
    """

    path: Path
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    properties: dict[str, str]

    # -- geometry -------------------------------------------------------------------------

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def vendor(self) -> str:
        """OpenSlide's vendor string (``aperio``, ``generic-tiff``, …; ``plain-…`` for plain images)."""
        return self.properties.get(openslide.PROPERTY_NAME_VENDOR, "unknown")

    @property
    def direct_levels(self) -> list[int]:
        """Levels read by direct JPEG-tile decoding (none unless a reader has some)."""
        return []

    @property
    def mpp(self) -> float | None:
        """Level-0 microns per pixel (``openslide.mpp-x``), or None when not recorded."""
        raw = self.properties.get(MPP_PROPERTY)
        try:
            value = float(raw) if raw is not None else math.nan
        except ValueError:
            return None
        return value if math.isfinite(value) and value > 0 else None

    def require_mpp(self, override: float | None = None, *, purpose: str = "") -> float:
        """The level-0 mpp, ``override`` if given.

        Raises:
            MissingMpp: no override and the slide has no ``openslide.mpp-x`` property.
        """
        if override is not None:
            if not (math.isfinite(override) and override > 0):
                raise MissingMpp(f"slide_mpp must be a positive number of µm/px, got {override!r}")
            return float(override)
        mpp = self.mpp
        if mpp is None:
            why = f" to {purpose}" if purpose else ""
            raise MissingMpp(
                f"slide {self.path} has no '{MPP_PROPERTY}' property (microns per pixel) and "
                f"one is needed{why}; pass the level-0 resolution explicitly with "
                "slide_mpp=<µm per pixel> (CLI: --slide-mpp), e.g. 0.25 for 40x or 0.5 for 20x"
            )
        return mpp

    def best_level(self, downsample: float, *, tolerance: float = 1e-2) -> int:
        """The lowest-resolution level whose downsample ≤ ``downsample`` (level 0 if none).

        ``tolerance`` (relative) lets a level of downsample 2.0003 serve a request for 2.0.
        """
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + tolerance) and ds > self.level_downsamples[best]:
                best = level
        return best

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """A region in ``level``'s pixel grid as uint8 (h, w, 3); white outside the slide."""
        raise NotImplementedError

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """An RGB thumbnail (white background) and its downsample from level 0."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file handles; safe to call twice."""

    def __enter__(self) -> BaseSlide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SlideReader(BaseSlide):
    """One open slide: level geometry, mpp, and region reads through the fastest exact path.

    Args:
        path: a slide OpenSlide can read (SVS, NDPI, MRXS, tiled TIFF, …).
        backend: see :data:`Backend`.
        cache_tiles: decoded tiles kept by the direct reader.
        verify: compare two tiles per direct level with OpenSlide at open (recommended).

    Raises:
        SlideNotFound: no file at ``path``.
        SlideUnreadable: OpenSlide cannot open it (unsupported, truncated or corrupt).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        backend: Backend = "auto",
        cache_tiles: int = 128,
        verify: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SlideNotFound(f"slide {self.path} does not exist")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as exc:
            size = self.path.stat().st_size
            raise SlideUnreadable(
                f"slide {self.path} ({size} bytes) cannot be read by OpenSlide: unsupported "
                f"format, or a truncated or corrupt file ({type(exc).__name__}: {exc})"
            ) from exc
        self._closed = False
        self.level_dimensions: list[tuple[int, int]] = [
            (int(w), int(h)) for w, h in self._osr.level_dimensions
        ]
        self.level_downsamples: list[float] = [float(d) for d in self._osr.level_downsamples]
        self.properties: dict[str, str] = dict(self._osr.properties)
        self._direct: JpegTileReader | None = None
        try:
            self._open_direct(backend, cache_tiles, verify)
        except BaseException:
            self.close()
            raise

    def _open_direct(self, backend: Backend, cache_tiles: int, verify: bool) -> None:
        if backend != "openslide" and self.vendor in DIRECT_VENDORS:
            self._direct = JpegTileReader(self.path, self.level_dimensions, cache_tiles=cache_tiles)
            for level in list(self._direct.levels):
                if not _integral(self.level_downsamples[level]):
                    log.debug(
                        "%s: level %d downsample %.6f is fractional; read through OpenSlide",
                        self.path,
                        level,
                        self.level_downsamples[level],
                    )
                    self._direct.disable(level)
                elif verify and not self._verify_level(level):
                    log.warning(
                        "%s: direct JPEG decoding of level %d differs from OpenSlide; "
                        "using OpenSlide for it",
                        self.path,
                        level,
                    )
                    self._direct.disable(level)
        if backend == "direct" and not self.direct_levels:
            raise SlideUnreadable(
                f"slide {self.path}: no level is a JPEG-tiled TIFF level that can be "
                "decoded directly; use backend='auto' or 'openslide'"
            )

    @property
    def direct_levels(self) -> list[int]:
        """Levels read by direct JPEG decoding; the others go through OpenSlide."""
        return sorted(self._direct.levels) if self._direct else []

    # -- pixels ---------------------------------------------------------------------------

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """A region in ``level``'s pixel grid as uint8 (h, w, 3); white outside the slide.

        Raises:
            SlideUnreadable: the file cannot be decoded at this region.
        """
        if self._direct is not None and level in self._direct.levels:
            return self._direct.read(level, x, y, w, h)
        return self.read_openslide(level, x, y, w, h)

    def read_openslide(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Like :meth:`read`, always through OpenSlide (the reference path)."""
        ds = self.level_downsamples[level]
        try:
            region = self._osr.read_region((round(x * ds), round(y * ds)), level, (w, h))
        except openslide.OpenSlideError as exc:
            raise SlideUnreadable(
                f"slide {self.path}: OpenSlide cannot read level {level} region "
                f"({x}, {y}, {w}×{h}): {exc}"
            ) from exc
        return composite_on_white(np.asarray(region))

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """An RGB thumbnail (white background) and its downsample from level 0."""
        w, h = self.dimensions
        factor = max(w, h) / max_side
        size = (max(1, round(w / factor)), max(1, round(h / factor))) if factor > 1 else (w, h)
        try:
            img = self._osr.get_thumbnail(size).convert("RGB")
        except openslide.OpenSlideError as exc:
            raise SlideUnreadable(f"slide {self.path}: cannot read a thumbnail: {exc}") from exc
        return np.asarray(img), w / img.size[0]

    def _verify_level(self, level: int) -> bool:
        assert self._direct is not None
        lv = self._direct.levels[level]
        # a tile in the middle of the level, plus the last (edge) tile
        mid = (lv.tiles_down // 2) * lv.tiles_across + lv.tiles_across // 2
        for index in (mid, lv.tiles_across * lv.tiles_down - 1):
            ty, tx = divmod(index, lv.tiles_across)
            x, y = tx * lv.tile_width, ty * lv.tile_height
            w, h = min(lv.tile_width, lv.width - x), min(lv.tile_height, lv.height - y)
            if not np.array_equal(
                self._direct.read(level, x, y, w, h), self.read_openslide(level, x, y, w, h)
            ):
                return False
        return True

    def close(self) -> None:
        """Release the file handles; safe to call twice."""
        if self._direct is not None:
            self._direct.close()
        if not self._closed:
            self._closed = True
            self._osr.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _integral(value: float) -> bool:
    return abs(value - round(value)) < 1e-9


_PLAIN_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_slide(
    path: str | Path,
    *,
    backend: Backend = "auto",
    cache_tiles: int = 128,
    verify: bool = True,
    mpp: float | None = None,
) -> BaseSlide:
    """Open any slide through one interface: OpenSlide, or a plain image reader.

    PNG and JPEG files (a Visium ``tissue_hires_image.png``, the H&E image of a legacy ST
    study) are read with :class:`~histoloop.tiling._plain.PlainImageReader`; a TIFF goes to
    OpenSlide first and, if OpenSlide refuses it (a non-pyramidal, stripped TIFF), to the
    plain reader (tifffile, memory-mapped where the file allows); everything else to
    :class:`SlideReader`.

    Args:
        path: the image.
        backend: OpenSlide reading backend (see :data:`Backend`).
        cache_tiles: decoded tiles cached by the direct JPEG reader.
        verify: check direct decoding against OpenSlide at open.
        mpp: level-0 µm/px of a plain image (plain images rarely record one).

    Raises:
        SlideNotFound: no file at ``path``.
        SlideUnreadable: neither OpenSlide nor the plain reader can read it.
    """
    from histoloop.tiling._plain import PlainImageReader

    path = Path(path)
    if not path.is_file():
        raise SlideNotFound(f"slide {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(_PLAIN_MAGIC):
        return PlainImageReader(path, mpp=mpp)
    try:
        return SlideReader(path, backend=backend, cache_tiles=cache_tiles, verify=verify)
    except SlideUnreadable:
        if not head.startswith(_TIFF_MAGIC):
            raise
        log.info("%s: OpenSlide cannot read this TIFF; reading it as a plain image", path)
        return PlainImageReader(path, mpp=mpp)
