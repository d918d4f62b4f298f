"""Tissue mask: Otsu threshold on the saturation of a low-resolution image.

Background (glass) is bright and unsaturated; stained tissue is saturated. Otsu's
threshold on the HSV saturation separates them. When a thumbnail is nearly all tissue
or nearly all glass the histogram is not bimodal and Otsu would split the majority class
in two, so the threshold is clamped to ``[0.03, 0.15]`` (H&E tissue is well above 0.15,
clean glass well below 0.03). Small specks are removed and small holes filled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

__all__ = ["TissueMask", "tissue_mask"]

_MIN_THRESHOLD, _MAX_THRESHOLD = 0.03, 0.15


@dataclass(frozen=True)
class TissueMask:
    """A boolean mask over the slide at ``downsample`` (level-0 pixels per mask pixel)."""

    mask: np.ndarray
    downsample: float
    threshold: float

    def fraction(self) -> float:
        """Fraction of the slide covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def contains(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether level-0 points lie on tissue (False outside the slide)."""
        col = np.floor(np.asarray(x, dtype=float) / self.downsample).astype(np.int64)
        row = np.floor(np.asarray(y, dtype=float) / self.downsample).astype(np.int64)
        h, w = self.mask.shape
        ok = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        out = np.zeros(col.shape, dtype=bool)
        out[ok] = self.mask[row[ok], col[ok]]
        return out

    def box_fraction(self, x0: np.ndarray, y0: np.ndarray, side: float) -> np.ndarray:
        """Tissue fraction of squares with level-0 top-left ``(x0, y0)`` and side ``side``.

        Uses a summed-area table, so it is one vectorised lookup for any number of boxes.
        """
        h, w = self.mask.shape
        sat = np.zeros((h + 1, w + 1), dtype=np.int64)
        sat[1:, 1:] = self.mask.astype(np.int64).cumsum(0).cumsum(1)
        c0 = np.clip(np.floor(np.asarray(x0, dtype=float) / self.downsample), 0, w).astype(np.int64)
        r0 = np.clip(np.floor(np.asarray(y0, dtype=float) / self.downsample), 0, h).astype(np.int64)
        c1 = np.clip(np.ceil((np.asarray(x0, dtype=float) + side) / self.downsample), 0, w).astype(
            np.int64
        )
        r1 = np.clip(np.ceil((np.asarray(y0, dtype=float) + side) / self.downsample), 0, h).astype(
            np.int64
        )
        total = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
        area = np.maximum((r1 - r0) * (c1 - c0), 1)
        return total / area


def tissue_mask(
    thumbnail: np.ndarray, downsample: float, *, min_object_px: int = 16, max_hole_px: int = 64
) -> TissueMask:
    """Compute the tissue mask of an RGB thumbnail.

    Args:
        thumbnail: uint8 (h, w, 3), white background.
        downsample: level-0 pixels per thumbnail pixel.
        min_object_px: connected tissue components smaller than this (thumbnail pixels)
            are dropped as dust.
        max_hole_px: enclosed background holes smaller than this are filled.

    Returns:
        The mask with its downsample and the saturation threshold used.
    """
    saturation = rgb2hsv(thumbnail)[..., 1]
    saturation = ndimage.median_filter(saturation, size=3)
    try:
        threshold = float(threshold_otsu(saturation))
    except ValueError:  # a constant image
        threshold = _MAX_THRESHOLD
    threshold = min(max(threshold, _MIN_THRESHOLD), _MAX_THRESHOLD)
    mask = saturation > threshold
    labels, count = ndimage.label(mask)
    if count:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_object_px
        keep[0] = False
        mask = keep[labels]
    holes, count = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if count:
        small = np.bincount(holes.ravel()) < max_hole_px
        small[0] = False
        mask = mask | small[holes]
    return TissueMask(mask=mask, downsample=float(downsample), threshold=threshold)
