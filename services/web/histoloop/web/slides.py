"""Deep Zoom tiles of registered slides, cached, with ETags.

A slide is only ever named by its project and dataset ids; the workspace asks the
annotation store (``GetUnitLayer`` with ``header_only``) which artifact that is, copies it
once from the artifact store into a local cache folder and serves Deep Zoom tiles from it:

* pyramidal slides (anything OpenSlide reads) through :class:`openslide.deepzoom.DeepZoomGenerator`;
* plain images (a Visium ``tissue_hires_image.png``/``tissue_lowres_image.png``, a PNG or
  JPEG slide) through :class:`PillowDeepZoom`, a small Deep Zoom pyramid over Pillow with
  the same interface.

Encoded tiles are kept in an LRU cache; every tile has a strong ETag derived from the
slide's checksum and the tile address, so a browser revalidation costs no decoding at all.
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from PIL import Image

from histoloop.artifacts.base import ArtifactStore
from histoloop.errors import FailedPrecondition, InvalidArgument, NotFound

__all__ = [
    "DeepZoomSource",
    "PillowDeepZoom",
    "Slide",
    "SlideCache",
    "TileCache",
    "check_address",
    "open_deep_zoom",
]

log = logging.getLogger(__name__)

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 80
_SPATIAL_IMAGES = (
    ("tissue_hires_image.png", "tissue_hires_scalef"),
    ("tissue_lowres_image.png", "tissue_lowres_scalef"),
)


class DeepZoomSource(Protocol):
    """What :class:`openslide.deepzoom.DeepZoomGenerator` and :class:`PillowDeepZoom` share."""

    @property
    def level_count(self) -> int:
        """Number of Deep Zoom levels."""

    @property
    def level_tiles(self) -> tuple[tuple[int, int], ...]:
        """(columns, rows) of tiles per level."""

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) in pixels per level."""

    def get_tile(self, level: int, address: tuple[int, int]) -> Image.Image:
        """One tile as an RGB image."""


class PillowDeepZoom:
    """A Deep Zoom pyramid over a plain image (PNG/JPEG/TIFF read by Pillow).

    Level ``L`` of ``n`` is the image downsampled by ``2**(n-1-L)`` (rounded up), as the
    Deep Zoom format defines it; each level is computed once, from the level above, then
    tiles are crops.
    """

    def __init__(
        self, image: Image.Image, tile_size: int = TILE_SIZE, overlap: int = OVERLAP
    ) -> None:
        """Wrap ``image`` (converted to RGB)."""
        self._full = image.convert("RGB")
        self.tile_size = tile_size
        self.overlap = overlap
        width, height = self._full.size
        self._count = int(math.ceil(math.log2(max(width, height, 1)))) + 1
        dims = []
        for level in range(self._count):
            factor = 2 ** (self._count - 1 - level)
            dims.append((max(1, math.ceil(width / factor)), max(1, math.ceil(height / factor))))
        self._dims = tuple(dims)
        self._tiles = tuple(
            (math.ceil(w / tile_size), math.ceil(h / tile_size)) for w, h in self._dims
        )
        self._levels: dict[int, Image.Image] = {self._count - 1: self._full}
        self._lock = threading.Lock()

    @property
    def level_count(self) -> int:
        """Number of Deep Zoom levels."""
        return self._count

    @property
    def level_tiles(self) -> tuple[tuple[int, int], ...]:
        """(columns, rows) of tiles per level."""
        return self._tiles

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) in pixels per level."""
        return self._dims

    def _level(self, level: int) -> Image.Image:
        with self._lock:
            return self._level_unlocked(level)

    def _level_unlocked(self, level: int) -> Image.Image:
        if level not in self._levels:
            above = self._level_unlocked(level + 1)
            self._levels[level] = above.resize(self._dims[level], Image.Resampling.LANCZOS)
        return self._levels[level]

    def get_tile(self, level: int, address: tuple[int, int]) -> Image.Image:
        """The tile at ``address`` (column, row) of ``level``, with its overlap."""
        col, row = address
        width, height = self._dims[level]
        x0 = col * self.tile_size - (self.overlap if col > 0 else 0)
        y0 = row * self.tile_size - (self.overlap if row > 0 else 0)
        x1 = min(width, (col + 1) * self.tile_size + self.overlap)
        y1 = min(height, (row + 1) * self.tile_size + self.overlap)
        return self._level(level).crop((x0, y0, x1, y1))


def open_deep_zoom(path: Path) -> DeepZoomSource:
    """OpenSlide's generator for slides OpenSlide reads, else the Pillow pyramid."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    if openslide.OpenSlide.detect_format(str(path)) is not None:
        return DeepZoomGenerator(
            openslide.OpenSlide(str(path)), tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False
        )
    try:
        with Image.open(path) as image:
            image.load()
            return PillowDeepZoom(image)
    except (OSError, Image.DecompressionBombError) as exc:
        raise FailedPrecondition(
            f"slide {path.name} is neither an OpenSlide slide nor an image: {exc}"
        ) from None


@dataclass
class Slide:
    """A registered slide ready to serve."""

    key: str
    """Cache identity: the artifact's checksum."""
    deep_zoom: DeepZoomSource
    unit_scale: float
    """Image px per unit coordinate of the dataset's overlay layer."""

    def describe(self) -> dict[str, object]:
        """The Deep Zoom descriptor (OpenSeadragon's inline ``Image`` form) and the unit scale."""
        width, height = self.deep_zoom.level_dimensions[-1]
        return {
            "Image": {
                "xmlns": "http://schemas.microsoft.com/deepzoom/2008",
                "Format": "jpeg",
                "Overlap": str(OVERLAP),
                "TileSize": str(TILE_SIZE),
                "Size": {"Width": str(width), "Height": str(height)},
            },
            "width": width,
            "height": height,
            "levels": self.deep_zoom.level_count,
            "unit_scale": self.unit_scale,
        }

    def dzi(self) -> str:
        """The ``.dzi`` XML."""
        width, height = self.deep_zoom.level_dimensions[-1]
        return (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Image TileSize="{TILE_SIZE}" Overlap="{OVERLAP}" '
            f'Format="jpeg" xmlns="http://schemas.microsoft.com/deepzoom/2008">'
            f'<Size Width="{width}" Height="{height}"/></Image>'
        )

    def check_tile(self, level: int, col: int, row: int) -> None:
        """Raise :class:`NotFound` naming the bad part of a tile address."""
        count = self.deep_zoom.level_count
        if not 0 <= level < count:
            raise NotFound(f"level {level} does not exist (levels 0..{count - 1})")
        cols, rows = self.deep_zoom.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise NotFound(
                f"tile {col}_{row} does not exist at level {level} ({cols}×{rows} tiles)"
            )

    def etag(self, level: int, col: int, row: int) -> str:
        """Strong ETag of a tile (the slide checksum and the address)."""
        return f'"{self.key[:20]}-{level}-{col}-{row}"'

    def render(self, level: int, col: int, row: int) -> bytes:
        """Encode one tile as JPEG."""
        self.check_tile(level, col, row)
        tile = self.deep_zoom.get_tile(level, (col, row))
        buffer = io.BytesIO()
        tile.convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()


class TileCache:
    """LRU of encoded tiles, bounded in bytes; safe across threads."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        """Keep at most ``max_bytes`` of tiles."""
        self.max_bytes = max_bytes
        self._tiles: OrderedDict[tuple[str, int, int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def cached(self, slide: Slide, level: int, col: int, row: int) -> bytes | None:
        """The tile if it is cached, else None; never renders (the lock is held for a lookup only)."""
        key = (slide.key, level, col, row)
        with self._lock:
            data = self._tiles.get(key)
            if data is not None:
                self._tiles.move_to_end(key)
                self.hits += 1
            return data

    def get(self, slide: Slide, level: int, col: int, row: int) -> bytes:
        """The tile, from the cache or rendered (and then cached)."""
        data = self.cached(slide, level, col, row)
        if data is not None:
            return data
        with self._lock:
            self.misses += 1
        data = slide.render(level, col, row)
        key = (slide.key, level, col, row)
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = data
                self._bytes += len(data)
                while self._bytes > self.max_bytes and self._tiles:
                    _k, old = self._tiles.popitem(last=False)
                    self._bytes -= len(old)
        return data


class SlideCache:
    """Registered slides by artifact, copied once into ``folder`` and opened once."""

    def __init__(self, store: ArtifactStore, folder: Path) -> None:
        """Read artifacts from ``store``; keep local copies under ``folder``."""
        self.store = store
        self.folder = folder
        self._slides: dict[tuple[str, str, float], Slide] = {}
        self._lock = threading.Lock()

    def slide(self, slide_uri: str, spatial_uri_prefix: str, coordinates: str) -> Slide:
        """The slide of a dataset: its registered slide, else its Space Ranger image.

        Args:
            slide_uri: the dataset's registered slide (may be empty).
            spatial_uri_prefix: the dataset's copied ``spatial/`` folder (may be empty).
            coordinates: ``slide`` or ``fullres``, the overlay layer's coordinates.

        Raises:
            FailedPrecondition: the dataset has no image at all, or it cannot be read.
        """
        cache_key = _slide_key(slide_uri, spatial_uri_prefix, coordinates)
        with self._lock:
            found = self._slides.get(cache_key)
            if found is not None:
                return found
            slide = self._open(slide_uri, spatial_uri_prefix)
            self._slides[cache_key] = slide
            return slide

    def opened(self, slide_uri: str, spatial_uri_prefix: str, coordinates: str) -> Slide | None:
        """The slide if it is already open, else None; never waits for the lock that ``slide``
        holds while it copies and opens one (a dict lookup is atomic), so the event loop may call it."""
        return self._slides.get(_slide_key(slide_uri, spatial_uri_prefix, coordinates))

    def _open(self, slide_uri: str, spatial_uri_prefix: str) -> Slide:
        if slide_uri:
            key = self.store.key_from_uri(slide_uri)
            return Slide(
                key=self.store.stat(key).sha256,
                deep_zoom=open_deep_zoom(self._local(key)),
                unit_scale=1.0,
            )
        if spatial_uri_prefix:
            prefix = self.store.key_from_uri(spatial_uri_prefix).rstrip("/")
            factors = json.loads(self.store.get(f"{prefix}/scalefactors_json.json"))
            for name, factor in _SPATIAL_IMAGES:
                key = f"{prefix}/{name}"
                if self.store.exists(key) and factor in factors:
                    return Slide(
                        key=self.store.stat(key).sha256,
                        deep_zoom=open_deep_zoom(self._local(key)),
                        unit_scale=float(factors[factor]),
                    )
        raise FailedPrecondition(
            "this dataset has no slide and no Space Ranger tissue image to show"
        )

    def _local(self, key: str) -> Path:
        sha = self.store.stat(key).sha256
        path = self.folder / sha[:2] / f"{sha}{Path(key).suffix}"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(path.suffix + ".part")
            self.store.get_file(key, partial)
            partial.replace(path)
            log.info("cached slide %s as %s", key, path)
        return path


def _slide_key(slide_uri: str, spatial_uri_prefix: str, coordinates: str) -> tuple[str, str, float]:
    return (slide_uri, spatial_uri_prefix, 0.0 if coordinates == "slide" else 1.0)


def check_address(level: str, col: str, row: str) -> tuple[int, int, int]:
    """Parse a tile address from the URL, naming the bad part."""
    values = []
    for name, text in (("level", level), ("column", col), ("row", row)):
        if not text.isdigit() or len(text) > 6:
            raise InvalidArgument(f"tile {name} {text[:20]!r} is not a non-negative integer")
        values.append(int(text))
    return values[0], values[1], values[2]
