"""Small pyramidal TIFFs written in tests (tifffile; JPEG tiles encoded with simplejpeg)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import simplejpeg
import tifffile
from PIL import Image

TILE = 256


def _precompressed() -> None:
    # tifffile looks a JPEG encoder up even when it is given compressed tiles; imagecodecs
    # is not installed, so register one that must never be called
    def never(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("tiles are passed pre-compressed")

    tifffile.TIFF.COMPRESSORS._codecs[7] = never  # type: ignore[attr-defined]


def _jpeg_tiles(img: np.ndarray, subsampling: str) -> list[bytes]:
    h, w, _ = img.shape
    tiles = []
    for ty in range(0, h, TILE):
        for tx in range(0, w, TILE):
            tile = np.full((TILE, TILE, 3), 255, np.uint8)
            part = img[ty : ty + TILE, tx : tx + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            tiles.append(
                simplejpeg.encode_jpeg(
                    tile, quality=90, colorspace="RGB", colorsubsampling=subsampling
                )
            )
    return tiles


def write_pyramid(
    path: Path,
    base: np.ndarray,
    *,
    levels: int = 3,
    mpp: float | None = 0.5,
    compression: Literal["jpeg", "none"] = "jpeg",
) -> Path:
    """Write ``base`` (uint8 (h, w, 3)) as a tiled pyramid halving each level (box filter).

    JPEG tiles are YCbCr 4:2:0 (Photometric YCbCr); ``compression='none'`` writes raw RGB
    tiles, which only OpenSlide reads.
    """
    pyramid = [base]
    for _ in range(levels - 1):
        prev = pyramid[-1]
        pyramid.append(
            np.asarray(
                Image.fromarray(prev).resize(
                    (prev.shape[1] // 2, prev.shape[0] // 2), Image.Resampling.BOX
                )
            )
        )
    resolution = (
        {}
        if mpp is None
        else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    )
    if compression == "jpeg":
        _precompressed()
    with tifffile.TiffWriter(path) as tw:
        for i, img in enumerate(pyramid):
            common = dict(tile=(TILE, TILE), subfiletype=1 if i else 0, **resolution)
            if compression == "jpeg":
                tw.write(
                    iter(_jpeg_tiles(img, "420")),
                    shape=img.shape,
                    dtype=np.uint8,
                    compression="jpeg",
                    photometric="ycbcr",
                    subsampling=(2, 2),
                    **common,
                )
            else:
                tw.write(img, photometric="rgb", **common)
    return path
