"""Checks at the door of ``RegisterDataset``: refuse what the loop could never use.

A dataset the project's feature set cannot be computed from (no slide for morphology, no
counts for expression) or whose spots fall outside its slide (``pxl_row``/``pxl_col``
swapped, a wrong ``slide_scale``) would only fail later, in a stage, for good. These
checks refuse it up front with the field to fix, before anything is stored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from histoloop.errors import FailedPrecondition, InvalidArgument
from histoloop.formats.positions import SpotRow

__all__ = ["MAX_OUTSIDE_SHARE", "check_feeds_features", "check_spots_on_slide", "slide_size"]

log = logging.getLogger(__name__)

MAX_OUTSIDE_SHARE = 0.01
"""Share of in-tissue spots that may lie off the slide before registration is refused."""

_NEEDS = {
    "morphology": ("slide_path",),
    "expression": ("expression_path",),
    "multimodal": ("slide_path", "expression_path"),
}
_WHAT = {"slide_path": "a slide (image embeddings)", "expression_path": "gene-expression counts"}


def check_feeds_features(
    *, features: str, kind: str, slide_path: str, expression_path: str
) -> None:
    """Refuse a dataset that cannot feed the project's feature set.

    Args:
        features: the project's ``config.features`` (morphology, expression, multimodal).
        kind: ``visium`` or ``wsi``.
        slide_path: the request's slide (empty: none).
        expression_path: the request's counts (empty: none).

    Raises:
        FailedPrecondition: naming the missing field and how to fix it.
    """
    given = {"slide_path": slide_path, "expression_path": expression_path}
    if kind == "wsi" and features != "morphology":
        raise FailedPrecondition(
            f"kind: a whole-slide image has no expression counts, but the project learns from "
            f"{features} (config.features); use a morphology project or UpdateProject"
        )
    for field_name in _NEEDS.get(features, ()):
        if not given[field_name]:
            raise FailedPrecondition(
                f"{field_name}: the project learns from {features} (config.features), which needs "
                f"{_WHAT[field_name]}; give {field_name}, or change config.features with UpdateProject"
            )


def slide_size(path: str | Path) -> tuple[int, int] | None:
    """``(width, height)`` of a slide at full resolution, None if it cannot be read here.

    OpenSlide formats first, then plain images (PNG/JPEG/TIFF) by their header.
    """
    import openslide  # heavy: only when a slide is registered
    from PIL import Image

    try:
        with openslide.OpenSlide(str(path)) as slide:
            width, height = slide.dimensions
            return int(width), int(height)
    except (openslide.OpenSlideError, OSError):
        pass
    try:
        Image.MAX_IMAGE_PIXELS = None  # slides are large by nature; only the header is read
        with Image.open(path) as image:
            return int(image.width), int(image.height)
    except (OSError, ValueError) as exc:
        log.info("cannot read the size of slide %s (%s); spot positions not checked", path, exc)
        return None


def check_spots_on_slide(
    rows: Sequence[SpotRow], size: tuple[int, int], *, scale: float, source: str
) -> None:
    """Refuse positions whose in-tissue spots lie off the slide (e.g. swapped columns).

    Args:
        rows: parsed positions (full-resolution pixels).
        size: the slide's ``(width, height)``.
        scale: slide pixels per full-resolution pixel (``slide_scale``; 0 = 1).
        source: the positions file's name, for the message.

    Raises:
        InvalidArgument: naming the file, how many spots are off, one example and, when
            the columns look swapped, saying so.
    """
    scale = scale or 1.0
    width, height = size
    spots = [r for r in rows if r.in_tissue] or list(rows)
    if not spots:
        return

    def off(row: float, col: float) -> bool:
        return not (0 <= col * scale < width and 0 <= row * scale < height)

    outside = [r for r in spots if off(r.pxl_row, r.pxl_col)]
    if len(outside) <= MAX_OUTSIDE_SHARE * len(spots):
        return
    swapped = sum(off(r.pxl_col, r.pxl_row) for r in spots)
    first = outside[0]
    hint = (
        " — pxl_row and pxl_col look swapped (with them exchanged every spot fits)"
        if swapped <= MAX_OUTSIDE_SHARE * len(spots)
        else "; check slide_scale (slide px per full-res px) and that the slide is this sample's"
    )
    raise InvalidArgument(
        f"{source}: {len(outside)} of {len(spots)} spots lie outside the {width}×{height} slide "
        f"(e.g. {first.barcode} at pxl_row={first.pxl_row:g}, pxl_col={first.pxl_col:g}, "
        f"slide_scale={scale:g}){hint}"
    )
