"""Batch resizing of square regions to the patch size (bilinear, antialiased).

torch's uint8 bilinear kernel with antialiasing is 2–3.5× faster than Pillow's on one
core (110 → 224 px patches) and works on a whole batch at once.
torch is imported lazily, on first use.
"""

from __future__ import annotations

import numpy as np

__all__ = ["resize_batch"]

_SUB_BATCH = 64


def resize_batch(regions: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 (n, s, s, 3) regions to (n, size, size, 3).

    Bilinear with half-pixel centres (``align_corners=False``), antialiased when
    shrinking; the identity when ``s == size``.
    """
    if regions.ndim != 4 or regions.shape[-1] != 3:
        raise ValueError(f"expected (n, s, s, 3) regions, got shape {regions.shape}")
    n, h, w, _ = regions.shape
    if (h, w) == (size, size):
        return regions
    import torch
    import torch.nn.functional as F

    out = np.empty((n, size, size, 3), dtype=np.uint8)
    with torch.inference_mode():
        for start in range(0, n, _SUB_BATCH):
            x = torch.from_numpy(regions[start : start + _SUB_BATCH]).permute(0, 3, 1, 2)
            y = F.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
            out[start : start + _SUB_BATCH] = y.permute(0, 2, 3, 1).numpy()
    return out
