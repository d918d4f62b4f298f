"""Cohen's kappa, once: annotator agreement, round-to-round stability, model metrics.

``kappa = (p_o − p_e) / (1 − p_e)`` with ``p_o`` the observed agreement and ``p_e`` the
agreement expected from each labelling's own class frequencies. Where both labellings
use one and the same class (``p_e`` = 1) kappa is undefined; it is 1.0 then (perfect, if
uninformative, agreement) instead of NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from histoloop.errors import InvalidArgument

__all__ = ["cohen_kappa"]


def cohen_kappa(a: Sequence[object] | np.ndarray, b: Sequence[object] | np.ndarray) -> float:
    """Cohen's kappa between two labellings of the same items.

    Args:
        a: ``(n,)`` labels (class indices or names).
        b: ``(n,)`` labels of the same items, in the same order.

    Returns:
        Kappa in [-1, 1]; 1.0 for no items or where expected agreement is 1.

    Raises:
        InvalidArgument: the two labellings differ in length.
    """
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise InvalidArgument(
            f"kappa needs two 1-D labellings of one length, got {a_arr.shape} and {b_arr.shape}"
        )
    n = len(a_arr)
    if n == 0:
        return 1.0
    _, codes = np.unique(np.concatenate([a_arr, b_arr]), return_inverse=True)
    m = int(codes.max()) + 1
    ca, cb = codes[:n], codes[n:]
    confusion = np.bincount(ca * m + cb, minlength=m * m).reshape(m, m).astype(np.float64)
    observed = float(np.trace(confusion)) / n
    expected = float(confusion.sum(axis=1) @ confusion.sum(axis=0)) / (n * n)
    if expected >= 1.0:
        return 1.0
    return (observed - expected) / (1.0 - expected)
