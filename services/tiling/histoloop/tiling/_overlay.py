"""Debug overlay: spots or tiles drawn on the slide thumbnail, as PNG bytes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["draw_overlay"]

_GREEN = (0, 170, 0)
_RED = (220, 0, 0)
_BLUE = (0, 90, 255)


def draw_overlay(
    thumbnail: np.ndarray,
    downsample: float,
    *,
    circles: tuple[np.ndarray, np.ndarray, float] | None = None,
    circle_ok: np.ndarray | None = None,
    boxes: tuple[np.ndarray, np.ndarray, float] | None = None,
    mask: np.ndarray | None = None,
) -> bytes:
    """Draw spot circles and/or tile squares on a thumbnail and return PNG bytes.

    Args:
        thumbnail: uint8 (h, w, 3).
        downsample: level-0 pixels per thumbnail pixel.
        circles: (cx, cy, diameter) in level-0 pixels; drawn green where ``circle_ok``
            (e.g. on the tissue mask), red elsewhere.
        circle_ok: bool per circle.
        boxes: (x0, y0, side) in level-0 pixels, drawn blue (the regions read).
        mask: the tissue mask (same size as the thumbnail), tinted faintly.
    """
    img = thumbnail.copy()
    if mask is not None and mask.shape == img.shape[:2]:
        tint = img[mask].astype(np.int16)
        tint[:, 1] = np.minimum(tint[:, 1] + 25, 255)
        img[mask] = tint.astype(np.uint8)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    if boxes is not None:
        x0, y0, side = boxes
        s = side / downsample
        for x, y in zip(
            (np.asarray(x0) / downsample).tolist(),
            (np.asarray(y0) / downsample).tolist(),
            strict=True,
        ):
            draw.rectangle((x, y, x + s, y + s), outline=_BLUE, width=1)
    if circles is not None:
        cx, cy, diameter = circles
        r = max(diameter / downsample / 2, 1.0)
        ok = np.ones(len(cx), bool) if circle_ok is None else np.asarray(circle_ok, bool)
        for x, y, good in zip(
            (np.asarray(cx) / downsample).tolist(),
            (np.asarray(cy) / downsample).tolist(),
            ok.tolist(),
            strict=True,
        ):
            draw.ellipse((x - r, y - r, x + r, y + r), outline=_GREEN if good else _RED, width=1)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
