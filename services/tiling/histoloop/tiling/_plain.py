"""Plain images as slides: PNG, JPEG and non-pyramidal TIFF, beside OpenSlide.

A Visium ``tissue_hires_image.png`` or the H&E image of a legacy Spatial Transcriptomics
study is one image, not a pyramid, and OpenSlide does not read it. :class:`PlainImageReader`
gives it the slide interface (:class:`~histoloop.tiling._slide.BaseSlide`): one level,
region reads padded with white outside the image, a thumbnail.

- TIFF (tifffile): the first page; memory-mapped when its pixels are stored uncompressed
  and contiguous, else decoded once.
- PNG / JPEG (Pillow): decoded once (neither format can be read by region).

Plain images seldom record their resolution: pass ``mpp`` (from the registration) when a
physical resolution is needed. A TIFF's ``XResolution``/``ResolutionUnit`` tags are used
when present.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from histoloop.tiling._errors import SlideNotFound, SlideUnreadable
from histoloop.tiling._slide import MPP_PROPERTY, BaseSlide, composite_on_white

__all__ = ["MAX_PLAIN_PIXELS", "PlainImageReader"]

log = logging.getLogger(__name__)

MAX_PLAIN_PIXELS = 1 << 31
"""Largest plain image accepted (2 gigapixels); Pillow's decompression-bomb limit is raised to it."""

_UNIT_MICRONS = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: inch, centimetre


class PlainImageReader(BaseSlide):
    """A PNG, JPEG or single-level TIFF through the slide interface.

    Args:
        path: the image file.
        mpp: level-0 µm/px (overrides a TIFF's resolution tags).

    Raises:
        SlideNotFound: no file at ``path``.
        SlideUnreadable: the file cannot be decoded as an RGB(A) or grey image.
    """

    def __init__(self, path: str | Path, *, mpp: float | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SlideNotFound(f"slide {self.path} does not exist")
        with open(self.path, "rb") as fh:
            head = fh.read(4)
        if head[:2] in (b"II", b"MM"):
            pixels, tag_mpp, fmt = self._open_tiff()
        else:
            pixels, tag_mpp, fmt = self._open_pillow(), None, "pillow"
        self._pixels = pixels
        height, width = int(pixels.shape[0]), int(pixels.shape[1])
        self.level_dimensions = [(width, height)]
        self.level_downsamples = [1.0]
        self.properties = {"openslide.vendor": f"plain-{fmt}", "histoloop.plain-image": "1"}
        resolution = mpp if mpp is not None else tag_mpp
        if resolution is not None and math.isfinite(resolution) and resolution > 0:
            self.properties[MPP_PROPERTY] = repr(float(resolution))
        log.debug("%s: plain %s image %d×%d, mpp %s", self.path, fmt, width, height, resolution)

    def _open_pillow(self) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, MAX_PLAIN_PIXELS)
        try:
            with Image.open(self.path) as img:
                img.load()
                if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                    return composite_on_white(np.asarray(img.convert("RGBA")))
                return np.ascontiguousarray(np.asarray(img.convert("RGB")))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise SlideUnreadable(
                f"slide {self.path} ({self.path.stat().st_size} bytes) cannot be decoded as a "
                f"PNG/JPEG image: truncated or corrupt ({type(exc).__name__}: {exc})"
            ) from exc

    def _open_tiff(self) -> tuple[np.ndarray, float | None, str]:
        import tifffile

        try:
            with tifffile.TiffFile(self.path) as tif:
                page = tif.pages.first
                mpp = _tiff_mpp(page)
                pixels: np.ndarray
                if page.is_contiguous and page.compression == 1 and not page.is_tiled:
                    pixels = tifffile.memmap(self.path, page=0, mode="r")
                    fmt = "tiff-memmap"
                else:
                    pixels = page.asarray()
                    fmt = "tiff"
        except (tifffile.TiffFileError, OSError, ValueError, IndexError) as exc:
            raise SlideUnreadable(
                f"slide {self.path} ({self.path.stat().st_size} bytes) is neither readable by "
                f"OpenSlide nor a decodable TIFF ({type(exc).__name__}: {exc})"
            ) from exc
        return _as_rgb(pixels, self.path), mpp, fmt

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """A region of the image as uint8 (h, w, 3); white outside it.

        Raises:
            SlideUnreadable: ``level`` is not 0 (a plain image has one level).
        """
        if level != 0:
            raise SlideUnreadable(
                f"slide {self.path} is a plain image with one level; asked for level {level}"
            )
        width, height = self.level_dimensions[0]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x0 < x1 and y0 < y1:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._pixels[y0:y1, x0:x1, :3]
        return out

    def read_openslide(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Same as :meth:`read` (there is no OpenSlide path for a plain image)."""
        return self.read(level, x, y, w, h)

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """An RGB thumbnail and its downsample from level 0 (strided, then resized)."""
        from PIL import Image

        width, height = self.level_dimensions[0]
        factor = max(width, height) / max_side
        if factor <= 1:
            return np.ascontiguousarray(self._pixels[..., :3]), 1.0
        step = max(1, int(factor // 2))  # cheap decimation first (memory-mapped pages)
        coarse = np.ascontiguousarray(self._pixels[::step, ::step, :3])
        size = (max(1, round(width / factor)), max(1, round(height / factor)))
        thumb = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BILINEAR))
        return thumb, width / thumb.shape[1]

    def close(self) -> None:
        """Drop the pixels (and the memory map); safe to call twice."""
        self._pixels = np.zeros((0, 0, 3), np.uint8)


def _tiff_mpp(page: object) -> float | None:
    tags = page.tags  # type: ignore[attr-defined]
    res, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if res is None or unit is None:
        return None
    num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
    microns = _UNIT_MICRONS.get(int(unit.value))
    if not microns or not num or not den:
        return None
    return microns / (num / den)


def _as_rgb(pixels: np.ndarray, path: Path) -> np.ndarray:
    if pixels.dtype != np.uint8:
        raise SlideUnreadable(
            f"slide {path}: {pixels.dtype} pixels; only 8-bit images are supported"
        )
    if pixels.ndim == 2:
        return np.repeat(pixels[..., None], 3, axis=2)
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        return pixels if pixels.shape[2] == 3 else composite_on_white(np.asarray(pixels))
    raise SlideUnreadable(
        f"slide {path}: pixel array of shape {pixels.shape}; expected (H, W[, 3|4])"
    )
