"""Click-to-region proposals (AESPA's interactive part, transposed to units).

The annotator clicks one unit; the proposal is the connected region of neighbouring
units that the model — a rater's own model (:mod:`histoloop.training.raters`) or the
consensus model — gives the clicked unit's class: one brush stroke the annotator accepts
or trims. Units are connected when they are among each other's ``k`` nearest units and
no farther apart than ``gap`` × the typical spacing of the grid, so a region never jumps
across a tear in the tissue.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from histoloop.errors import InvalidArgument
from histoloop.spatial import neighbour_indices

__all__ = ["propose_region"]


def propose_region(
    positions: np.ndarray,
    predicted: np.ndarray,
    clicked: int,
    *,
    k: int = 6,
    gap: float = 1.5,
    max_units: int = 5000,
) -> np.ndarray:
    """The connected same-class region around a clicked unit.

    Args:
        positions: ``(n, 2)`` unit coordinates (isotropic: Visium array positions through
            :func:`histoloop.spatial.visium_array_positions`, or tile centres).
        predicted: ``(n,)`` predicted class of every unit (any comparable labels).
        clicked: Row of the clicked unit.
        k: Neighbours considered per unit (6 on the Visium hexagonal grid, 8 for tiles).
        gap: Largest step between connected units, in multiples of the median
            nearest-neighbour distance.
        max_units: Stop growing the region at this many units.

    Returns:
        ``(m,)`` int64 rows of the region, the clicked unit first, then in order of
        distance along the grid (breadth first).

    Raises:
        InvalidArgument: Mismatched shapes, a clicked row out of range, or bad settings.
    """
    pos = np.asarray(positions, dtype=np.float64)
    labels = np.asarray(predicted)
    n = len(labels)
    if pos.shape != (n, 2):
        raise InvalidArgument(f"positions must be ({n}, 2) like predicted, got {pos.shape}")
    if not 0 <= int(clicked) < n:
        raise InvalidArgument(f"clicked: row {clicked} is not in 0..{n - 1}")
    if gap <= 0 or max_units < 1:
        raise InvalidArgument("gap must be > 0 and max_units ≥ 1")
    if n == 1:
        return np.array([int(clicked)], dtype=np.int64)
    k = min(int(k), n - 1)
    nearest = neighbour_indices(pos, 1)[:, 0]
    spacing = float(np.median(np.linalg.norm(pos - pos[nearest], axis=1))) or 1.0
    graph = neighbour_indices(pos, k, max_distance=gap * spacing)
    target = labels[int(clicked)]
    seen = np.zeros(n, dtype=bool)
    seen[int(clicked)] = True
    order = [int(clicked)]
    queue = deque(order)
    while queue and len(order) < max_units:
        for j in graph[queue.popleft()]:
            if j >= 0 and not seen[j] and labels[j] == target:
                seen[j] = True
                order.append(int(j))
                queue.append(int(j))
                if len(order) >= max_units:
                    break
    return np.asarray(order, dtype=np.int64)
