"""The slide behind a dataset's units, and a picture of a query set on it.

:func:`slide_view` finds the image to draw on — the Visium low-res image of the copied
Space Ranger files, else a thumbnail of the slide — with its scale to level-0 pixels and
the slide's size (used to refuse off-slide GeoJSON). :func:`query_png` draws the query
units numbered in query order over it.
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from histoloop.annotation_store.units import Unit, UnitLayout
from histoloop.artifacts.base import ArtifactStore

__all__ = ["PICTURE_SIDE", "SlideView", "query_png", "slide_view"]

PICTURE_SIDE = 1400
"""Long side of the picture, pixels (the background is resized to it)."""
_MARK = (255, 215, 0)
_THUMB = 2048


@dataclass(frozen=True)
class SlideView:
    """An image of the slide and where it sits in level-0 pixels.

    Attributes:
        image: RGB, or None when the dataset has no image at all.
        downsample: level-0 pixels per image pixel.
        size: the slide's ``(width, height)`` in level-0 pixels, when known.
    """

    image: Image.Image | None
    downsample: float
    size: tuple[float, float] | None


def _lowres(layout: UnitLayout, store: ArtifactStore) -> SlideView | None:
    prefix = store.key_from_uri(layout.spatial_uri_prefix.rstrip("/"))
    image_key = f"{prefix}/tissue_lowres_image.png"
    if not store.exists(image_key) or not store.exists(f"{prefix}/scalefactors_json.json"):
        return None
    factors = json.loads(store.get(f"{prefix}/scalefactors_json.json"))
    lowres = float(factors.get("tissue_lowres_scalef") or 0)
    if lowres <= 0:
        return None
    image = Image.open(io.BytesIO(store.get(image_key))).convert("RGB")
    ds = layout.slide_scale / lowres
    return SlideView(image, ds, (image.width * ds, image.height * ds))


def _slide(layout: UnitLayout, store: ArtifactStore, *, image: bool) -> SlideView:
    import openslide

    key = store.key_from_uri(layout.slide_uri)
    with tempfile.TemporaryDirectory(prefix="histoloop-picture-") as tmp:
        path = store.get_file(key, Path(tmp) / ("slide-" + key.rsplit("/", 1)[-1]))
        try:
            with openslide.OpenSlide(str(path)) as slide:
                width, height = slide.dimensions
                thumb = slide.get_thumbnail((_THUMB, _THUMB)).convert("RGB") if image else None
        except openslide.OpenSlideError:
            with Image.open(path) as plain:  # a plain PNG/JPEG/TIFF slide
                width, height = plain.size
                if image:
                    plain.thumbnail((_THUMB, _THUMB))
                thumb = plain.convert("RGB") if image else None
    ds = width / thumb.width if thumb is not None else 1.0
    return SlideView(thumb, ds, (float(width), float(height)))


def slide_view(layout: UnitLayout, store: ArtifactStore, *, image: bool = True) -> SlideView:
    """The image to draw a dataset's units on (see the module docstring).

    Args:
        layout: the dataset's units and inputs.
        store: the artifact store holding the inputs.
        image: False when only the slide's size is wanted (no thumbnail is made).
    """
    if layout.spatial_uri_prefix:
        view = _lowres(layout, store)
        if view is not None:
            return view
    if layout.slide_uri:
        return _slide(layout, store, image=image)
    return SlideView(None, 1.0, None)


def query_png(view: SlideView, units: Sequence[Unit], *, title: str) -> bytes:
    """The query units, numbered 1… in query order, over the slide image (PNG bytes)."""
    if view.image is not None:
        background, ds = view.image, view.downsample
        origin = (0.0, 0.0)
    else:  # no image: a white canvas around the units
        xs = np.array([u.x for u in units] or [0.0])
        ys = np.array([u.y for u in units] or [0.0])
        pad = max((u.size for u in units), default=100.0) * 3
        origin = (float(xs.min() - pad), float(ys.min() - pad))
        extent = max(float(np.ptp(xs)), float(np.ptp(ys))) + 2 * pad
        ds = extent / PICTURE_SIDE
        background = Image.new(
            "RGB",
            (max(1, int((np.ptp(xs) + 2 * pad) / ds)), max(1, int((np.ptp(ys) + 2 * pad) / ds))),
            "white",
        )
    factor = PICTURE_SIDE / max(background.size)
    size = (max(1, round(background.width * factor)), max(1, round(background.height * factor)))
    canvas = background.resize(size, Image.Resampling.LANCZOS)
    ds /= factor
    header = 28
    out = Image.new("RGB", (canvas.width, canvas.height + header), "white")
    out.paste(canvas, (0, header))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=16)
    draw.text((6, 5), title, fill=(0, 0, 0), font=font)
    for rank, unit in enumerate(units, start=1):
        x = (unit.x - origin[0]) / ds
        y = (unit.y - origin[1]) / ds + header
        r = max(unit.size / ds / 2, 4.0)
        box = (x - r, y - r, x + r, y + r)
        if unit.shape == "square":
            draw.rectangle(box, outline=(0, 0, 0), width=4)
            draw.rectangle(box, outline=_MARK, width=2)
        else:
            draw.ellipse(box, outline=(0, 0, 0), width=4)
            draw.ellipse(box, outline=_MARK, width=2)
        draw.text(
            (x + r + 2, y - r - 2),
            str(rank),
            fill=(0, 0, 0),
            font=font,
            stroke_width=2,
            stroke_fill=(255, 255, 255),
        )
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()
