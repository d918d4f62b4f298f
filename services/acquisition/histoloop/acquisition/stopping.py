"""Stopping signal: are the predictions still changing from round to round?

Follows the "stabilising predictions" idea (Bloodgood & Vijay-Shanker, 2009): when the
predicted classes of consecutive rounds agree almost perfectly (high Cohen's kappa, few
changed spots) for a few rounds in a row, more labels buy little. The mean normalised
uncertainty is reported alongside and can be used as an extra condition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoloop.errors import InvalidArgument
from histoloop.formats.vocab import DEFAULT_STOP_MAX_CHANGE
from histoloop.kappa import cohen_kappa

__all__ = ["RoundPredictions", "StoppingSignal", "agreement_kappa", "recommend_stop"]


@dataclass(frozen=True, eq=False)
class RoundPredictions:
    """The predictions of one round over the same spots as every other round.

    Attributes:
        predicted: ``(n,)`` predicted class index per spot.
        probabilities: ``(n, C)`` class probabilities, or None.
    """

    predicted: np.ndarray
    probabilities: np.ndarray | None = None


@dataclass(frozen=True)
class StoppingSignal:
    """What :func:`recommend_stop` found.

    Attributes:
        stop: True when the thresholds held for ``patience`` consecutive round pairs.
        reason: One human-readable sentence.
        changed_share: Share of spots whose predicted class changed in the last round
            (None with fewer than two rounds).
        kappa: Cohen's kappa between the last two rounds' predicted classes.
        mean_uncertainty: Mean normalised entropy of the last round (None without
            probabilities).
        changed_history: ``changed_share`` for every consecutive round pair.
        kappa_history: ``kappa`` for every consecutive round pair.
        rounds: Number of rounds considered.
    """

    stop: bool
    reason: str
    changed_share: float | None
    kappa: float | None
    mean_uncertainty: float | None
    changed_history: tuple[float, ...]
    kappa_history: tuple[float, ...]
    rounds: int


def agreement_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Cohen's kappa between two labelings of the same items.

    Args:
        a: ``(n,)`` non-negative integer labels.
        b: ``(n,)`` non-negative integer labels.

    Returns:
        Kappa in [-1, 1]; 1.0 when both labelings are identical (even if constant).
    """
    return cohen_kappa(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))


def _mean_entropy(P: np.ndarray) -> float:
    P = np.asarray(P, dtype=np.float64)
    h = -(P * np.log(np.clip(P, 1e-12, 1.0))).sum(axis=1)
    return float(h.mean() / math.log(P.shape[1]))


def recommend_stop(
    history: Sequence[RoundPredictions],
    *,
    max_change: float = DEFAULT_STOP_MAX_CHANGE,
    min_kappa: float = 0.95,
    max_uncertainty: float | None = None,
    patience: int = 2,
) -> StoppingSignal:
    """Recommend whether to stop annotating.

    Stop when, for the last ``patience`` consecutive round pairs, at most ``max_change``
    of the spots changed predicted class and Cohen's kappa was at least ``min_kappa``,
    and (if given) the last round's mean normalised entropy is at most
    ``max_uncertainty``.

    Args:
        history: Predictions of every round so far, oldest first, over the same spots.
        max_change: Largest tolerated share of changed spots.
        min_kappa: Smallest tolerated kappa between consecutive rounds.
        max_uncertainty: Optional ceiling on the mean normalised entropy.
        patience: Consecutive round pairs that must meet the thresholds.

    Returns:
        A :class:`StoppingSignal`.

    Raises:
        InvalidArgument: Rounds of different lengths or a threshold out of range.
    """
    if patience < 1:
        raise InvalidArgument(f"patience must be ≥ 1, got {patience}")
    if not 0.0 <= max_change <= 1.0:
        raise InvalidArgument(f"max_change must be in [0, 1], got {max_change}")
    preds = [np.asarray(r.predicted) for r in history]
    if len({p.shape for p in preds}) > 1:
        raise InvalidArgument("every round must predict the same spots")
    changes = tuple(float(np.mean(a != b)) for a, b in zip(preds, preds[1:], strict=False))
    kappas = tuple(agreement_kappa(a, b) for a, b in zip(preds, preds[1:], strict=False))
    last_p = history[-1].probabilities if history else None
    mean_u = None if last_p is None else _mean_entropy(last_p)
    signal = dict(
        changed_share=changes[-1] if changes else None,
        kappa=kappas[-1] if kappas else None,
        mean_uncertainty=mean_u,
        changed_history=changes,
        kappa_history=kappas,
        rounds=len(history),
    )
    if len(changes) < patience:
        return StoppingSignal(
            stop=False,
            reason=f"need {patience + 1} rounds to judge stability, have {len(history)}",
            **signal,  # type: ignore[arg-type]
        )
    recent = range(len(changes) - patience, len(changes))
    stable = all(changes[i] <= max_change and kappas[i] >= min_kappa for i in recent)
    if not stable:
        return StoppingSignal(
            stop=False,
            reason=(
                f"predictions still changing: {changes[-1]:.2%} of spots changed, "
                f"kappa {kappas[-1]:.3f} (want ≤ {max_change:.2%} and ≥ {min_kappa})"
            ),
            **signal,  # type: ignore[arg-type]
        )
    if max_uncertainty is not None and (mean_u is None or mean_u > max_uncertainty):
        return StoppingSignal(
            stop=False,
            reason=f"predictions stable but mean uncertainty {mean_u} > {max_uncertainty}",
            **signal,  # type: ignore[arg-type]
        )
    return StoppingSignal(
        stop=True,
        reason=(
            f"predictions stable for {patience} rounds: {changes[-1]:.2%} changed, "
            f"kappa {kappas[-1]:.3f}"
        ),
        **signal,  # type: ignore[arg-type]
    )
