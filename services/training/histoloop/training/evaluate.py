"""Classification metrics used by training, reports and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics

from histoloop.errors import InvalidArgument
from histoloop.kappa import cohen_kappa

__all__ = ["classification_metrics"]


def classification_metrics(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    *,
    classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, Cohen's kappa and per-class F1.

    Args:
        y_true: ``(n,)`` true class indices.
        y_pred: ``(n,)`` predicted class indices.
        classes: Class names by index; per-class F1 is keyed by name (else by index).

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "macro_f1", "kappa",
        "per_class_f1"}``; macro-F1 and balanced accuracy average over the classes
        present in ``y_true`` or ``y_pred`` (scikit-learn's convention); per-class F1
        is None for a class absent from both.
    """
    yt = np.asarray(y_true, dtype=np.int64)
    yp = np.asarray(y_pred, dtype=np.int64)
    if yt.shape != yp.shape or yt.ndim != 1:
        raise InvalidArgument("y_true and y_pred must be 1-D of the same length")
    n_classes = (
        len(classes) if classes is not None else int(max(yt.max(initial=0), yp.max(initial=0))) + 1
    )
    names = list(classes) if classes is not None else [str(i) for i in range(n_classes)]
    if len(yt) == 0:
        return {
            "n": 0,
            "accuracy": None,
            "balanced_accuracy": None,
            "macro_f1": None,
            "kappa": None,
            "per_class_f1": dict.fromkeys(names),
        }
    present = np.union1d(yt, yp)
    f1 = metrics.f1_score(yt, yp, labels=np.arange(n_classes), average=None, zero_division=0)
    kappa = cohen_kappa(yt, yp)
    return {
        "n": int(len(yt)),
        "accuracy": float(metrics.accuracy_score(yt, yp)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(yt, yp)),
        "macro_f1": float(np.mean(f1[present])),
        "kappa": float(kappa),
        "per_class_f1": {
            names[c]: (float(f1[c]) if c in present else None) for c in range(n_classes)
        },
    }
